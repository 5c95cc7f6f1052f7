"""MeteredGrid: bytes each way, per node and round; control traffic apart."""

from __future__ import annotations

import time

import pytest
import torch

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from snake_flower.runtime import metering
from snake_flower.runtime.metering import MeteredGrid, Sizes, array_bytes, content_bytes, raw_tensor_bytes
from snake_flower.tasks.task import TASKS, build_model


def _model_record(task: str = "synthetic") -> ArrayRecord:
    return ArrayRecord(build_model(TASKS[task], 0).state_dict())


def test_counts_each_direction_per_node_and_round(loopback):
    reply = RecordDict({"metrics": MetricRecord({"loss": 1.5})})
    grid = MeteredGrid(loopback([1, 2], lambda msg: reply))
    down = RecordDict({"arrays": _model_record(), "config": ConfigRecord({"lr": 0.1})})
    msgs = [Message(down, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    assert len(list(grid.send_and_receive(msgs, timeout=1.0))) == 2
    first = grid.close_round()
    assert first.down.bytes == 2 * content_bytes(down) and first.down.messages == 2
    assert first.down_by_node[1].bytes == first.down_by_node[2].bytes == content_bytes(down)
    assert first.up.bytes == 2 * content_bytes(reply)
    assert first.down.array_bytes == 2 * array_bytes(down)
    assert grid.current.down.bytes == 0 and grid.rounds == [first]


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
def test_sizes_are_flowers_serialized_sizes_at_every_varint_boundary(length):
    def data(n):
        return Array(dtype="uint8", shape=(n,), stype="raw", data=b"\0" * n)

    content = RecordDict({"a": ArrayRecord({"w": data(length), "b": Array(torch.ones(3, 5))}),
                          "empty": ArrayRecord(), "m": MetricRecord({"x": 1.0}),
                          "c": ConfigRecord({"s": "t" * 200}), "z": ArrayRecord({"k" * 300: data(length)})})
    sizes = Sizes.of(content)
    assert (sizes.bytes, sizes.array_bytes) == (content_bytes(content), array_bytes(content))


def test_a_message_is_serialized_once_and_counted_as_flower_serializes_it(loopback, monkeypatch):
    two = RecordDict({"arrays": _model_record(), "more": ArrayRecord({"w": torch.zeros(300, 7)}),
                      "metrics": MetricRecord({"loss": 1.5}), "config": ConfigRecord({"lr": 0.1})})
    sizes = Sizes.of(two)
    assert (sizes.bytes, sizes.array_bytes) == (content_bytes(two), array_bytes(two))
    assert sizes.raw_bytes == sum(raw_tensor_bytes(r) for r in two.array_records.values())
    calls = []
    serialize = metering.recorddict_to_proto
    monkeypatch.setattr(metering, "recorddict_to_proto", lambda c: calls.append(1) or serialize(c))
    grid = MeteredGrid(loopback([1], lambda msg: None), poll_interval=0.01)
    grid.send_and_receive([Message(two, dst_node_id=1, message_type=MessageType.TRAIN)], timeout=0.05)
    assert len(calls) == 1  # counted in the round's tally and the node's from one serialization
    assert grid.current.down.bytes == grid.current.down_by_node[1].bytes == sizes.bytes


def test_queries_are_control_traffic(loopback):
    grid = MeteredGrid(loopback([1], lambda msg: RecordDict({"info": MetricRecord({"rank": 0})})))
    ask = RecordDict({"config": ConfigRecord({"ask": "rank"})})
    grid.send_and_receive([Message(ask, dst_node_id=1, message_type=MessageType.QUERY)], timeout=1.0)
    assert grid.current.down.bytes == grid.current.up.bytes == 0
    assert grid.current.control.messages == 2 and grid.current.control.bytes > 0


def test_timeout_returns_what_arrived(loopback):
    grid = MeteredGrid(loopback([1], lambda msg: None), poll_interval=0.01)
    msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    assert list(grid.send_and_receive([msg], timeout=0.05)) == []


def test_fashion_model_framing_overhead_is_small():
    record = _model_record("fashion-mnist")
    counted = array_bytes(RecordDict({"arrays": record}))
    raw = raw_tensor_bytes(record)
    assert raw == 4 * sum(p.numel() for p in build_model(TASKS["fashion-mnist"], 0).parameters())
    assert 1.0 < counted / raw <= 1.05


def test_flower_poll_interval_is_the_wrapped_grids_cadence(loopback):
    from snake_flower.runtime.metering import flower_poll_interval

    grid = loopback([1], lambda msg: None)
    assert flower_poll_interval(grid) == 3.0  # no pull_interval: HttpGrid's hard-coded 3 s
    grid.pull_interval = 0.1  # as InMemoryGrid has
    assert flower_poll_interval(grid) == 0.1
    assert flower_poll_interval(MeteredGrid(MeteredGrid(grid))) == 0.1  # seen through our wrappers
    pulls = []
    pull = grid.pull_messages
    grid.pull_messages = lambda ids: pulls.append(time.time()) or pull(ids)
    message = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    MeteredGrid(grid, poll_interval=0.05, first_poll=0.05).send_and_receive([message], timeout=0.12)
    fixed = len(pulls)
    assert 3 <= fixed <= 4  # at 0, 0.05, 0.10 (and 0.15): whole intervals
    pulls.clear()
    message = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    MeteredGrid(grid, poll_interval=0.05).send_and_receive([message], timeout=0.12)
    assert len(pulls) > fixed  # the default backoff starts at 2 ms


def test_overlapping_hops_are_tallied_each_under_its_own_group(loopback):
    # two hops in flight: hop 2 is sent before hop 1's reply is pulled, and its reply comes first
    grid = MeteredGrid(loopback([1, 2], lambda msg: RecordDict({"arrays": msg.content["arrays"]})))
    grid.by_group = True
    record = _model_record()
    small = ArrayRecord({key: record[key] for key in list(record.keys())[:1]})
    one = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")
    two = Message(RecordDict({"arrays": small}), dst_node_id=2, message_type=MessageType.TRAIN, group_id="2")
    [first] = grid.push_messages([one])
    [second] = grid.push_messages([two])
    grid.pull_messages([second])
    grid.pull_messages([first])
    hop1, hop2 = grid.close_round("1"), grid.close_round("2")
    assert hop1.down.bytes == hop1.up.bytes == content_bytes(RecordDict({"arrays": record}))
    assert hop2.down.bytes == hop2.up.bytes == content_bytes(RecordDict({"arrays": small}))
    assert hop1.down_by_node.keys() == {1} and hop2.up_by_node.keys() == {2}
    assert not grid.groups
