"""A node's model built on the meta device and filled by its loads equals the seeded build."""

from __future__ import annotations

import pytest
import torch

from snake_flower.client_app import task_model
from snake_flower.config import resolve
from snake_flower.node_model import ModelBuilder


@pytest.mark.parametrize("overrides", [{"task": "synthetic"}, {"task": "llm", "model": "tiny-opt", "window": 1}])
def test_a_meta_build_loaded_with_every_key_equals_the_seeded_build(overrides):
    cfg = resolve(overrides)
    real = task_model(cfg)
    state = real.state_dict()
    built = ModelBuilder(task_model, meta_build=True)(cfg, set(state))
    built.load_state_dict(state, strict=False)
    pairs = zip(real.named_parameters(remove_duplicate=False), built.named_parameters(remove_duplicate=False))
    assert all(name == other and torch.equal(a, b) for (name, a), (other, b) in pairs)
    ties = [name for name, p in built.named_parameters(remove_duplicate=False)
            if any(p is q and name != other for other, q in built.named_parameters())]
    assert ties == [name for name, p in real.named_parameters(remove_duplicate=False)
                    if any(p is q and name != other for other, q in real.named_parameters())]  # a tied head stays tied


def test_without_every_key_the_model_is_built_with_its_seeded_weights():
    cfg = resolve({"task": "synthetic"})
    real = task_model(cfg)
    partial = {key for key in real.state_dict() if not key.startswith("head")}
    built = ModelBuilder(task_model, meta_build=True)(cfg, partial)
    assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), built.state_dict().values()))
