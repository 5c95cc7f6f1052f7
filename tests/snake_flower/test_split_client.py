"""Split learning end to end: SplitStrategy driving the real ClientApp in-process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.serde import array_record_to_proto
from torch import nn

from snake_flower.config import resolve
from snake_flower.runtime.metering import MeteredGrid
from snake_flower.tasks.data import partition_indices
from snake_flower.tasks.task import TASKS, build_model, segment_keys
from strategies import SplitStrategy

TASK = TASKS["synthetic"]
CUT = 2  # conv1+conv2 on the node: activations of 8 x 4 x 4 per example


def config(**overrides) -> dict:
    return resolve({"task": "synthetic", "partitioner": "iid", "batch-size": 16, **overrides})


def split_run(loopback, nodes, *, steps: int, rounds: int = 1, wrap=None, **kwargs):
    cfg = config()
    model = build_model(TASK, cfg["seed"])
    strategy = SplitStrategy(segment_keys(model), CUT, model[CUT:], steps, order="fixed",
                             seed=cfg["seed"], lr=cfg["lr"], momentum=cfg["momentum"], **kwargs)
    grid = loopback(list(nodes.contexts), nodes)
    grid = wrap(grid) if wrap else grid
    history: list[ArrayRecord] = []
    strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(TASK, cfg["seed"]).state_dict()),
                   num_rounds=rounds, train_config=ConfigRecord(cfg),
                   evaluate_fn=lambda r, arrays: history.append(arrays))
    return strategy, grid, history


def first_batches(cfg: dict, steps: int, server_round: int = 1) -> list[torch.Tensor]:
    """Partition 0 of 2, then the node's batches: a seeded permutation cut into batches."""
    _, y, _, _ = TASK.load("")
    idx = torch.from_numpy(partition_indices(y, "iid", 2, 0, seed=cfg["seed"]))
    gen = torch.Generator().manual_seed(cfg["seed"] * 100_003 + server_round)
    order = torch.randperm(len(idx), generator=gen)
    return [idx[order[t * cfg["batch-size"]:(t + 1) * cfg["batch-size"]]] for t in range(steps)]


