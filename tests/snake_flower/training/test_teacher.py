"""Distillation without a second model: the received window swapped into the student."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from snake_flower.tasks.task import segment_keys, small_cnn
from snake_flower.training.frozen import hold_frozen_in, restore
from snake_flower.training.batches import tensor_batches
from snake_flower.training.loop import (
    LocalWork,
    distillation_loss,
    freeze_outside_keys,
    train_window,
    window_param_keys,
)
from snake_flower.training.teacher import ReceivedTeacher


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return small_cnn()


def _freeze_outside(model: nn.Module, window: list[str]) -> list[nn.Parameter]:
    return freeze_outside_keys(model, window_param_keys(segment_keys(model), window))


def _deep_copy_teacher_hop(model: nn.Module, window: list[str], x, y, work: LocalWork, seed: int) -> list[float]:
    """The hop as it was before: a deep copy of the received model as the teacher."""
    params = _freeze_outside(model, window)
    held = hold_frozen_in(model, work.frozen_dtype)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=work.lr, momentum=work.momentum)
    losses = []
    try:
        for idx in tensor_batches(len(y), work.batch_size, work.steps, work.epochs,
                                  torch.Generator().manual_seed(seed)):
            logits = model(x[idx])
            with torch.no_grad():
                target = teacher(x[idx])
            loss = distillation_loss(logits, target, y[idx], work.kd_weight, work.kd_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, work.clip_norm)
            optimizer.step()
            losses.append(loss.item())
    finally:
        restore(held)
    return losses


@pytest.mark.parametrize("frozen_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("window", [["conv1", "head"], ["conv3", "fc1", "head"]])
def test_kd_loss_and_model_equal_a_deep_copied_teachers(window, frozen_dtype):
    x, y = _data()
    work = LocalWork(steps=4, batch_size=16, kd_weight=0.7, frozen_dtype=frozen_dtype)
    ours, reference = _model(), _model()
    metrics = train_window(ours, window, (x, y), segments=segment_keys(ours), work=work, seed=3)
    losses = _deep_copy_teacher_hop(reference, window, x, y, work, seed=3)
    assert metrics["train-loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6, abs=1e-7)
    for (key, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), key


def test_teacher_uses_the_received_window_in_eval_mode_and_leaves_the_student_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
        body=nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)),
        head=nn.Linear(8, 3)))
    x = torch.randn(16, 6)
    _freeze_outside(model, ["body"])
    received = copy.deepcopy(model).eval()
    teacher = ReceivedTeacher(model)
    with torch.no_grad():  # the student moves: weights and BatchNorm statistics
        model.body[0].weight.add_(1.0)
        model(x)
    assert not torch.equal(model.body[1].running_mean, received.body[1].running_mean)
    assert torch.equal(teacher(x), received(x))
    assert model.body.training and not model.stem.training and model.body[2].training
    assert teacher.window_bytes == 4 * (8 * 8 + 8 + 8 + 8 + 8 + 8) + 8  # weights, BN affine + stats + count
    assert teacher.output_bytes == 16 * 3 * 4


@pytest.mark.parametrize("window", [["conv1", "head"], ["fc1", "head"], ["conv3", "fc1", "head"]])
def test_kd_grows_a_nodes_peak_by_at_most_the_window_and_the_teacher_outputs(window, live_bytes):
    x, y = _data(64)
    work = LocalWork(steps=3, batch_size=32)
    peaks, ledgers = {}, {}
    for kd in (0.0, 0.7):
        model = _model()
        with live_bytes(*model.parameters(), x, y) as live:
            ledgers[kd] = train_window(model, window, (x, y), segments=segment_keys(model),
                                       work=LocalWork(**{**work.__dict__, "kd_weight": kd}), seed=0)
        peaks[kd] = live.peak
    model = _model()
    window_bytes = sum(p.numel() * 4 for name in window for p in getattr(model, name).parameters())
    outputs = work.batch_size * 10 * 4  # one batch of fp32 logits
    assert 0 < peaks[0.7] - peaks[0.0] <= window_bytes + outputs
    # the ledger counts what distillation holds: the received window as frozen parameters,
    # the teacher's outputs as activations
    grown = {key: ledgers[0.7][key] - ledgers[0.0][key] for key in ledgers[0.0]}
    assert grown["frozen-param-bytes"] == window_bytes and grown["activation-bytes"] == outputs
    assert grown["total-bytes"] == window_bytes + outputs


@pytest.mark.parametrize(("finetune", "window"), [("full", ["embed", "layer01"]), ("lora", ["layer01"])])
def test_teacher_of_an_llm_with_tied_embeddings_or_lora_is_the_received_model(finetune, window):
    from snake_flower.tasks.llm import build_segments

    torch.manual_seed(0)
    model = build_segments("tiny-opt", finetune)  # full: the LM head shares embed's matrix
    x = torch.randint(3, 200, (2, 12))
    _freeze_outside(model, window)
    received = copy.deepcopy(model).eval()
    teacher = ReceivedTeacher(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert torch.equal(teacher(x), received(x))
    assert not torch.equal(model.eval()(x), received(x))
