"""OrderedFedAvg: Flower's FedAvg, with the same average whatever order the replies arrive in,
and its download encoded in ``download_dtype`` (the messages only)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies import OrderedFedAvg
from strategies.payload import decode, encode
from strategies.robust import AGGREGATIONS, fedavg_strategy


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


def _configured(strategy: FedAvg, loopback, arrays: ArrayRecord) -> list[Message]:
    grid = loopback([1, 2], lambda msg: None)
    return list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_download_dtype_encodes_the_messages_alone(loopback, aggregation):
    weights = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    arrays = ArrayRecord({"w": Array(weights.copy()), "b": Array(np.ones(4, np.float32))})
    messages = _configured(fedavg_strategy(aggregation, download_dtype="int8"), loopback, arrays)
    assert len(messages) == 2
    for msg in messages:
        assert msg.content["config"]["download-dtype"] == "int8"
        sent = msg.content["arrays"]
        assert (sent["w"].dtype, sent["b"].dtype) == ("int8", "float16")
        assert np.array_equal(decode(sent, "int8")["w"].numpy(), decode(encode(arrays, "int8"), "int8")["w"].numpy())
    assert np.array_equal(arrays["w"].numpy(), weights) and arrays["w"].dtype == "float32"  # the model: as it was
    plain = _configured(fedavg_strategy(aggregation), loopback, arrays)
    assert all(msg.content["arrays"] is arrays and "download-dtype" not in msg.content["config"] for msg in plain)


def test_a_bad_download_dtype_is_refused():
    with pytest.raises(ValueError, match="download_dtype: 'bf16'"):
        OrderedFedAvg(download_dtype="bf16")
