"""The Grid of ``snake-flower memory --measure``: one measured node and its chain's other nodes."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from snake_flower.harness.fresh_node import FreshNode


class VisitsDone(Exception):
    """The measured node answered all the train messages it was to be measured on."""


class MeasureGrid(Grid):
    """A ``Grid`` over ``len(node_ids)`` nodes: the first is a real node's process, the others
    answer for themselves.

    Every message the strategy sends to the first node goes to it (``FreshNode``: a
    fresh process per message runs the project's ClientApp). The others are the rest of the
    chain: they answer a rank query with their place in ``node_ids``, and a train message
    with the measured node's last metrics (FedAvg averages replies whose metrics have the
    same keys) and what they were sent, changed (their window's values times 1.001, or for a message
    without a window every array as sent), so that the strategy merges their hops and the
    measured node's next message is what it would be in a run. They train nothing: only
    the first node is measured. Once the first node answered ``visits`` train messages
    the grid raises ``VisitsDone``: the run has given what is measured.

    Parameters
    ----------
    node_ids : Sequence[int]
        The nodes, in chain order; the first is measured.
    node : FreshNode
        The first node (a fresh process per message).
    segments : Mapping[str, Sequence[str]] | None
        The strategy's segments (a window's keys); ``None`` for a strategy without windows.
    visits : int
        The first node's train messages to wait for.
    """

    def __init__(self, node_ids: Sequence[int], node: FreshNode,
                 segments: Mapping[str, Sequence[str]] | None = None, visits: int = 2) -> None:
        self.node_ids, self.node = list(node_ids), node
        self.segments, self.visits = segments, visits
        self._replies: dict[str, Message] = {}

    def set_run(self, run):  # noqa: ANN001, D102 - Grid's own signature
        pass

    @property
    def run(self):  # noqa: ANN201, D102
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201, D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:  # noqa: D102
        ids = []
        # the measured node first: the others' replies copy its metrics' keys (FedAvg wants them alike)
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id != self.node_ids[0]):
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            content = self.node.handle(message) if node == self.node_ids[0] else self._peer(message)
            self._replies[message.metadata.message_id] = Message(content, reply_to=message)
            ids.append(message.metadata.message_id)
            if len(self.node.hops) >= self.visits:
                raise VisitsDone
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:  # noqa: D102
        return self.pull_messages(self.push_messages(messages))

    def _peer(self, message: Message) -> RecordDict | Error:
        """Another node's reply (see the class docstring)."""
        rank = float(self.node_ids.index(message.metadata.dst_node_id))
        if message.metadata.message_type == MessageType.QUERY:
            return RecordDict({"info": MetricRecord({"rank": rank, "num-partitions": float(len(self.node_ids))})})
        config = dict(next(iter(message.content.config_records.values())))
        arrays = next(iter(message.content.array_records.values()))
        measured = [hop["reply"] for hop in self.node.hops]
        reported = dict(next(iter(measured[-1].content.metric_records.values()))) if measured else {}
        metrics = MetricRecord({**reported, "num-examples": 1.0, "train-loss": 0.0, "partition-id": rank})
        if self.segments is None or "window" not in config:  # every array back, as FedAvg's nodes send it
            return RecordDict({"arrays": arrays, "metrics": metrics})
        keys = [key for name in config["window"] for key in self.segments[name]]
        missing = [key for key in keys if key not in arrays]
        if missing:
            return Error(code=1, reason=f"a peer was not sent its window: {missing[:2]}")
        window = ArrayRecord({key: Array(np.asarray(arrays[key].numpy() * np.float32(1.001))) for key in keys})
        return RecordDict({"arrays": window, "metrics": metrics})
