"""Window training: frozen layers untouched, window trained, KD, clipping, ledger."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snake_flower.tasks.task import TASKS, build_model, segment_keys
from snake_flower.training.loop import LocalWork, SavedActivations, distillation_loss, evaluate, train_window

TASK = TASKS["synthetic"]


@pytest.fixture(scope="module")
def data():
    return TASK.load("")


def test_frozen_segments_are_bit_identical(data):
    x, y, _, _ = data
    model = build_model(TASK, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_window(model, ["conv2", "head"], (x, y), segments=segment_keys(model),
                 work=LocalWork(epochs=1, kd_weight=0.5), seed=1)
    after = model.state_dict()
    for name, keys in segment_keys(model).items():
        for key in keys:
            same = torch.equal(before[key], after[key])
            assert same == (name not in ("conv2", "head")), key


def test_full_window_learns_the_synthetic_task(data):
    x, y, xt, yt = data
    model = build_model(TASK, 0)
    start = evaluate(model, xt, yt)["accuracy"]
    for epoch in range(4):
        train_window(model, TASK.segment_names, (x, y), segments=segment_keys(model),
                     work=LocalWork(epochs=1, lr=0.05), seed=epoch)
    assert start < 0.2 and evaluate(model, xt, yt)["accuracy"] > 0.8


def test_local_steps_override_epochs(data):
    x, y, _, _ = data
    model = build_model(TASK, 0)
    metrics = train_window(model, ["head"], (x, y), segments=segment_keys(model), work=LocalWork(epochs=5, steps=7))
    assert metrics["steps"] == 7 and metrics["num-examples"] == len(y)


def test_same_seed_same_result(data):
    x, y, _, _ = data
    runs = []
    for _ in range(2):
        model = build_model(TASK, 3)
        train_window(model, ["fc1", "head"], (x, y), segments=segment_keys(model),
                     work=LocalWork(epochs=1, kd_weight=0.3), seed=9)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_distillation_loss_matches_its_definition():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(distillation_loss(s, t, y, 0.0, 2.0), F.cross_entropy(s, y))
    p_t = F.softmax(t / 2.0, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2.0, -1))).sum(-1).mean()
    expected = 0.7 * F.cross_entropy(s, y) + 0.3 * 4.0 * kl
    assert torch.allclose(distillation_loss(s, t, y, 0.3, 2.0), expected, atol=1e-6)


def test_clipping_bounds_each_update(data):
    x, y, _, _ = data
    model = build_model(TASK, 0)
    before = model.head.weight.detach().clone()
    work = LocalWork(steps=1, lr=1.0, momentum=0.0, clip_norm=0.01)
    train_window(model, ["head"], (x * 50, y), segments=segment_keys(model), work=work, seed=0)
    head = torch.cat([(model.head.weight - before).flatten()])
    assert head.norm() <= 0.01 + 1e-6


def test_ledger_counts_only_the_window_as_trainable(data):
    x, y, _, _ = data
    model = build_model(TASK, 0)
    m = train_window(model, ["fc1"], (x, y), segments=segment_keys(model), work=LocalWork(steps=2), seed=0)
    fc1 = sum(p.numel() * 4 for p in model.fc1.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    assert m["trainable-param-bytes"] == fc1 == m["grad-bytes"] == m["optimizer-bytes"]
    assert m["frozen-param-bytes"] == total - fc1
    assert m["activation-bytes"] > 0 and m["peak-rss-bytes"] > 0


def test_frozen_weights_autograd_saves_are_not_activations():
    # Downstream of the window, autograd saves the frozen weights to pass the gradient back.
    # They are frozen-param-bytes already; counting them again as activations doubled them.
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(stem=nn.Linear(16, 16), body=nn.Linear(16, 2048),
                                      head=nn.Linear(2048, 10)))
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    m = train_window(model, ["stem"], (x, y), segments=segment_keys(model),
                     work=LocalWork(steps=2, batch_size=4), seed=0)
    # the one activation: the stem's input batch, which its weight gradient needs
    assert m["activation-bytes"] == 4 * 16 * 4
    assert m["frozen-param-bytes"] == (16 * 2048 + 2048 + 2048 * 10 + 10) * 4
    assert m["total-bytes"] == sum(m[k] for k in ("trainable-param-bytes", "frozen-param-bytes",
                                                  "grad-bytes", "optimizer-bytes", "activation-bytes"))


def test_a_saved_view_of_a_parameter_is_not_an_activation():
    weight = nn.Parameter(torch.randn(64, 32), requires_grad=False)
    x = torch.randn(4, 64, requires_grad=True)
    meter = SavedActivations([weight])
    with meter:
        (x @ weight[:, 8:]).sum()  # autograd saves the slice: another data_ptr, the same storage
    assert meter.peak == 0
    with meter:
        (x.exp() @ weight).sum()  # exp saves its output: a real activation
    assert meter.peak == 4 * 64 * 4


def test_cosine_lr_falls_from_lr_to_the_floor():
    from snake_flower.training.loop import scheduled_lr

    lrs = [scheduled_lr(0.05, r, 128, "cosine", 0.1) for r in range(1, 129)]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.005)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[63] == pytest.approx(0.05 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 63 / 127))))
    assert scheduled_lr(0.05, 100, 128, "none", 0.1) == 0.05
    with pytest.raises(ValueError, match="lr-decay"):
        scheduled_lr(0.05, 2, 10, "step")


def test_local_work_takes_this_visits_lr_and_fedavg_its_own_rounds():
    config = {"local-epochs": 1, "local-steps": 0, "batch-size": 8, "lr": 0.1, "momentum": 0.0,
              "weight-decay": 0.0, "clip-norm": 0.0, "kd-weight": 0.5, "kd-temperature": 2.0,
              "lr-decay": "cosine", "lr-floor": 0.1, "num-server-rounds": 128, "server-round": 16}
    assert LocalWork.from_config(config, kd=False).lr > 0.09  # hop 16 of 128: early
    assert LocalWork.from_config({**config, "lr-rounds": 16}, kd=False).lr == pytest.approx(0.01)  # FedAvg's last
