"""Validation-gated merges: a reply's window replaces part of the model only if it does no harm.

In Snake a node's window replaces that part of the global model; nothing averages it away.
Reply validation (``reply.py``) rejects malformed replies, but a well-formed poisoned window (a
node training on flipped labels, a sign-flipped update) passes it. ``MergeGate`` scores the
candidate model (the global model with the reply's window merged) with the caller's
``loss_fn``, on data the server holds out, and lets the merge happen only if the loss rises by
no more than ``tolerance`` over the global model's. Otherwise ``SnakeStrategy`` rolls the hop
back: the model stays bit-identical, the hop is recorded as rejected with its reason, and a node
rejected ``strikes`` times in a row backs off like a failed node.

The global model's loss is kept from the last accepted merge (keyed by the segment versions),
so a hop costs one evaluation; with hops in flight each merge is gated in dispatch order,
against the model as the merges before it left it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord

from .window import update_norm


class MergeGate:
    """Accept a merge only if the loss on held-out data rises by at most ``tolerance``.

    Parameters
    ----------
    loss_fn : Callable[[ArrayRecord], float]
        The loss of a full model (the strategy's ``ArrayRecord``) on the server's gate data;
        it must not change the record. A NaN or infinite loss is a rise beyond any tolerance.
    tolerance : float
        How far the loss may rise in one merge, in the loss's own units (> 0). Fix it once,
        from the gate's loss changes of honest hops in a clean run (a high percentile of them),
        before any attack is run: docs/reliability.md, "Fixing gate-tolerance".
    strikes : int (default: 2)
        Rejections in a row after which the node backs off as a failed node does
        (``SnakeStrategy``'s ``backoff``); an accepted merge clears its count.
    """

    def __init__(self, loss_fn: Callable[[ArrayRecord], float], tolerance: float, strikes: int = 2) -> None:
        if not tolerance > 0:
            raise ValueError(f"tolerance: must be > 0 (fixed from a clean run's honest hops), got {tolerance}")
        if strikes < 1:
            raise ValueError(f"strikes: must be >= 1 rejection(s) in a row, got {strikes}")
        self.loss_fn, self.tolerance, self.strikes = loss_fn, float(tolerance), int(strikes)
        self.baseline: tuple[list[int], float] | None = None  # (segment versions, the global model's loss)
        self.streak: dict[int, int] = {}  # node -> rejections in a row
        self.rejections: list[dict[str, Any]] = []

    def judge(self, hop: dict[str, Any], arrays: ArrayRecord, candidate: ArrayRecord, keys: Sequence[str],
              versions: Mapping[str, int], after: Mapping[str, int]) -> str | None:
        """Why ``hop``'s merge must be rolled back, or ``None`` to accept it.

        Parameters
        ----------
        hop : dict[str, Any]
            The hop's row (its ``node``); the gate adds ``hop["gate"]``: the loss before and
            after, its change, the update's L2 norm (what ``max_update_norm`` would compare;
            a clean run's norms fix that bound as its loss changes fix the tolerance), and the
            seconds (wall and CPU) the scoring took.
        arrays, candidate : ArrayRecord
            The global model now, and with the reply's window merged.
        keys : Sequence[str]
            The window's keys (where the two differ).
        versions, after : Mapping[str, int]
            Every segment's version now, and once the merge is accepted.
        """
        norm = update_norm(candidate, arrays, keys)  # bookkeeping, not the gate's cost
        wall, cpu = time.perf_counter(), time.process_time()
        before = self._loss(arrays, versions)
        loss = float(self.loss_fn(candidate))
        change = loss - before
        hop["gate"] = {"loss_before": before, "loss_after": loss, "loss_change": change,
                       "update_norm": norm,
                       "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
        node = hop["node"]
        if math.isfinite(change) and change <= self.tolerance:
            self.baseline = (_key(after), loss)
            self.streak.pop(node, None)
            return None
        self.streak[node] = self.streak.get(node, 0) + 1
        return (f"gate: loss {before:.4g} -> {loss:.4g} rises by {change:.4g}, more than gate-tolerance "
                f"{self.tolerance:g} (rejection {self.streak[node]} in a row)")

    def struck_out(self, node: int) -> bool:
        """Has ``node`` been rejected ``strikes`` times in a row? Its count starts again if so."""
        if self.streak.get(node, 0) < self.strikes:
            return False
        self.streak.pop(node)
        return True

    def _loss(self, arrays: ArrayRecord, versions: Mapping[str, int]) -> float:
        """The global model's loss: kept from the last accepted merge, else scored now."""
        key = _key(versions)
        if self.baseline is None or self.baseline[0] != key:
            self.baseline = (key, float(self.loss_fn(arrays)))
        return self.baseline[1]

    # ---- checkpoint ---------------------------------------------------------
    def state(self, key: Callable[[int], Any]) -> dict[str, Any]:
        """JSON-able state; node ids are replaced by ``key(node)`` (their rank)."""
        return {"baseline": list(self.baseline) if self.baseline is not None else None,
                "streak": [[key(node), count] for node, count in self.streak.items()],
                "rejections": self.rejections}

    def load_state(self, state: Mapping[str, Any]) -> list[list[Any]]:
        """Continue from ``state()``: the kept loss and the rejections; returns the streak rows,
        to ``restore`` once the nodes (new ids) are known."""
        baseline = state.get("baseline")
        self.baseline = (list(baseline[0]), float(baseline[1])) if baseline else None
        self.rejections = list(state.get("rejections", []))
        self.streak = {}
        return [list(row) for row in state.get("streak", [])]

    def restore(self, rows: Sequence[Sequence[Any]], node_of: Mapping[Any, int]) -> None:
        """Reload streak rows whose key maps to a node now connected."""
        for key, count in rows:
            if key in node_of:
                self.streak[node_of[key]] = int(count)


def _key(versions: Mapping[str, int]) -> list[int]:
    """The global model's identity within a run: every segment's version, in segment order."""
    return [int(v) for v in versions.values()]
