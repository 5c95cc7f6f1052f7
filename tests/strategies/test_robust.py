"""Flower's robust aggregators as FedAvg arms: Flower's own classes, the same bits in every arrival order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum

from strategies.robust import AGGREGATIONS, fedavg_strategy


def _replies(values: list[float]) -> list[Message]:
    replies = []
    for partition, value in enumerate(values):
        sent = Message(RecordDict(), dst_node_id=10 + partition, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, value, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 1, "partition-id": float(partition)})})
        reply = Message(content, reply_to=sent)
        reply.metadata.__dict__["_src_node_id"] = 10 + partition
        replies.append(reply)
    return replies


def _results(strategy: FedAvg, values: list[float]) -> set[bytes]:
    """The aggregate's bits in every arrival order (fresh replies each time: FedMedian and
    FedTrimmedAvg pop the arrays out of the replies they aggregate)."""
    return {strategy.aggregate_train(1, [_replies(values)[i] for i in order])[0]["w"].numpy().tobytes()
            for order in itertools.permutations(range(len(values)))}


ORDER_SENSITIVE = [1e8, 1.0, -1e8, 3.0]  # float32 sums of these depend on their order


@pytest.mark.parametrize(("aggregation", "flower"), [("mean", FedAvg), ("median", FedMedian),
                                                     ("trimmed-mean", FedTrimmedAvg), ("multi-krum", MultiKrum)])
def test_each_aggregation_is_flowers_own_in_partition_order(aggregation, flower):
    strategy = fedavg_strategy(aggregation, krum_select=4)
    assert isinstance(strategy, flower)
    assert len(_results(strategy, ORDER_SENSITIVE)) == 1


def test_krum_breaks_ties_by_partition_not_by_arrival():
    tied = [0.0, 0.0, 10.0, 10.0]  # every reply scores the same: Krum keeps whichever comes first
    assert len(_results(MultiKrum(num_nodes_to_select=1), tied)) == 2  # Flower's own: the arrival order shows
    assert _results(fedavg_strategy("multi-krum"), tied) == {np.zeros(4, np.float32).tobytes()}  # partition 0's


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean", "multi-krum"])
def test_robust_aggregations_shrug_off_one_outlier_that_the_mean_follows(aggregation):
    honest, outlier = [1.0, 1.1, 0.9, 1.05], 1e4

    def aggregate(strategy: FedAvg) -> float:
        return float(strategy.aggregate_train(1, _replies(honest + [outlier]))[0]["w"].numpy()[0])

    value = aggregate(fedavg_strategy(aggregation, trim_beta=0.2, krum_malicious=1, krum_select=3))
    assert min(honest) <= value <= max(honest) and aggregate(fedavg_strategy("mean")) > 100 * max(honest)


def test_an_unknown_aggregation_is_refused_in_one_line():
    with pytest.raises(ValueError, match=f"aggregation: 'mode' is not one of {', '.join(AGGREGATIONS)}"):
        fedavg_strategy("mode")
