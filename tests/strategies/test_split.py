"""SplitStrategy against an in-process Grid whose nodes run the bottom in plain torch."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Error, MessageType, MetricRecord, RecordDict
from torch import nn

from strategies import SnakeSchedule, SplitStrategy
from strategies.nodes import round_robin

BATCH = 4


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(s0=nn.Sequential(nn.Linear(5, 6), nn.ReLU()),
                                     s1=nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
                                     head=nn.Linear(6, 3)))


def segments(model: nn.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in model.state_dict():
        out.setdefault(key.split(".", 1)[0], []).append(key)
    return out


def data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)


class FakeNodes:
    """Nodes that run the node side of ``train.split``: batch t = rows [4t, 4t+4).

    ``fail`` maps (node, batch) to what to do with that message: ``"error"`` (error
    reply), ``"drop"`` (no reply) or a function that rewrites the reply content.
    """

    def __init__(self, ranks: dict[int, int], cut: int = 1, batches: int = 10) -> None:
        self.ranks, self.cut, self.batches = ranks, cut, batches
        self.fail: dict[tuple[int, int], object] = {}
        self.state: dict[int, dict] = {}

    def __call__(self, msg):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == MessageType.QUERY:
            return RecordDict({"info": MetricRecord({"rank": self.ranks[node]})})
        assert msg.metadata.message_type == "train.split"
        cfg = msg.content["config"]
        t, x, y = int(cfg["split-batch"]), *data(self.ranks[node])
        total = int(cfg["split-steps"]) or self.batches
        action = self.fail.get((node, t))
        if action == "error":
            return Error(code=1, reason="node crashed")
        if action == "drop":
            return None
        if t == 0:
            bottom = make_model()[:int(cfg["split-cut"])]
            bottom.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            opt = torch.optim.SGD(bottom.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                  weight_decay=cfg["weight-decay"])
            self.state[node] = {"bottom": bottom, "opt": opt}
        else:
            bottom, opt = self.state[node]["bottom"], self.state[node]["opt"]
            grads = torch.from_numpy(msg.content["gradients"]["activations"].numpy().copy())
            opt.zero_grad()
            bottom(x[4 * (t - 1):4 * t]).backward(grads)
            if cfg["clip-norm"] > 0:
                nn.utils.clip_grad_norm_(list(bottom.parameters()), cfg["clip-norm"])
            opt.step()
        metrics = MetricRecord({"batches": total, "num-examples": 40})
        if t == total:
            content = RecordDict({"arrays": ArrayRecord(bottom.state_dict()), "metrics": metrics})
        else:
            with torch.no_grad():
                acts = bottom(x[4 * t:4 * t + 4])
            content = RecordDict({"activations": ArrayRecord({"activations": acts}),
                                  "labels": ArrayRecord({"labels": y[4 * t:4 * t + 4]}),
                                  "metrics": metrics})
        return action(content) if callable(action) else content


class Global:
    """What ``Strategy.start`` holds as the global model after each round."""

    def __init__(self) -> None:
        self.history: list[ArrayRecord] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self.history.append(arrays)


def strategy(steps: int = 2, cut: int = 1, **kwargs) -> tuple[SplitStrategy, nn.Sequential]:
    model = make_model()
    kwargs.setdefault("order", "fixed")
    return SplitStrategy(segments(model), cut, copy.deepcopy(model[cut:]), steps, **kwargs), model


def run(loopback, fake: FakeNodes, rounds: int, steps: int = 2, **kwargs):
    split, model = strategy(steps, fake.cut, **kwargs)
    grid = loopback(list(fake.ranks), fake)
    final = Global()
    split.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                train_config=ConfigRecord({"task": "fake"}), evaluate_fn=final)
    return split, final, grid


def state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def assert_same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key


@pytest.mark.parametrize("clip_norm", [0.0, 0.05])
def test_batches_update_both_sides_as_one_process_would(loopback, clip_norm):
    fake = FakeNodes({11: 0})
    split, final, _ = run(loopback, fake, rounds=1, steps=2, clip_norm=clip_norm, lr=0.1)

    reference = make_model()  # same init, same batches, full-model forward, one optimizer
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = data(0)
    for t in range(2):
        opt.zero_grad()
        F.cross_entropy(reference(x[4 * t:4 * t + 4]), y[4 * t:4 * t + 4]).backward()
        if clip_norm:  # each side clips its own gradients: neither sees the other's
            nn.utils.clip_grad_norm_(list(reference[:1].parameters()), clip_norm)
            nn.utils.clip_grad_norm_(list(reference[1:].parameters()), clip_norm)
        opt.step()
    got = state(final.history[-1])
    assert list(got) == list(reference.state_dict())  # the full model, in model order
    for key, value in reference.state_dict().items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    assert not torch.allclose(got["s0.0.weight"], make_model().state_dict()["s0.0.weight"])
    assert split.visits[0]["status"] == "merged" and split.visits[0]["steps"] == 2


def test_messages_carry_weights_first_then_gradients(loopback):
    fake = FakeNodes({11: 0})
    split, _, grid = run(loopback, fake, rounds=1, steps=3)
    sent = [m for m in grid.sent if m.metadata.message_type == "train.split"]
    assert len(sent) == 4  # 3 batches + the last message that collects the bottom
    assert [int(m.content["config"]["split-batch"]) for m in sent] == [0, 1, 2, 3]
    assert set(sent[0].content.array_records) == {"arrays"}
    assert list(sent[0].content["arrays"].keys()) == ["s0.0.weight", "s0.0.bias"]
    for msg in sent[1:]:
        assert set(msg.content.array_records) == {"gradients"}
        assert tuple(msg.content["gradients"]["activations"].shape) == (BATCH, 6)
        assert msg.content["gradients"]["activations"].dtype == "float32"
    assert {m.metadata.group_id for m in sent} == {"1"}


def test_configure_train_sends_nothing_and_aggregate_returns_the_full_model(loopback):
    fake = FakeNodes({11: 0})
    split, model = strategy(steps=1)
    grid = loopback([11], fake)
    arrays = ArrayRecord(model.state_dict())
    assert list(split.configure_train(1, arrays, ConfigRecord(), grid)) == []
    merged, metrics = split.aggregate_train(1, [])
    assert list(merged.keys()) == list(arrays.keys())
    assert metrics["steps"] == 1 and metrics["num-examples"] == 40 and metrics["train-loss"] > 0
    assert split.aggregate_train(1, []) == (None, None)  # the outcome is handed over once


def test_failing_node_costs_only_its_visit(loopback):
    fake = FakeNodes({11: 0, 22: 1, 33: 2})
    fake.fail[(22, 2)] = "error"  # node 22 crashes on its third message
    split, final, _ = run(loopback, fake, rounds=3, steps=3)
    before, after_failure, after_next = final.history[1], final.history[2], final.history[3]
    assert_same(after_failure, before)  # bottom and top exactly as before the visit
    assert [v["status"] for v in split.visits] == ["merged", "failed", "merged"]
    assert [v["node"] for v in split.visits] == [11, 22, 33]
    assert split.failures == [{"round": 2, "node": 22, "steps": 2,
                               "reason": "batch 2: error reply: node crashed"}]
    assert not np.array_equal(after_next["s0.0.weight"].numpy(), before["s0.0.weight"].numpy())
    assert not np.array_equal(after_next["head.weight"].numpy(), before["head.weight"].numpy())


def test_failed_visit_rolls_the_servers_top_back(loopback):
    fake = FakeNodes({11: 0})
    fake.fail[(11, 2)] = "drop"  # no reply: the visit ends after two batches
    split, model = strategy(steps=3, message_timeout=0.1)
    arrays = ArrayRecord(model.state_dict())
    split.configure_train(1, arrays, ConfigRecord(), loopback([11], fake))
    assert split.aggregate_train(1, []) == (None, None)
    assert split.visits[0]["steps"] == 2 and "no reply" in split.failures[0]["reason"]
    for key, value in split.top.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("rewrite, reason", [
    (lambda c: RecordDict({**c, "labels": ArrayRecord({"labels": torch.zeros(3, dtype=torch.int64)})}),
     "do not match labels"),
    (lambda c: RecordDict({**c, "labels": ArrayRecord({"labels": torch.full((4,), 7)})}),
     "rejected activations"),
    (lambda c: RecordDict({"metrics": c["metrics"]}), "malformed reply"),
])
def test_malformed_batches_fail_the_visit(loopback, rewrite, reason):
    fake = FakeNodes({11: 0})
    fake.fail[(11, 1)] = rewrite
    split, _, _ = run(loopback, fake, rounds=1, steps=3)
    assert split.visits[0]["status"] == "failed" and reason in split.failures[0]["reason"]


def test_rejected_bottom_weights_fail_the_visit(loopback):
    fake = FakeNodes({11: 0})
    fake.fail[(11, 2)] = lambda c: RecordDict({"arrays": ArrayRecord({"s0.0.weight": torch.zeros(6, 5)}),
                                               "metrics": c["metrics"]})
    split, final, _ = run(loopback, fake, rounds=1, steps=2)
    assert "rejected bottom weights: missing keys" in split.failures[0]["reason"]
    assert len(final.history) == 2  # start() still ran the round and evaluated


def test_zero_steps_lets_the_node_count_its_batches(loopback):
    fake = FakeNodes({11: 0}, batches=5)
    split, _, grid = run(loopback, fake, rounds=1, steps=0)
    assert split.visits[0]["steps"] == 5
    assert sum(m.metadata.message_type == "train.split" for m in grid.sent) == 6


def test_nodes_take_turns_in_rank_order(loopback):
    fake = FakeNodes({30: 2, 10: 0, 20: 1})
    split, _, _ = run(loopback, fake, rounds=5, steps=1)
    assert [v["node"] for v in split.visits] == [10, 20, 30, 10, 20]


def test_shuffled_order_matches_snakes_node_sequence():
    nodes = [5, 6, 7, 8]
    snake = SnakeSchedule(["a", "b", "c"], 1, order="shuffle", seed=3)
    ours = [round_robin(h, nodes, "shuffle", 3) for h in range(12)]
    assert ours == [snake.node_at(h, nodes) for h in range(12)]
    for cycle in range(3):
        assert sorted(round_robin(h, nodes, "shuffle", 3) for h in range(4 * cycle, 4 * cycle + 4)) == nodes


def test_constructor_checks_cut_top_and_order():
    model = make_model()
    with pytest.raises(ValueError, match="cut"):
        SplitStrategy(segments(model), 3, model[3:], 1)
    with pytest.raises(ValueError, match="top"):
        SplitStrategy(segments(model), 1, model[2:], 1)
    with pytest.raises(ValueError, match="order"):
        SplitStrategy(segments(model), 1, model[1:], 1, order="random")
