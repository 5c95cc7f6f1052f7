"""Snake Learning as a Flower Message-API strategy.

One server round is one hop: one node trains one window of segments on its own
data and sends back that window alone. The strategy merges it into the full model
and returns the full ``ArrayRecord``, because ``Strategy.start`` replaces the
global model with whatever ``aggregate_train`` returns.

Evaluation is centralized: ``start(..., evaluate_fn=...)`` scores the global model on the
server; no node is sent an evaluate message (a node's copy is current only where it
trained). The node side of the protocol is ``snake_flower.make_client_app``
(docs/protocol.md lists every key).

With ``concurrency = K > 1`` K hops are in flight at once, on K nodes, with disjoint
windows (:class:`strategies.schedule.SnakeSchedule`'s lanes); ``start`` then runs
:class:`strategies.pipeline.HopPipeline` instead of Flower's one-round-at-a-time loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .chain import NodeChain
from .checkpoint import SnakeCheckpoint
from .fitting import WindowFitter
from .gate import MergeGate
from .pipeline import HopPipeline
from .nodes import NodeBackoff, rank_in
from .payload import PAYLOAD_DTYPES, encode
from .reply import checked_window, full_sync_reason, last_line
from .schedule import SnakeSchedule
from .sync import NodeCopies
from .window import check_segments, merge_window, select, tied_aliases, unknown_keys, window_keys


class SnakeStrategy(SnakeCheckpoint, Strategy):
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
    sync, sync_tolerance : str, float (default: "delta", 0.0)
        What a node is sent besides its window: see :class:`strategies.sync.NodeCopies`.
    min_nodes, query_timeout, rank_discovery : int, float, str (default: 1, 60.0, "auto")
        Nodes awaited before the first hop (later hops go on with whoever is connected), how
        long new nodes may take to report their rank, and whether it is asked at all: see
        :class:`strategies.chain.NodeChain`.
    backoff : int (default: 2)
        Hops a node sits out after a failed hop, doubling with each failure in a row
        (see :class:`strategies.nodes.NodeBackoff`).
    max_update_norm : float (default: 0.0)
        Reject a reply whose window differs from the one sent by more than this L2
        norm (a node pushing the model far in one hop); 0 sets no limit.
    gate : MergeGate | None (default: None)
        Score each valid reply's merge on the caller's held-out data and roll it back if the
        loss rises by more than the gate's tolerance (see :class:`strategies.gate.MergeGate`);
        a rolled-back hop's status is ``"rejected"``, its row has ``gate`` (the losses), and its
        node backs off after the gate's ``strikes`` rejections in a row.
    payload_dtype : str (default: "fp32")
        What the messages carry, both ways unless ``download_dtype`` says otherwise: ``"fp32"``,
        ``"fp16"`` or ``"int8"`` (see :mod:`strategies.payload`). The global model stays an
        fp32 master copy; a reply is decoded before it is checked and merged, and one that
        cannot be is rejected.
    download_dtype : str | None (default: None)
        What the segments sent in a hop (frozen and window alike) carry, if not
        ``payload_dtype``; the reply stays in ``payload_dtype``. Sending never changes the
        master: the node trains from the decoded segments, and only its decoded reply is merged.
    capacity : Callable[[float, Mapping[str, float]], Any] | None (default: None)
        ``capacity(rank, reported)``: a node's capacity (anything with a ``compute``
        attribute) from its rank and what it reported beside it; needed by
        ``window="auto"`` and ``order="capacity"`` (fastest node first).
    misfit : Callable[[list[str], Any], str | None] | None (default: None)
        ``misfit(window, capacity)``: why a window does not fit a node, or ``None``.
    concurrency : int (default: 1)
        Hops in flight at once, each on its own node, with disjoint windows spread along the
        depth (needs a fixed ``window``, ``train_head=False`` and ``train_stem=False``). Each
        trains against the global model as it was sent; replies merge in dispatch order, so
        a seeded run, and a resumed one, give the same model (see ``HopPipeline``).
    lanes : int | None (default: None)
        Lanes of the schedule (see :class:`strategies.schedule.SnakeSchedule`); ``None``: as
        many as ``concurrency``, at least that many. More lanes than hops in flight (say
        ``concurrency=1, lanes=4``) train the same windows in the same order, one hop at a
        time (on the scheduled nodes: hops in flight pass over busy ones): what concurrency
        changes, apart from the schedule.
    report_keys : Sequence[str] (default: ("train-loss", "num-examples"))
        Reply metrics handed back to Flower each round (it logs them); every metric
        a node reports is kept in ``hops[i]["metrics"]``.
    arrayrecord_key, configrecord_key : str
        Keys of the records in the messages, as in Flower's ``FedAvg``.
    """

    def __init__(self, segments: Mapping[str, Sequence[str]], window: int | str = 1, *,
                 sweep: str = "serpentine", order: str = "shuffle", train_head: bool = True,
                 train_stem: bool = False, sync: str = "delta", sync_tolerance: float = 0.0,
                 min_nodes: int = 1, backoff: int = 2, max_update_norm: float = 0.0, gate: MergeGate | None = None,
                 payload_dtype: str = "fp32", download_dtype: str | None = None,
                 query_timeout: float = 60.0, rank_discovery: str = "auto",
                 seed: int = 0, concurrency: int = 1, lanes: int | None = None,
                 capacity: Callable[[float, Mapping[str, float]], Any] | None = None,
                 misfit: Callable[[list[str], Any], str | None] | None = None,
                 report_keys: Sequence[str] = ("train-loss", "num-examples"),
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config") -> None:
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
        if concurrency < 1:
            raise ValueError(f"concurrency: hops in flight must be at least 1, got {concurrency}")
        lanes = concurrency if lanes is None else lanes
        if lanes < concurrency:
            raise ValueError(f"lanes: {concurrency} hops in flight need at least as many lanes, got {lanes}")
        if lanes > 1 and self.auto:
            raise ValueError("concurrency: windows sized per node ('auto') could overlap; set a fixed window")
        # auto: the snake's position is that of a one-segment sweep; sizes vary per node
        self.schedule = SnakeSchedule(list(self.segments), 1 if self.auto else window, sweep=sweep, order=order,
                                      train_head=train_head, train_stem=train_stem, seed=seed,
                                      lanes=lanes)
        self.concurrency = concurrency
        self.fitter = WindowFitter(self.schedule, capacity, misfit) if capacity is not None else None
        self.copies = NodeCopies(self.segments, sync, sync_tolerance)  # what each node holds
        self.sync = sync
        if max_update_norm < 0:
            raise ValueError(f"max_update_norm: must be >= 0 (0 = no limit), got {max_update_norm}")
        self.max_update_norm, self.gate = max_update_norm, gate
        if payload_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"payload_dtype: {payload_dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
        self.payload_dtype = payload_dtype
        self.download_dtype = payload_dtype if download_dtype is None else download_dtype
        if self.download_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"download_dtype: {download_dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
        self.chain = NodeChain(min_nodes=min_nodes, query_timeout=query_timeout, rank_discovery=rank_discovery,
                               fitter=self.fitter, auto=self.auto, by_capacity=order == "capacity",
                               configrecord_key=configrecord_key, on_leave=self.copies.forget)
        self.backoff = NodeBackoff(backoff)
        self.report_keys = tuple(report_keys)
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key
        self.versions = {name: 0 for name in self.segments}  # bumped on every merge
        self.provenance: dict[str, dict[str, int]] = {}
        self.hops: list[dict[str, Any]] = []  # one row per round: node, window, outcome
        self.failures: list[dict[str, Any]] = []
        self.rejected_replies = 0
        self.round_offset = 0  # rounds done before a resume; Flower counts from 1 again
        self._restored_backoff: list[list[Any]] = []
        self._restored_streaks: list[list[Any]] = []  # the gate's rejections in a row, by rank
        self._arrays: ArrayRecord | None = None  # the global model as the pending hop was sent it
        self.sent_arrays: dict[int, ArrayRecord] = {}  # hop in flight -> the global model it was sent
        self.sent_versions: dict[int, dict[str, int]] = {}  # ... and that model's segment versions
        self.sent_configs: dict[int, ConfigRecord] = {}  # ... and its config (to resend it in full)
        self._grid: Grid | None = None  # where the pending hop went, and its timeout (a full resync)
        self._timeout = 3600.0
        self.restored_flights: list[tuple[dict[str, Any], ArrayRecord]] = []  # in flight at a checkpoint
        self.aliases: dict[str, str] = {}  # tied weights: alias key -> owner key (set by start)

    def summary(self) -> None:
        """Log the strategy's settings."""
        s = self.schedule
        log(INFO, "\t├── SnakeStrategy: %d segments, window %s (+head %s, +stem %s)",
            len(self.segments), "auto" if self.auto else s.window, bool(s.head), bool(s.stem))
        log(INFO, "\t└── %s sweep (period %d hops, %d lane(s)), %s order, %s sync, %d hop(s) in flight",
            s.sweep,
            s.period, len(s.lanes), s.order, self.sync, self.concurrency)

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
        self._timeout = float(kwargs.get("timeout", args[1] if len(args) > 1 else 3600))
        if self.concurrency == 1:
            return super().start(grid, initial_arrays, *args, **kwargs)
        return HopPipeline(self, grid).start(initial_arrays, *args, **kwargs)

    # ---- training ----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the next node what it lacks and the window it must train."""
        self._arrays, self._grid = arrays, grid
        return [self.dispatch(server_round + self.round_offset - 1, arrays, config, grid)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the single reply and merge its window into the full model.

        A node that lost its copy says so (``full-sync-needed``): the hop is sent to it
        again at once with every segment, so the run goes on as if it had never lost it.
        """
        assert self._arrays is not None
        hop, replies = self.hops[-1], list(replies)
        lost = [reply for reply in replies if reply.metadata.src_node_id == hop["node"] and full_sync_reason(reply)]
        if lost and self._grid is not None and not hop.get("full_syncs"):
            replies = list(self._grid.send_and_receive([self.resend_full(hop, full_sync_reason(lost[0]))],
                                                       timeout=self._timeout))
        return self.merge(hop, replies, self._arrays)

    def dispatch(self, hop: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                 busy: Collection[int] = (), rank: float | None = None,
                 versions: Mapping[str, int] | None = None) -> Message:
        """The message of hop ``hop`` (from 0): its node, its window and what the node lacks.

        ``busy`` nodes (training another hop) are passed over. A hop in flight at a
        checkpoint is sent again after a resume with the model it was first sent: ``arrays``
        at segment ``versions`` (default: the global model now), to the node of ``rank`` if
        it is connected and free. The hop's row goes to ``self.hops``.
        """
        server_round = hop + 1
        versions = dict(self.versions if versions is None else versions)
        nodes = self._ordered_nodes(grid, server_round)
        ranked = [node for node in nodes if rank is not None and self.node_ranks.get(node) == rank]
        if ranked and ranked[0] not in busy:
            node = ranked[0]
        else:
            node = self.backoff.pick(hop, nodes, self.schedule.node_at, busy=busy)
        if self.auto:  # the scheduled node first, then the others in chain order
            assert self.fitter is not None
            node, window, passed = self.fitter.pick(hop, node, nodes, self.node_ranks,
                                                    lambda other: self.backoff.available(other, hop))
        else:
            window, passed = self.schedule.window_at(hop), []
        sent = self.copies.to_send(node, window, arrays, versions)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["window"] = window
        cfg["sync"] = self.sync
        cfg["payload-dtype"] = self.payload_dtype  # the node replies in this encoding
        if self.download_dtype != self.payload_dtype or "download-dtype" in cfg:
            cfg["download-dtype"] = self.download_dtype  # ... and decodes its download in this one
        cfg["segments-sent"] = sent or [""]  # ConfigRecord lists may not be empty
        # the versions the node must hold once it applied this message (skipped ones stay)
        cfg["segment-versions"] = self.copies.versions_after(node, sent, versions)
        # encoded for the wire only: the master (``arrays``) keeps its fp32 values
        payload = encode(select(arrays, window_keys(self.segments, sent)), self.download_dtype)
        self.sent_arrays[hop], self.sent_versions[hop] = arrays, versions  # until the hop is merged
        self.sent_configs[hop] = cfg
        # the versions sent, and the window's: what the node holds after the hop, and what a
        # stale reply is checked against
        self.hops.append({"round": server_round, "node": node, "window": window,
                          "segments_sent": sent, "status": "pending", "started": time.time(),
                          "list_s": self.chain.list_s,
                          "versions_sent": {name: versions[name] for name in self.segments
                                            if name in sent or name in window}})
        if passed:
            self.hops[-1]["passed_over"] = passed
        log(INFO, "hop %d: node %d trains %s (sent %d of %d segments)",
            server_round, node, "+".join(window), len(sent), len(self.segments))
        content = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: cfg})
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))

    def resend_full(self, hop: dict[str, Any], why: str | None = None) -> Message:
        """``hop``'s message again, to its node, with every segment (the node lost its copy)."""
        index, node = hop["round"] - 1, hop["node"]
        arrays, versions = self.sent_arrays[index], self.sent_versions[index]
        self.copies.forget(node)
        sent = list(self.segments)
        cfg = ConfigRecord(dict(self.sent_configs[index]))
        cfg["segments-sent"] = sent
        cfg["segment-versions"] = self.copies.versions_after(node, sent, versions)
        hop["segments_sent"], hop["full_syncs"] = sent, hop.get("full_syncs", 0) + 1
        hop["versions_sent"] = {name: versions[name] for name in self.segments}
        log(WARNING, "hop %d: node %d lost its copy of the model (%s): sent every segment again",
            hop["round"], node, why)
        content = RecordDict({self.arrayrecord_key: encode(select(arrays, window_keys(self.segments, sent)),
                                                           self.download_dtype),
                              self.configrecord_key: cfg})
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(hop["round"]))

    def merge(self, hop: dict[str, Any], replies: Iterable[Message], arrays: ArrayRecord
              ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate ``hop``'s reply and merge its window into ``arrays``, the global model now.

        With hops in flight, other windows may have merged since this hop was sent; its
        own window cannot have (windows in flight are disjoint), and a reply whose window
        did change meanwhile is rejected as stale, never re-based.
        """
        hop.setdefault("seconds", time.time() - hop["started"])  # send to reply, as the server sees it
        sent = self.sent_arrays.pop(hop["round"] - 1, arrays)
        self.sent_versions.pop(hop["round"] - 1, None)
        self.sent_configs.pop(hop["round"] - 1, None)
        node, window = hop["node"], hop["window"]
        replies = [m for m in replies if m.metadata.src_node_id == node]
        if not replies:
            return self._fail(hop, "no reply before the hop timeout")
        reply = replies[0]
        if reply.has_error():
            return self._fail(hop, f"error reply: {last_line(reply.error.reason)}")
        if (why := full_sync_reason(reply)) is not None:  # it lost its copy, even after a full resync
            return self._fail(hop, f"the node needs a full sync: {why}")
        content = reply.content
        reported = {k: v for record in content.metric_records.values() for k, v in record.items()}
        hop["metrics"] = reported
        if node not in self.node_ranks and (rank := rank_in(reported)) is not None:  # lazy discovery
            self.node_ranks[node] = rank
        keys = window_keys(self.segments, window)
        window_arrays, reason = checked_window(hop, list(content.array_records.values()), reported, arrays,
                                               keys, self.versions,
                                               payload_dtype=self.payload_dtype,
                                               max_update_norm=self.max_update_norm)
        if window_arrays is None:
            self.rejected_replies += 1
            return self._fail(hop, f"rejected reply: {reason}")
        merged = merge_window(arrays, window_arrays)  # fp32: the master copy
        for alias, owner in self.aliases.items():  # a tied weight's alias holds its owner's values
            if owner in window_arrays:
                merged[alias] = merged[owner]
        after = {**self.versions, **{name: self.versions[name] + 1 for name in window}}
        if self.gate is not None and (why := self.gate.judge(hop, arrays, merged, keys, self.versions, after)):
            return self._reject(hop, why)
        self.versions.update(after)
        for name in window:
            self.provenance[name] = {"node": node, "round": hop["round"],
                                     "num-examples": int(reported.get("num-examples", 0))}
        # what the node holds now: the segments as they were sent (others may have moved on
        # since, under concurrent hops) and its own window as merged
        self.copies.trained(node, {name: hop["versions_sent"][name] for name in hop["segments_sent"]},
                            {name: self.versions[name] for name in window}, sent, merged)
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

    @property
    def node_ranks(self) -> dict[int, float]:
        """Each known node's rank (its place in the chain)."""
        return self.chain.ranks

    @property
    def membership(self) -> list[dict[str, Any]]:
        """Nodes that joined or left, per round."""
        return self.chain.membership

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
    def _fail(self, hop: dict[str, Any], reason: str) -> tuple[None, None]:
        # The node's copy is now unknown: its next visit resends the whole model.
        self.sent_arrays.pop(hop["round"] - 1, None)
        self.sent_versions.pop(hop["round"] - 1, None)
        self.sent_configs.pop(hop["round"] - 1, None)
        self.copies.forget(hop["node"])
        reason = reason[:300]
        hop["status"], hop["reason"] = "failed", reason
        self.chain.relist()  # the node may have left: list the nodes again at the next hop
        # counted from the last hop sent: with K in flight, hops up to h + K - 1 already went out
        wait = self.backoff.failed(hop["node"], len(self.hops) - 1)
        self.failures.append({"round": hop["round"], "node": hop["node"], "reason": reason,
                              "backoff_hops": wait})
        log(WARNING, "hop %d: node %d failed, global model unchanged, node sits out %d hops: %s",
            hop["round"], hop["node"], wait, reason)
        return None, None

    def _reject(self, hop: dict[str, Any], reason: str) -> tuple[None, None]:
        # The gate rolled the hop back: the model stays as it was, the node's copy (its window as
        # trained) is not the server's, so its next visit resends the whole model.
        assert self.gate is not None
        self.copies.forget(hop["node"])
        hop["status"], hop["reason"] = "rejected", reason
        wait = self.backoff.failed(hop["node"], len(self.hops) - 1) if self.gate.struck_out(hop["node"]) else 0
        self.gate.rejections.append({"round": hop["round"], "node": hop["node"], "reason": reason,
                                     "backoff_hops": wait})
        log(WARNING, "hop %d: node %d's window rolled back by the merge gate, node sits out %d hops: %s",
            hop["round"], hop["node"], wait, reason)
        return None, None

    def _ordered_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Connected nodes in chain order (node ids are new after a resume; ranks are not)."""
        nodes = self.chain.nodes(grid, server_round)
        if self._restored_backoff or self._restored_streaks:
            node_of = {r: n for n, r in self.node_ranks.items()}
            self.backoff.restore(self._restored_backoff, node_of)
            if self.gate is not None:
                self.gate.restore(self._restored_streaks, node_of)
            self._restored_backoff, self._restored_streaks = [], []
        return nodes
