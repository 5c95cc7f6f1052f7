"""Vanilla (relay) split learning as a Flower Message-API strategy.

The model is cut after segment ``cut``: each node holds the bottom (segments
``[:cut]``), the server the top (``[cut:]``). One server round is one node visit,
and the strategy drives the whole visit from ``configure_train``, one round trip per
batch (message type ``"train.split"``, pipelined):

- message t carries the bottom weights (on t = 0: the relayed bottom), the gradients
  of the loss with respect to batch t-1's activations (t > 0) and the batch number;
- the node applies those gradients to its bottom and replies with the cut-layer
  activations and labels of batch t;
- the server runs the top forward, the cross-entropy loss, the backward and an SGD
  step on the top, and keeps the activations' gradients for message t+1;
- after ``steps`` batches a last message delivers the last gradients and asks for the
  trained bottom, which becomes the global bottom (relayed to the next node).

``configure_train`` then returns no message, so ``Strategy.start`` sends nothing and
calls ``aggregate_train`` with no replies; that returns the full model (trained bottom
+ top), which ``start`` keeps as the global arrays for ``evaluate_fn``.

A visit fails on an error reply, a missing reply or a malformed one. A failed visit
costs only itself: the global model stays exactly as before it, bottom *and* top (the
top's updates from the visit's completed batches are rolled back), and the next
round visits the next node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from torch import nn

from .nodes import ordered_nodes, round_robin
from .schedule import ORDERS
from .window import check_window, merge_window, select, window_keys

SPLIT = MessageType.TRAIN + ".split"


class VisitFailed(RuntimeError):
    """A visit ends early; nothing from it is merged."""


class SplitStrategy(Strategy):
    """Relay split learning: nodes train the bottom in turn, the server trains the top.

    Parameters
    ----------
    segments : Mapping[str, Sequence[str]]
        Segment name -> its ``state_dict`` keys, input to output (from the caller).
    cut : int
        Number of bottom segments (``1 <= cut < len(segments)``).
    top : torch.nn.Module
        The server's part: segments ``[cut:]``, with exactly their ``state_dict`` keys
        (e.g. ``model[cut:]`` of the task's ``nn.Sequential``). Its weights are loaded
        from the global arrays at the start of every visit.
    steps : int
        Batches per node visit; 0 lets each node use its local epochs (it reports how
        many batches that makes).
    lr, momentum, weight_decay, clip_norm : float
        SGD of both sides, sent to the node with every message. Each visit starts a
        fresh optimizer on either side; each side clips its own gradient norm
        (``clip_norm = 0`` disables clipping).
    lr_at : Callable[[int], float], optional
        The server side's learning rate at each visit (round); default ``lr`` always.
        The node derives its own from the config it is sent, by the same rule.
    order : str (default: "shuffle")
        ``"fixed"`` (round robin in the nodes' stable order) or ``"shuffle"`` (a seeded
        permutation per cycle, the same as ``SnakeSchedule``'s).
    seed : int (default: 0)
        Seed of the shuffled order.
    min_nodes : int (default: 1)
        Nodes that must be connected before the first visit; later visits go on
        with whoever is connected.
    query_timeout : float (default: 60.0)
        Seconds to wait for new nodes to report their rank.
    message_timeout : float (default: 600.0)
        Seconds to wait for the node's reply to each message of a visit.
    activation_meter : Callable[[list[nn.Parameter]], ContextManager] | None (default: None)
        Given the top's parameters, a context manager with a ``.peak`` attribute (bytes
        autograd saved in the forward passes it wrapped); the top's forward passes run
        inside it and ``server_activation_peak`` reads its peak. ``server_optimizer``
        is the optimizer of the last completed visit, for the server side's ledger.
    arrayrecord_key, configrecord_key : str
        Keys of the weights and config records in the messages, as in Flower's ``FedAvg``.
    """

    def __init__(self, segments: Mapping[str, Sequence[str]], cut: int, top: nn.Module, steps: int, *,
                 lr: float = 0.05, lr_at: Callable[[int], float] | None = None,
                 momentum: float = 0.9, weight_decay: float = 0.0,
                 clip_norm: float = 1.0, order: str = "shuffle", seed: int = 0, min_nodes: int = 1,
                 query_timeout: float = 60.0, message_timeout: float = 600.0,
                 activation_meter: Callable[[list[nn.Parameter]], Any] | None = None,
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config") -> None:
        self.segments = {name: list(keys) for name, keys in segments.items()}
        names = list(self.segments)
        if not 1 <= cut < len(names):
            raise ValueError(f"cut: {cut} leaves no bottom or no top of {len(names)} segments")
        if steps < 0:
            raise ValueError(f"steps: {steps} is negative")
        if order not in ORDERS:
            raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
        self.cut, self.bottom_segments, self.top_segments = cut, names[:cut], names[cut:]
        self.bottom_keys = window_keys(self.segments, self.bottom_segments)
        self.top_keys = window_keys(self.segments, self.top_segments)
        if set(top.state_dict()) != set(self.top_keys):
            raise ValueError(f"top: its state_dict keys are not those of segments {self.top_segments}")
        self.top, self.steps = top, steps
        self.lr, self.momentum, self.weight_decay, self.clip_norm = lr, momentum, weight_decay, clip_norm
        self.lr_at = lr_at or (lambda server_round: lr)
        self.order, self.seed, self.min_nodes = order, seed, min_nodes
        self.query_timeout, self.message_timeout = query_timeout, message_timeout
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key
        self.node_ranks: dict[int, float] = {}  # stable order of nodes, reported by them
        self.visits: list[dict[str, Any]] = []  # one row per round: node, steps, outcome
        self.failures: list[dict[str, Any]] = []
        self._result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        # the server side's memory: one meter (the caller's, a context manager with
        # ``.peak``) around every top forward pass, and the last visit's optimizer
        self._meter = activation_meter(list(top.parameters())) if activation_meter else None
        self.server_optimizer: torch.optim.Optimizer | None = None

    @property
    def server_activation_peak(self) -> int:
        """Most bytes saved for backward in one top forward pass so far (0 without a meter)."""
        return int(self._meter.peak) if self._meter is not None else 0

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├── SplitStrategy: cut after %s (nodes: %s; server: %s)", self.bottom_segments[-1],
            "+".join(self.bottom_segments), "+".join(self.top_segments))
        log(INFO, "\t└── %s batches per visit, %s order, SGD lr %g momentum %g clip %g",
            self.steps or "local-epochs", self.order, self.lr, self.momentum, self.clip_norm)

    # ---- training: the whole visit runs here -------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Run one node's visit batch by batch; return no message for ``start`` to send."""
        node = round_robin(server_round - 1, self._ordered_nodes(grid), self.order, self.seed)
        visit: dict[str, Any] = {"round": server_round, "node": node, "steps": 0, "status": "running",
                                 "started": time.time()}
        self.visits.append(visit)
        log(INFO, "visit %d: node %d trains %s", server_round, node, "+".join(self.bottom_segments))
        missing = [key for key in self.bottom_keys + self.top_keys if key not in arrays]
        if missing:
            raise KeyError(f"global arrays lack keys {missing[:3]}")
        self.top.load_state_dict(_torch(select(arrays, self.top_keys)))
        try:
            bottom, metrics = self._visit(visit, grid, select(arrays, self.bottom_keys), config)
        except VisitFailed as err:
            self._result = self._fail(visit, arrays, str(err))
            return []
        trained = ArrayRecord({**dict(bottom.items()), **dict(ArrayRecord(self.top.state_dict()).items())})
        visit.update(status="merged", seconds=time.time() - visit["started"], metrics=metrics)
        self._result = merge_window(arrays, trained), MetricRecord(
            {"train-loss": visit["train-loss"], "steps": float(visit["steps"]),
             "num-examples": float(metrics.get("num-examples", 0.0))})
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The visit's outcome: the full model (trained bottom + top), or ``None`` if it failed."""
        stray = list(replies)
        if stray:  # configure_train sends nothing through start(); replies here are not ours
            log(WARNING, "visit %d: ignoring %d unexpected replies", server_round, len(stray))
        result, self._result = self._result, (None, None)
        return result

    # ---- evaluation is centralized (ServerApp's evaluate_fn) ---------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Split learning evaluates centrally on the server; no node is asked."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None

    # ---- the protocol ------------------------------------------------------
    def _visit(self, visit: dict[str, Any], grid: Grid, bottom: ArrayRecord, config: ConfigRecord
               ) -> tuple[ArrayRecord, dict[str, float]]:
        """Drive one visit; return the node's trained bottom and its final metrics."""
        params = list(self.top.parameters())
        optimizer = torch.optim.SGD(params, lr=self.lr_at(visit["round"]), momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        self.top.train()
        total: int | None = self.steps or None
        grads: torch.Tensor | None = None
        loss_sum, batch = 0.0, 0
        try:
            while True:
                content = RecordDict({self.configrecord_key: self._config(config, visit["round"], batch)})
                if batch == 0:
                    content[self.arrayrecord_key] = bottom
                if grads is not None:
                    content["gradients"] = ArrayRecord({"activations": grads})
                reply = self._exchange(grid, visit["node"], content, visit["round"], batch)
                batches = int(_metrics(reply).get("batches", -1))
                if total is None:
                    total = batches
                if batches != total:
                    raise VisitFailed(f"batch {batch}: node counts {batches} batches, expected {total}")
                if batch == total:
                    trained = self._trained_bottom(reply, bottom, batch)
                    self.server_optimizer = optimizer  # the server's state after a whole visit
                    return trained, _metrics(reply)
                activations, labels = _batch(reply, batch)
                began = time.process_time()  # CPU time: the server shares its cores
                grads, loss = self._top_step(activations, labels, optimizer, params, batch)
                visit["server-seconds"] = visit.get("server-seconds", 0.0) + time.process_time() - began
                loss_sum, batch = loss_sum + loss, batch + 1
                visit["steps"] = batch
        finally:
            visit["train-loss"] = loss_sum / max(batch, 1)
            self.top.eval()

    def _config(self, config: ConfigRecord, server_round: int, batch: int) -> ConfigRecord:
        cfg = ConfigRecord(dict(config))
        cfg.update({"server-round": server_round, "split-batch": batch, "split-steps": self.steps,
                    "split-cut": self.cut, "lr": self.lr, "momentum": self.momentum,
                    "weight-decay": self.weight_decay, "clip-norm": self.clip_norm})
        return cfg

    def _exchange(self, grid: Grid, node: int, content: RecordDict, server_round: int,
                  batch: int) -> Message:
        """Send one message of the visit and return the node's valid reply."""
        msg = Message(content, dst_node_id=node, message_type=SPLIT, group_id=str(server_round))
        replies = [r for r in grid.send_and_receive([msg], timeout=self.message_timeout)
                   if r.metadata.src_node_id == node]
        if not replies:
            raise VisitFailed(f"batch {batch}: no reply within {self.message_timeout:g} s")
        if replies[0].has_error():
            raise VisitFailed(f"batch {batch}: error reply: {replies[0].error.reason}")
        return replies[0]

    def _top_step(self, activations: torch.Tensor, labels: torch.Tensor,
                  optimizer: torch.optim.Optimizer, params: list[nn.Parameter], batch: int
                  ) -> tuple[torch.Tensor, float]:
        """Top forward, loss, backward and SGD step; return the activations' gradients."""
        activations.requires_grad_(True)
        try:
            with self._meter if self._meter is not None else nullcontext():
                loss = F.cross_entropy(self.top(activations), labels)
        except (RuntimeError, ValueError, IndexError) as err:  # wrong shape, label out of range
            raise VisitFailed(f"batch {batch}: rejected activations ({type(err).__name__}: {err})") from None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm > 0:
            nn.utils.clip_grad_norm_(params, self.clip_norm)
        optimizer.step()
        assert activations.grad is not None
        return activations.grad.detach(), loss.item()

    def _trained_bottom(self, reply: Message, sent: ArrayRecord, batch: int) -> ArrayRecord:
        bottom = reply.content.array_records.get(self.arrayrecord_key)
        reason = check_window(bottom, sent, self.bottom_keys)
        if reason is not None:
            raise VisitFailed(f"batch {batch}: rejected bottom weights: {reason}")
        assert bottom is not None
        return bottom

    # ---- helpers -----------------------------------------------------------
    def _fail(self, visit: dict[str, Any], arrays: ArrayRecord, reason: str) -> tuple[None, None]:
        self.top.load_state_dict(_torch(select(arrays, self.top_keys)))  # roll the top back
        visit.update(status="failed", reason=reason, seconds=time.time() - visit["started"])
        self.failures.append({"round": visit["round"], "node": visit["node"], "steps": visit["steps"],
                              "reason": reason})
        log(WARNING, "visit %d: node %d failed after %d batches, global model unchanged: %s",
            visit["round"], visit["node"], visit["steps"], reason)
        return None, None

    def _ordered_nodes(self, grid: Grid) -> list[int]:
        first = not self.node_ranks  # once started, a node that left must not stall the run
        return ordered_nodes(grid, self.node_ranks, min_nodes=self.min_nodes if first else 1,
                             query_timeout=self.query_timeout, configrecord_key=self.configrecord_key)


def _torch(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def _metrics(reply: Message) -> dict[str, float]:
    return {k: v for record in reply.content.metric_records.values() for k, v in record.items()}


def _batch(reply: Message, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reply's activations (float32) and labels (int64), checked against each other."""
    records = reply.content.array_records
    try:
        activations = np.array(records["activations"]["activations"].numpy(), copy=True)
        labels = np.array(records["labels"]["labels"].numpy(), copy=True)
    except Exception as err:  # missing or undecodable records are a malformed reply
        raise VisitFailed(f"batch {batch}: malformed reply ({type(err).__name__}: {err})") from None
    if activations.dtype != np.float32 or labels.dtype != np.int64 or labels.ndim != 1 \
            or activations.ndim < 1 or len(labels) != len(activations) or not len(labels):
        raise VisitFailed(f"batch {batch}: activations {activations.dtype}{list(activations.shape)} "
                          f"do not match labels {labels.dtype}{list(labels.shape)}")
    if not np.isfinite(activations).all():
        raise VisitFailed(f"batch {batch}: non-finite activations")
    return torch.from_numpy(activations), torch.from_numpy(labels)
