"""Tasks: models cut into the declared segments; data shapes."""

from __future__ import annotations

import pytest
import torch

from snake_flower.tasks import data
from snake_flower.tasks.task import TASKS, build_model, segment_keys


@pytest.mark.parametrize("name,shape", [("synthetic", (2, 1, 8, 8)), ("fashion-mnist", (2, 1, 28, 28)),
                                        ("vgg11", (2, 3, 32, 32))])
def test_models_have_their_segments_and_run(name, shape):
    task = TASKS[name]
    model = build_model(task, 0)
    assert tuple(segment_keys(model)) == task.segment_names
    assert model(torch.randn(*shape)).shape == (2, 10)


def test_vgg11_is_the_cifar_form_of_torchvision_vgg11():
    model = build_model(TASKS["vgg11"], 0)
    assert sum(p.numel() for p in model.parameters()) == 9_225_610
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) == 8


def test_same_seed_same_initial_weights():
    a, b = (build_model(TASKS["fashion-mnist"], 5).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_built_models_are_independent_seeded_copies():
    task = TASKS["fashion-mnist"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(task, 5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = build_model(task, 5)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # training one copy leaves the next build as seeded
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert torch.equal(next(build_model(task, 5).parameters()), next(b.parameters()))
    c = build_model(task, 6)
    assert not torch.equal(next(c.parameters()), next(b.parameters()))


def test_fashion_mnist_becomes_cifar_shaped(monkeypatch):
    fake = (torch.zeros(4, 1, 28, 28), torch.arange(4), torch.ones(2, 1, 28, 28), torch.arange(2))
    monkeypatch.setattr(data, "load_fashion_mnist", lambda data_dir="": fake)
    x, y, xt, yt = data.load_cifar_shaped.__wrapped__("")
    assert x.shape == (4, 3, 32, 32) and xt.shape == (2, 3, 32, 32)
    assert xt[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0] and xt[0, :, 2, 2].tolist() == [1.0, 1.0, 1.0]
