"""The checkpoint half of ``SnakeStrategy``: what a resumed run needs, and how it continues.

Node ids are new in a resumed run; ranks are not, so every per-node record (backoff, the merge
gate's rejections in a row) is kept by rank and restored once the nodes have reported theirs.
Hops in flight at the checkpoint (``concurrency > 1``) are kept with the model they were sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from .window import select, window_keys

if TYPE_CHECKING:
    from .chain import NodeChain
    from .fitting import WindowFitter
    from .gate import MergeGate
    from .nodes import NodeBackoff
    from .sync import NodeCopies


class SnakeCheckpoint:
    """Mixin of ``SnakeStrategy``: ``state``, ``in_flight_arrays`` and ``load_state``."""

    segments: dict[str, list[str]]
    versions: dict[str, int]
    provenance: dict[str, dict[str, int]]
    hops: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    rejected_replies: int
    round_offset: int
    aliases: dict[str, str]
    sent_arrays: dict[int, ArrayRecord]
    sent_versions: dict[int, dict[str, int]]
    sent_configs: dict[int, Any]
    restored_flights: list[tuple[dict[str, Any], ArrayRecord]]
    chain: NodeChain
    copies: NodeCopies
    backoff: NodeBackoff
    gate: MergeGate | None
    fitter: WindowFitter | None
    _restored_backoff: list[list[Any]]
    _restored_streaks: list[list[Any]]
    node_ranks: dict[int, float]  # SnakeStrategy's properties (the chain's)
    membership: list[dict[str, Any]]

    def state(self) -> dict[str, Any]:
        """What a resumed run needs (JSON-able); node ids are replaced by ranks.

        Hops still in flight (``concurrency > 1``) are kept apart, with their node's rank
        and the segment versions they were sent: a resumed run sends them again, each with
        the model it was first sent (``in_flight_arrays``).
        """
        done = [hop for hop in self.hops if hop["status"] != "pending"]
        flights = [{**hop, "rank": self.node_ranks.get(hop["node"]),
                    "versions": self.sent_versions[hop["round"] - 1]}
                   for hop in self.hops if hop["status"] == "pending"]
        rank = lambda node: self.node_ranks.get(node, float("inf"))  # noqa: E731
        return {"rounds-done": len(done), "versions": self.versions, "provenance": self.provenance,
                "hops": done, "in-flight": flights, "failures": self.failures,
                "rejected-replies": self.rejected_replies, "membership": self.membership,
                "backoff": self.backoff.state(rank),
                **({"gate": self.gate.state(rank)} if self.gate is not None else {})}

    def in_flight_arrays(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """Per hop in flight, the arrays it was sent that differ from ``arrays`` (the global
        model now): the windows merged since it left, at most ``concurrency - 1`` of them."""
        flights = {}
        for hop, sent in self.sent_arrays.items():
            moved = window_keys(self.segments, [name for name in self.segments
                                                if self.sent_versions[hop][name] != self.versions[name]])
            moved += [alias for alias, owner in self.aliases.items() if owner in moved]
            flights[str(hop)] = select(sent, moved)
        return flights

    def load_state(self, state: Mapping[str, Any], in_flight: Mapping[str, ArrayRecord] | None = None) -> None:
        """Continue from ``state()`` (and ``in_flight_arrays``): later rounds count on from its
        ``rounds-done``; hops that were in flight are sent again first.

        Nodes keep their copies in the run's context, which a new run does not
        have, so every node gets the full model on its next visit.
        """
        self.round_offset = int(state["rounds-done"])
        self.versions = {name: int(state["versions"][name]) for name in self.segments}
        self.provenance, self.hops = dict(state["provenance"]), list(state["hops"])
        self.failures, self.chain.membership = list(state["failures"]), list(state["membership"])
        self.rejected_replies = int(state["rejected-replies"])
        self._restored_backoff = [list(row) for row in state["backoff"]]
        if self.gate is not None:  # its kept loss, rejections and (by rank) rejections in a row
            self._restored_streaks = self.gate.load_state(state.get("gate", {}))
        self.restored_flights = [(dict(hop), (in_flight or {}).get(str(hop["round"] - 1), ArrayRecord()))
                                 for hop in state.get("in-flight", [])]
        self.copies.reset()
        self.chain.reset()
        self.sent_arrays, self.sent_versions, self.sent_configs = {}, {}, {}
        if self.fitter is not None:
            self.fitter.reset()

