"""Snake Learning as a Flower Message-API strategy.

One server round is one hop: one node trains one window of segments on its own
data and sends back that window alone. The strategy merges it into the full model
and returns the full ``ArrayRecord``, because ``Strategy.start`` replaces the
global model with whatever ``aggregate_train`` returns.

Evaluation is centralized: ``start(..., evaluate_fn=...)`` scores the global model on the
server; no node is sent an evaluate message (a node's copy is current only where it
trained). The node side of the protocol is ``snake_flower.make_client_app``
(docs/protocol.md lists every key).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .fitting import WindowFitter
from .nodes import NodeBackoff, discovers_lazily, ordered_nodes, rank_in, relist_interval, wait_for_nodes
from .payload import PAYLOAD_DTYPES, PayloadError, decode, encode
from .schedule import SnakeSchedule
from .window import (MUST_SEND, check_segments, check_window, merge_window, relative_drift, select,
                     tied_aliases, unknown_keys, update_norm, window_keys)

SYNCS = ("delta", "window")


class SnakeStrategy(Strategy):
    """Sequential, layer-window training along a serpentine schedule.

    Parameters
    ----------
    segments : Mapping[str, Sequence[str]]
        Segment name -> its ``state_dict`` keys, input to output (from the caller).
    window : int | str (default: 1)
        Contiguous segments trained per hop, besides the head/stem extras; ``"auto"``
        gives each node, at each hop, the largest window at the snake's position that
        ``misfit`` accepts for its capacity (nodes that fit none are passed over).
    sweep, order, train_head, train_stem, seed
        See :class:`strategies.schedule.SnakeSchedule`.
    sync : str (default: "delta")
        ``"delta"`` sends every segment that changed since the node last synced
        (the whole model on its first visit); ``"window"`` sends only the window
        and the node trains against its own, possibly stale, copy of the rest.
    sync_tolerance : float (default: 0.0)
        With delta sync, a frozen (non-window) segment is resent only if the global
        copy has drifted from the node's by more than this relative L2 norm; the
        window is always sent current. 0 resends every changed segment.
    min_nodes : int (default: 1)
        Nodes that must be connected before the first hop; later hops go on with
        whoever is connected (nodes join and leave between hops).
    backoff : int (default: 2)
        Hops a node sits out after a failed hop, doubling with each failure in a row
        (see :class:`strategies.nodes.NodeBackoff`).
    max_update_norm : float (default: 0.0)
        Reject a reply whose window differs from the one sent by more than this L2
        norm (a node pushing the model far in one hop); 0 sets no limit.
    payload_dtype : str (default: "fp32")
        What the messages carry, both ways: ``"fp32"``, ``"fp16"`` or ``"int8"`` (see
        :mod:`strategies.payload`). The global model stays an fp32 master copy; a reply
        is decoded before it is checked and merged, and one that cannot be is rejected.
    query_timeout : float (default: 60.0)
        Seconds to wait for new nodes to report their rank.
    rank_discovery : str (default: "auto")
        ``"all"`` asks every node its rank before the first hop (the chain follows the
        ranks: the same visits in every run); ``"lazy"`` asks none, walks the node ids
        (random per run) and learns each rank from the node's first reply, so the first hop
        does not wait on every node; ``"auto"`` is lazy above
        :data:`strategies.nodes.LAZY_ABOVE` nodes unless capacities are needed.
    capacity : Callable[[float, Mapping[str, float]], Any] | None (default: None)
        ``capacity(rank, reported)``: a node's capacity (anything with a ``compute``
        attribute) from its rank and what it reported beside it; needed by
        ``window="auto"`` and ``order="capacity"`` (fastest node first).
    misfit : Callable[[list[str], Any], str | None] | None (default: None)
        ``misfit(window, capacity)``: why a window does not fit a node, or ``None``.
    report_keys : Sequence[str] (default: ("train-loss", "num-examples"))
        Reply metrics handed back to Flower each round (it logs them); every metric
        a node reports is kept in ``hops[i]["metrics"]``.
    arrayrecord_key, configrecord_key : str
        Keys of the records in the messages, as in Flower's ``FedAvg``.
    """

    def __init__(self, segments: Mapping[str, Sequence[str]], window: int | str = 1, *,
                 sweep: str = "serpentine", order: str = "shuffle", train_head: bool = True,
                 train_stem: bool = False, sync: str = "delta", sync_tolerance: float = 0.0,
                 min_nodes: int = 1, backoff: int = 2, max_update_norm: float = 0.0,
                 payload_dtype: str = "fp32", query_timeout: float = 60.0, rank_discovery: str = "auto",
                 seed: int = 0,
                 capacity: Callable[[float, Mapping[str, float]], Any] | None = None,
                 misfit: Callable[[list[str], Any], str | None] | None = None,
                 report_keys: Sequence[str] = ("train-loss", "num-examples"),
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config") -> None:
        if sync not in SYNCS:
            raise ValueError(f"sync: {sync!r} is not one of {', '.join(SYNCS)}")
        check_segments(segments)
        self.segments = {name: list(keys) for name, keys in segments.items()}
        if len(self.segments) < 3:
            log(WARNING, "SnakeStrategy: only %d segment(s): every window is (nearly) the whole model; "
                "segment_model(model, min_segments=4) cuts finer", len(self.segments))
        self.auto = window == "auto"
        if self.auto and misfit is None:
            raise ValueError("window: 'auto' needs a misfit function (node capacities)")
        if (self.auto or order == "capacity") and capacity is None:
            raise ValueError(f"window {window!r} with order {order!r} needs node capacities")
        if not self.auto and not isinstance(window, int):
            raise ValueError(f"window: expected a number of segments or 'auto', got {window!r}")
        # auto: the snake's position is that of a one-segment sweep; sizes vary per node
        self.schedule = SnakeSchedule(list(self.segments), 1 if self.auto else window, sweep=sweep, order=order,
                                      train_head=train_head, train_stem=train_stem, seed=seed)
        self.fitter = WindowFitter(self.schedule, capacity, misfit) if capacity is not None else None
        if sync_tolerance < 0:
            raise ValueError(f"sync_tolerance: must be >= 0, got {sync_tolerance}")
        self.sync, self.sync_tolerance = sync, sync_tolerance
        if max_update_norm < 0:
            raise ValueError(f"max_update_norm: must be >= 0 (0 = no limit), got {max_update_norm}")
        self.max_update_norm = max_update_norm
        if payload_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"payload_dtype: {payload_dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
        self.payload_dtype = payload_dtype
        self.min_nodes, self.query_timeout = min_nodes, query_timeout
        discovers_lazily(rank_discovery, 0, self._needs_every_rank)  # refuses a bad setting now
        self.rank_discovery, self._lazy = rank_discovery, None  # decided at the first hop
        self.backoff = NodeBackoff(backoff)
        self.report_keys = tuple(report_keys)
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key
        self.versions = {name: 0 for name in self.segments}  # bumped on every merge
        self.node_versions: dict[int, dict[str, int]] = {}  # what each node holds
        self.node_arrays: dict[int, dict[str, ArrayRecord]] = {}  # ... and its values (tolerance > 0)
        self.provenance: dict[str, dict[str, int]] = {}
        self.hops: list[dict[str, Any]] = []  # one row per round: node, window, outcome
        self.failures: list[dict[str, Any]] = []
        self.rejected_replies = 0
        self.node_ranks: dict[int, float] = {}  # stable order of nodes, reported by them
        self.membership: list[dict[str, Any]] = []  # nodes that joined or left, per round
        self.round_offset = 0  # rounds done before a resume; Flower counts from 1 again
        self._connected: set[int] = set()
        self._chain: list[int] = []  # the connected nodes as last listed, in chain order
        self._relist_at = 0  # the hop that lists them again (see strategies.nodes.relist_interval)
        self._restored_backoff: list[list[Any]] = []
        self._arrays: ArrayRecord | None = None
        self.aliases: dict[str, str] = {}  # tied weights: alias key -> owner key (set by start)

    def summary(self) -> None:
        """Log the strategy's settings."""
        s = self.schedule
        log(INFO, "\t├── SnakeStrategy: %d segments, window %s (+head %s, +stem %s)",
            len(self.segments), "auto" if self.auto else s.window, bool(s.head), bool(s.stem))
        log(INFO, "\t└── %s sweep (period %d hops), %s order, %s sync",
            "serpentine" if s.period > len(s.body) - s.window + 1 else "forward",
            s.period, s.order, self.sync)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``Strategy.start``, after checking that every segment key is in ``initial_arrays``.

        Keys of ``initial_arrays`` in no segment (a tied weight's alias, say) are never sent
        nor changed. Evaluation is centralized: pass ``evaluate_fn``; no node is asked
        to evaluate (see ``configure_evaluate``).
        """
        unknown = unknown_keys(self.segments, initial_arrays)
        if unknown:
            raise ValueError(f"segments: {len(unknown)} key(s) not in initial_arrays, e.g. {unknown[:3]} "
                             f"(build the segments and the arrays from the same model)")
        self.aliases = tied_aliases(self.segments, initial_arrays)
        if self.aliases:  # so that load_state_dict(arrays) never restores a stale tied weight
            log(INFO, "SnakeStrategy: %d tied key(s) follow their owner: %s", len(self.aliases),
                ", ".join(f"{alias} = {owner}" for alias, owner in list(self.aliases.items())[:3]))
        return super().start(grid, initial_arrays, *args, **kwargs)

    # ---- training ----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the next node what it lacks and the window it must train."""
        server_round += self.round_offset
        nodes = self._ordered_nodes(grid, server_round)
        hop = server_round - 1
        node = self.backoff.pick(hop, nodes, self.schedule.node_at)
        if self.auto:  # the scheduled node first, then the others in chain order
            assert self.fitter is not None
            node, window, passed = self.fitter.pick(hop, node, nodes, self.node_ranks,
                                                    lambda other: self.backoff.available(other, hop))
        else:
            window, passed = self.schedule.window_at(hop), []
        self._arrays = arrays
        sent = self._segments_to_send(node, window)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["window"] = window
        cfg["sync"] = self.sync
        cfg["payload-dtype"] = self.payload_dtype  # the node replies in the same encoding
        cfg["segments-sent"] = sent or [""]  # ConfigRecord lists may not be empty
        # the versions the node must hold once it applied this message (skipped ones stay)
        held = self.node_versions.get(node, {})
        cfg["segment-versions"] = [self.versions[name] if name in sent or name not in held else held[name]
                                   for name in self.segments]
        payload = encode(select(arrays, window_keys(self.segments, sent)), self.payload_dtype)
        self.hops.append({"round": server_round, "node": node, "window": window,
                          "segments_sent": sent, "status": "pending", "started": time.time()})
        if passed:
            self.hops[-1]["passed_over"] = passed
        log(INFO, "hop %d: node %d trains %s (sent %d of %d segments)",
            server_round, node, "+".join(window), len(sent), len(self.segments))
        content = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: cfg})
        return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                        group_id=str(server_round))]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the single reply and merge its window into the full model."""
        server_round += self.round_offset
        hop = self.hops[-1]
        hop["seconds"] = time.time() - hop["started"]  # send to reply, as the server sees it
        node, window = hop["node"], hop["window"]
        replies = [m for m in replies if m.metadata.src_node_id == node]
        if not replies:
            return self._fail(hop, "no reply before the hop timeout")
        reply = replies[0]
        if reply.has_error():
            return self._fail(hop, f"error reply: {_last_line(reply.error.reason)}")
        content = reply.content
        records = list(content.array_records.values())
        reported = {k: v for record in content.metric_records.values() for k, v in record.items()}
        hop["metrics"] = reported
        if node not in self.node_ranks and (rank := rank_in(reported)) is not None:  # lazy discovery
            self.node_ranks[node] = rank
        keys = window_keys(self.segments, window)
        assert self._arrays is not None
        window_arrays, reason = self._decoded(records)
        if reason is None:
            reason = check_window(window_arrays, self._arrays, keys)
        if reason is None and self.max_update_norm > 0:
            norm = update_norm(window_arrays, self._arrays, keys)
            if norm > self.max_update_norm:
                reason = f"update norm {norm:.4g} exceeds max-update-norm {self.max_update_norm:g}"
        if reason is not None:
            self.rejected_replies += 1
            return self._fail(hop, f"rejected reply: {reason}")
        merged = merge_window(self._arrays, window_arrays)  # fp32: the master copy
        for alias, owner in self.aliases.items():  # a tied weight's alias holds its owner's values
            if owner in window_arrays:
                merged[alias] = merged[owner]
        for name in window:
            self.versions[name] += 1
            self.provenance[name] = {"node": node, "round": server_round,
                                     "num-examples": int(reported.get("num-examples", 0))}
        held = self.node_versions.setdefault(node, {})
        held.update({name: self.versions[name] for name in hop["segments_sent"]})
        held.update({name: self.versions[name] for name in window})
        if self.sync_tolerance > 0:  # remember the values too, to measure their drift later
            copies = self.node_arrays.setdefault(node, {})
            for name in set(hop["segments_sent"]) | set(window):
                copies[name] = select(merged, self.segments[name])
        hop["status"] = "merged"
        self.backoff.succeeded(node)
        return merged, MetricRecord({k: reported[k] for k in self.report_keys if k in reported})

    # ---- evaluation is centralized (ServerApp's evaluate_fn) ---------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Snake evaluates centrally on the server; no node is asked.

        A node holds its own copy of the model, current only where it trained, so a
        ClientApp's ``@app.evaluate`` is never called: pass ``evaluate_fn`` to ``start``.
        """
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None

    # ---- heterogeneous nodes ------------------------------------------------
    def capacity_of(self, node: int) -> Any:
        """The capacity of a node (``None`` without a ``capacity`` function)."""
        if self.fitter is None:
            return None
        return self.fitter.capacity_of(node, self.node_ranks.get(node, float("inf")))

    @property
    def skipped(self) -> dict[int, str]:
        """Nodes that no window fits, and why (``window = "auto"``)."""
        return self.fitter.skipped if self.fitter is not None else {}

    # ---- helpers -----------------------------------------------------------
    @property
    def _needs_every_rank(self) -> bool:
        """Auto windows and the capacity order rest on every node's report before the first hop."""
        return self.auto or self.schedule.order == "capacity"

    def _decoded(self, records: list[ArrayRecord]) -> tuple[ArrayRecord | None, str | None]:
        """The reply's one record decoded to fp32, or why it cannot be."""
        if len(records) != 1:
            return None, f"expected one ArrayRecord, got {len(records)}; {MUST_SEND}"
        try:
            return decode(records[0], self.payload_dtype, reference=self._arrays), None
        except PayloadError as err:
            return None, f"undecodable {self.payload_dtype} payload: {err}"

    def _segments_to_send(self, node: int, window: list[str]) -> list[str]:
        held = self.node_versions.get(node)
        if held is None:  # first visit, or the node's copy is unknown after a failure
            return list(self.segments)
        if self.sync == "window":
            return list(window)
        stale = [name for name in self.segments if held.get(name) != self.versions[name]]
        if self.sync_tolerance > 0 and self._arrays is not None:
            copies = self.node_arrays.get(node, {})
            stale = [name for name in stale if name in window or name not in copies
                     or relative_drift(self._arrays, copies[name], self.segments[name]) > self.sync_tolerance]
        return stale

    def _fail(self, hop: dict[str, Any], reason: str) -> tuple[None, None]:
        # The node's copy is now unknown: its next visit resends the whole model.
        self.node_versions.pop(hop["node"], None)
        self.node_arrays.pop(hop["node"], None)
        reason = reason[:300]
        hop["status"], hop["reason"] = "failed", reason
        self._relist_at = 0  # the node may have left: list the nodes again at the next hop
        wait = self.backoff.failed(hop["node"], hop["round"] - 1)
        self.failures.append({"round": hop["round"], "node": hop["node"], "reason": reason,
                              "backoff_hops": wait})
        log(WARNING, "hop %d: node %d failed, global model unchanged, node sits out %d hops: %s",
            hop["round"], hop["node"], wait, reason)
        return None, None

    def _ordered_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Connected nodes in a stable order; joins and leaves are logged and recorded."""
        first = not self._connected  # a resumed run waits for its nodes again, too
        wait = self.min_nodes if first else 1
        listed = first or server_round - 1 >= self._relist_at
        if listed:
            self._chain = self._listed_nodes(grid, wait)
            self._relist_at = server_round - 1 + relist_interval(len(self._chain))
        nodes = self._chain
        if self.auto:
            assert self.fitter is not None
            nodes = self.fitter.screen(nodes, self.node_ranks)
        if self.schedule.order == "capacity":
            assert self.fitter is not None
            nodes = self.fitter.by_capacity(nodes, self.node_ranks)
        if listed or self._needs_every_rank:  # else the chain is as it was
            self._note_membership(nodes, server_round)
        if self._restored_backoff:  # node ids are new after a resume; ranks are not
            self.backoff.restore(self._restored_backoff, {r: n for n, r in self.node_ranks.items()})
            self._restored_backoff = []
        return nodes

    def _listed_nodes(self, grid: Grid, wait: int) -> list[int]:
        """The connected nodes, asked of the grid, in a stable order (asking new nodes their rank)."""
        if self._lazy is None:
            self._lazy = discovers_lazily(self.rank_discovery, max(wait, len(list(grid.get_node_ids()))),
                                          self._needs_every_rank)
            if self._lazy:
                log(INFO, "SnakeStrategy: ranks learnt from replies, not asked (rank discovery %s); the "
                    "chain follows node ids, which differ from run to run", self.rank_discovery)
        if self._lazy:
            return sorted(wait_for_nodes(grid, wait))
        return ordered_nodes(grid, self.node_ranks, min_nodes=wait, query_timeout=self.query_timeout,
                             configrecord_key=self.configrecord_key,
                             info=self.fitter.info if self.fitter is not None else None)

    def _note_membership(self, nodes: list[int], server_round: int) -> None:
        """Log and record the nodes that joined or left since the last listing."""
        joined, left = set(nodes) - self._connected, self._connected - set(nodes)
        if self._connected and (joined or left):
            self.membership.append({"round": server_round, "joined": sorted(joined), "left": sorted(left)})
            log(INFO, "hop %d: %d node(s) joined, %d left; %d in the chain",
                server_round, len(joined), len(left), len(nodes))
        for node in left:  # should it come back, its copy is unknown: resync it in full
            self.node_versions.pop(node, None)
            self.node_arrays.pop(node, None)
        self._connected = set(nodes)

    # ---- checkpoint ---------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed run needs (JSON-able); node ids are replaced by ranks."""
        return {"rounds-done": len(self.hops), "versions": self.versions, "provenance": self.provenance,
                "hops": self.hops, "failures": self.failures, "rejected-replies": self.rejected_replies,
                "membership": self.membership,
                "backoff": self.backoff.state(lambda node: self.node_ranks.get(node, float("inf")))}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state()``: later rounds count on from its ``rounds-done``.

        Nodes keep their copies in the run's context, which a new run does not
        have, so every node gets the full model on its next visit.
        """
        self.round_offset = int(state["rounds-done"])
        self.versions = {name: int(state["versions"][name]) for name in self.segments}
        self.provenance, self.hops = dict(state["provenance"]), list(state["hops"])
        self.failures, self.membership = list(state["failures"]), list(state["membership"])
        self.rejected_replies = int(state["rejected-replies"])
        self._restored_backoff = [list(row) for row in state["backoff"]]
        self.node_versions, self.node_arrays, self.node_ranks, self._connected = {}, {}, {}, set()
        self._chain, self._relist_at = [], 0
        if self.fitter is not None:
            self.fitter.reset()


def _last_line(reason: str) -> str:
    """The line of a remote error that says what happened."""
    # An error reply can carry a whole remote traceback, wrapped as "<class ...>:<'...'>".
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1].removesuffix("'>") if lines else reason