@pytest.mark.parametrize("clip_norm", [0.0, 0.5])
def test_split_batches_match_one_process_training(loopback, nodes, clip_norm):
    cfg = config()
    strategy, _, history = split_run(loopback, nodes(2), steps=2, clip_norm=clip_norm)
    assert [v["status"] for v in strategy.visits] == ["merged"]

    x, y, _, _ = TASK.load("")
    reference = build_model(TASK, cfg["seed"])  # same init, same batches, whole model at once
    opt = torch.optim.SGD(reference.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    for rows in first_batches(cfg, 2):
        opt.zero_grad()
        F.cross_entropy(reference(x[rows]), y[rows]).backward()
        if clip_norm:  # each side clips its own gradient norm
            nn.utils.clip_grad_norm_(list(reference[:CUT].parameters()), clip_norm)
            nn.utils.clip_grad_norm_(list(reference[CUT:].parameters()), clip_norm)
        opt.step()
    got = history[-1].to_torch_state_dict()
    assert list(got) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    initial = history[0].to_torch_state_dict()
    assert not torch.equal(got["conv1.0.weight"], initial["conv1.0.weight"])  # bottom trained
    assert not torch.equal(got["head.weight"], initial["head.weight"])  # top trained


def test_counted_array_bytes_are_the_activations_gradients_labels_and_weights(loopback, nodes):
    steps, cfg = 3, config()
    strategy, metered, _ = split_run(loopback, nodes(2), steps=steps, wrap=MeteredGrid)
    tally = metered.current
    bottom = build_model(TASK, cfg["seed"])[:CUT].state_dict()
    activations = torch.zeros(cfg["batch-size"], 8, 4, 4)
    size = {  # serialized size depends only on keys, shapes and dtypes
        "weights": array_record_to_proto(ArrayRecord(bottom)).ByteSize(),
        "activations": array_record_to_proto(ArrayRecord({"activations": activations})).ByteSize(),
        "gradients": array_record_to_proto(ArrayRecord({"activations": activations})).ByteSize(),
        "labels": array_record_to_proto(ArrayRecord(
            {"labels": torch.zeros(cfg["batch-size"], dtype=torch.int64)})).ByteSize(),
    }
    assert tally.down.messages == tally.up.messages == steps + 1
    assert tally.down.array_bytes == size["weights"] + steps * size["gradients"]
    assert tally.up.array_bytes == size["weights"] + steps * (size["activations"] + size["labels"])
    raw_weights = sum(t.numel() * 4 for t in bottom.values())
    raw_batch = activations.numel() * 4
    assert tally.down.raw_bytes == raw_weights + steps * raw_batch
    assert tally.up.raw_bytes == raw_weights + steps * (raw_batch + cfg["batch-size"] * 8)
    assert tally.control.messages == 4  # 2 rank queries and their replies, apart from the model traffic
    assert strategy.visits[0]["steps"] == steps


def test_failing_node_costs_only_its_visit(loopback, nodes):
    fleet = nodes(3)
    second = list(fleet.contexts)[1]
    calls = {"n": 0}

    def crash_on_second_batch(content: RecordDict, node: int):
        if node == second and "activations" in content:
            calls["n"] += 1
            if calls["n"] == 2:
                return Error(code=1, reason="node crashed")
        return content

    fleet.tamper = crash_on_second_batch
    strategy, _, history = split_run(loopback, fleet, steps=2, rounds=4)
    assert [v["status"] for v in strategy.visits] == ["merged", "failed", "merged", "merged"]
    assert strategy.failures[0]["steps"] == 1 and "node crashed" in strategy.failures[0]["reason"]
    before, after = history[1].to_torch_state_dict(), history[2].to_torch_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the fourth visit is node 0's second one: it starts over from the relayed bottom
    assert strategy.visits[3]["node"] == list(fleet.contexts)[0]


def test_node_state_is_kept_during_a_visit_and_cleared_after(loopback, nodes):
    fleet = nodes(1)
    node = list(fleet.contexts)[0]
    seen: list[set[str]] = []

    def watch(content: RecordDict, _: int) -> RecordDict:
        if "info" not in content:  # not the rank query
            seen.append(set(fleet.contexts[node].state.keys()))
        return content

    fleet.tamper = watch
    strategy, _, _ = split_run(loopback, fleet, steps=2)
    assert seen[:2] == [{"split-bottom", "split-momentum", "split-visit"}] * 2
    assert seen[2] == set() and not fleet.contexts[node].state.keys()
    metrics = strategy.visits[0]["metrics"]
    assert metrics["partition-id"] == 0 and metrics["steps"] == 2
    assert metrics["trainable-param-bytes"] > 0 and metrics["activation-bytes"] > 0


def test_out_of_order_message_is_an_error_reply(nodes):
    fleet = nodes(1)
    cfg = ConfigRecord({**config(), "server-round": 1, "split-batch": 1, "split-steps": 2, "split-cut": CUT})
    grads = ArrayRecord({"activations": torch.zeros(16, 8, 4, 4)})
    msg = Message(RecordDict({"config": cfg, "gradients": grads}), dst_node_id=list(fleet.contexts)[0],
                  message_type="train.split")
    assert "state is at round None" in fleet(msg).reason


def test_a_visit_builds_its_bottom_once_not_per_batch(loopback, nodes, monkeypatch):
    import snake_flower.split_client as split_client

    built = []
    real = split_client.build_model
    monkeypatch.setattr(split_client, "build_model", lambda *args: built.append(args) or real(*args))
    strategy, _, _ = split_run(loopback, nodes(1), steps=3)
    assert [v["status"] for v in strategy.visits] == ["merged"]
    assert len(built) == 1  # 4 messages (3 batches and the last gradients), one bottom
