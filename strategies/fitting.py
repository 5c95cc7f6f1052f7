"""Fitting windows to nodes of unequal capacity (``window = "auto"``, ``order = "capacity"``).

The strategy layer knows nothing of tensors: what a node can do is an opaque
capacity (with a ``compute`` attribute), and whether a window fits it is asked of a
``misfit(window, capacity)`` function that the caller builds (snake_flower's
``capacity.WindowSizer`` measures ledgers and FLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.supercore import log

from .schedule import SnakeSchedule

Capacity = Callable[[float, Mapping[str, float]], Any]
Misfit = Callable[[list[str], Any], str | None]


class WindowFitter:
    """Capacities of the nodes, and the window each one trains at a hop.

    Parameters
    ----------
    schedule : SnakeSchedule
        Built with ``window=1``: its sweep is the snake's position at each hop.
    capacity : Capacity
        ``capacity(rank, reported)``: a node's capacity from its rank and what it
        reported beside it (its ``--node-config``).
    misfit : Misfit | None
        ``misfit(window, capacity)``: why a window does not fit a node, or ``None``.
        ``None`` here means no auto windows, only capacity lookups.
    """

    def __init__(self, schedule: SnakeSchedule, capacity: Capacity, misfit: Misfit | None = None) -> None:
        self.schedule, self.capacity, self.misfit = schedule, capacity, misfit
        self.reset()

    def reset(self) -> None:
        """Forget every node (node ids change when a run resumes)."""
        self.info: dict[int, dict[str, float]] = {}  # what nodes reported beside their rank
        self.capacities: dict[int, Any] = {}
        self.skipped: dict[int, str] = {}  # node -> why no window fits it anywhere
        self._checked: set[int] = set()

    def capacity_of(self, node: int, rank: float) -> Any:
        """The capacity of ``node`` (asked once its rank is known)."""
        if node in self.capacities:
            return self.capacities[node]
        capacity = self.capacity(rank, self.info.get(node, {}))
        if math.isfinite(rank):  # a node that has not reported its rank yet may do so later
            self.capacities[node] = capacity
        return capacity

    def by_capacity(self, nodes: Sequence[int], ranks: Mapping[int, float]) -> list[int]:
        """Fastest node first; equal speeds keep their order."""
        return sorted(nodes, key=lambda node: -self.capacity_of(node, ranks.get(node, float("inf"))).compute)

    def screen(self, nodes: Sequence[int], ranks: Mapping[int, float]) -> list[int]:
        """The nodes that fit a one-segment window somewhere; the others are skipped, logged."""
        for node in nodes:
            if node in self._checked or not math.isfinite(ranks.get(node, float("inf"))):
                continue
            self._checked.add(node)
            reason = self._fits_somewhere(node, ranks.get(node, float("inf")))
            if reason is not None:
                self.skipped[node] = reason
                log(WARNING, "node %d is skipped: no window fits it anywhere (%s)", node, reason)
        chain = [node for node in nodes if node not in self.skipped]
        return chain or list(nodes)  # every node skipped: better over budget than no run

    def pick(self, hop: int, scheduled: int, nodes: Sequence[int], ranks: Mapping[int, float],
             available: Callable[[int], bool]) -> tuple[int, list[str], list[dict[str, Any]]]:
        """``fit`` over the scheduled node, then the other ``available`` nodes in chain order."""
        at = list(nodes).index(scheduled)
        others = [node for node in [*nodes[at + 1:], *nodes[:at]] if available(node)]
        return self.fit(hop, [scheduled, *others], ranks)

    def fit(self, hop: int, candidates: Sequence[int], ranks: Mapping[int, float]
            ) -> tuple[int, list[str], list[dict[str, Any]]]:
        """The first candidate that fits a window at ``hop``'s position, and its largest window.

        Returns the node, its window and the candidates passed over (``{"node", "reason"}``).
        When none fits, the first candidate trains one segment, over its capacity (logged).
        """
        passed: list[dict[str, Any]] = []
        for node in candidates:
            window, reason = self._largest(hop, self.capacity_of(node, ranks.get(node, float("inf"))))
            if window is not None:
                return node, window, passed
            passed.append({"node": node, "reason": f"no window fits: {reason}"})
            log(INFO, "hop %d: node %d passed over, no window at this position fits it (%s)",
                hop + 1, node, reason)
        log(WARNING, "hop %d: no node fits any window at this position; node %d trains one segment "
            "over its capacity", hop + 1, candidates[0])
        return candidates[0], self.schedule.sized_window_at(hop, 1), passed

    def _largest(self, hop: int, capacity: Any) -> tuple[list[str] | None, str | None]:
        """The largest window at ``hop``'s position that fits, or ``None`` and why not.

        Ledger and FLOPs only grow with the size at a given position, so the sizes are
        bisected: a few measurements per position, not one per size (an LLM has dozens).
        """
        assert self.misfit is not None
        reason = self.misfit(self.schedule.sized_window_at(hop, 1), capacity)
        if reason is not None:
            return None, reason
        fits, too_big = 1, len(self.schedule.body) + 1
        while too_big - fits > 1:
            size = (fits + too_big) // 2
            if self.misfit(self.schedule.sized_window_at(hop, size), capacity) is None:
                fits = size
            else:
                too_big = size
        return self.schedule.sized_window_at(hop, fits), None

    def _fits_somewhere(self, node: int, rank: float) -> str | None:
        """Why no one-segment window at any position fits the node, or ``None``."""
        assert self.misfit is not None
        reason = None
        for hop in range(self.schedule.period):
            reason = self.misfit(self.schedule.sized_window_at(hop, 1), self.capacity_of(node, rank))
            if reason is None:
                return None
        return reason
