"""Fault injection: seeded crashes in the ClientApp, a node that leaves the Grid for good."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from snake_flower.runtime.chaos import ChaosGrid, InjectedFailure, maybe_fail
from snake_flower.runtime.metering import MeteredGrid


def crashes(rate: float, rounds: int = 400, partition: int = 0) -> list[int]:
    out = []
    for r in range(1, rounds + 1):
        try:
            maybe_fail({"fail-rate": rate, "seed": 42, "server-round": r}, partition)
        except InjectedFailure:
            out.append(r)
    return out


def test_fail_rate_is_seeded_and_near_its_rate():
    assert crashes(0.2) == crashes(0.2)  # the same rounds every time
    assert crashes(0.2) != crashes(0.2, partition=1)
    assert 0.15 < len(crashes(0.2)) / 400 < 0.25
    assert crashes(0.0) == []


def test_injected_failure_becomes_an_error_reply_and_costs_the_hop(nodes, loopback):
    from flwr.app import ArrayRecord

    from snake_flower.tasks.task import TASKS, build_model, segment_keys
    from strategies import SnakeStrategy

    model = build_model(TASKS["synthetic"], 0)
    cluster = nodes(3)
    strategy = SnakeStrategy(segment_keys(model), 1, order="fixed", seed=0)
    config = ConfigRecord({"task": "synthetic", "data-dir": "", "partitioner": "iid", "dirichlet-alpha": 0.5,
                           "classes-per-partition": 2, "seed": 42, "local-epochs": 0, "local-steps": 2,
                           "batch-size": 8, "lr": 0.05, "momentum": 0.9, "weight-decay": 0.0,
                           "clip-norm": 1.0, "kd": "off", "kd-weight": 0.7, "kd-temperature": 2.0,
                           "fail-rate": 0.5})
    strategy.start(grid=loopback(list(cluster.contexts), cluster), initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=8, timeout=5.0, train_config=config)
    failed = [h for h in strategy.hops if h["status"] == "failed"]
    assert failed and len(failed) < 8
    assert all("InjectedFailure" in h["reason"] for h in failed)
    assert len(strategy.failures) == len(failed)


def _rank_reply(rank: int) -> RecordDict:
    return RecordDict({"info": MetricRecord({"rank": rank})})


def test_leaving_node_disappears_at_its_round_and_its_reply_is_lost(loopback):
    answers = {}
    grid = loopback([10, 11, 12], lambda msg: answers.get(msg.metadata.message_type, RecordDict()))
    chaos = ChaosGrid(grid, leave_round=3, partition=1)
    metered = MeteredGrid(chaos, poll_interval=0.01)
    for node, rank in ((10, 0), (11, 1), (12, 2)):
        answers[MessageType.QUERY] = _rank_reply(rank)
        query = Message(RecordDict({"config": ConfigRecord({"ask": "rank"})}), dst_node_id=node,
                        message_type=MessageType.QUERY)
        assert len(list(metered.send_and_receive([query], timeout=1.0))) == 1

    def train(node: int, server_round: int) -> list[Message]:
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=node, message_type=MessageType.TRAIN)
        return list(metered.send_and_receive([msg], timeout=0.1))

    assert len(train(11, 2)) == 1 and 11 in chaos.get_node_ids()
    assert train(11, 3) == []  # vanished mid-hop: the server waits out its timeout
    assert sorted(chaos.get_node_ids()) == [10, 12]
    assert len(train(12, 4)) == 1  # the others carry on


def test_chaos_grid_is_only_polled_through_the_meter(loopback):
    with pytest.raises(NotImplementedError, match="MeteredGrid"):
        ChaosGrid(loopback([1], lambda msg: None), 1, 0).send_and_receive([])
