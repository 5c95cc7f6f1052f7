"""OrderedFedAvg: Flower's FedAvg, with the same average whatever order the replies arrive in."""

from __future__ import annotations

import itertools

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies import OrderedFedAvg


def _replies() -> list[Message]:
    # float32 sums of these values depend on their order
    values = [np.float32(1e8), np.float32(1.0), np.float32(-1e8)]
    replies = []
    for partition, value in enumerate(values):
        sent = Message(RecordDict(), dst_node_id=10 + partition, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, value, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 1,
                                                       "partition-id": float(partition)})})
        reply = Message(content, reply_to=sent)
        reply.metadata.__dict__["_src_node_id"] = 10 + partition
        replies.append(reply)
    return replies


def _averages(strategy: FedAvg) -> set[bytes]:
    return {strategy.aggregate_train(1, list(order))[0]["w"].numpy().tobytes()
            for order in itertools.permutations(_replies())}


def test_the_average_is_the_same_in_every_arrival_order():
    assert len(_averages(FedAvg())) > 1  # Flower's FedAvg: the order of arrival shows in the bits
    assert len(_averages(OrderedFedAvg())) == 1
