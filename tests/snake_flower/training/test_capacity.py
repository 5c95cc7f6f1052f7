"""Node capacities, window sizing and the network-time model."""

from __future__ import annotations

import pytest
import torch

from snake_flower.config import node_message, resolve
from snake_flower.tasks.task import TASKS, build_model, segment_keys
from snake_flower.training.capacity import (
    Capacity,
    NodeCapacities,
    WindowSizer,
    hop_time_s,
    node_capacity,
    profile_capacity,
    reported_capacity,
)
from snake_flower.training.loop import LocalWork, train_window

SEGMENTS = list(TASKS["synthetic"].segment_names)


def _sizer(**overrides) -> WindowSizer:
    config = resolve({"task": "synthetic", "batch-size": 8, **overrides})
    x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    work = LocalWork.from_config(node_message(config), kd=False)
    return WindowSizer(build_model(TASKS["synthetic"], 0), x, y, work, config.hop_deadline_s)


def test_uniform_profile_is_every_node_alike():
    assert {profile_capacity("uniform", r, 8, 42, 10.0) for r in range(8)} == {Capacity()}


def test_mixed_profile_spreads_compute_and_memory_at_least_4x_and_is_seeded():
    caps = [profile_capacity("mixed", r, 8, 42, 10.0) for r in range(8)]
    compute = [c.compute for c in caps]
    memory = [c.memory_budget_mb for c in caps]
    assert max(compute) / min(compute) >= 4 and max(memory) / min(memory) >= 4
    assert max(memory) == pytest.approx(10.0)  # the strongest node can train the whole model
    assert caps == [profile_capacity("mixed", r, 8, 42, 10.0) for r in range(8)]
    assert caps != [profile_capacity("mixed", r, 8, 7, 10.0) for r in range(8)]
    with pytest.raises(ValueError, match="capacity-profile"):
        profile_capacity("lavish", 0, 8, 42, 10.0)


def test_a_node_config_overrides_the_profile_key_by_key():
    stated = reported_capacity({"partition-id": 3, "compute": 0.5, "link-mbps": 20})
    assert stated == {"compute": 0.5, "link-mbps": 20.0}
    cap = node_capacity(stated, 3, "mixed", 42, 8, 10.0)
    assert (cap.compute, cap.link_mbps) == (0.5, 20.0)
    assert cap.memory_budget_mb == profile_capacity("mixed", 3, 8, 42, 10.0).memory_budget_mb


def test_network_time_is_compute_over_speed_plus_bytes_over_link():
    cap = Capacity(compute=0.5, link_mbps=8.0)
    assert hop_time_s(2.0, 1_000_000, cap) == pytest.approx(2.0 / 0.5 + 1.0)


def test_the_sizer_measures_the_ledger_a_node_measures():
    sizer = _sizer()
    window = ["conv3", "fc1", "head"]
    ledger_mb, flops = sizer.measure(window)
    model = build_model(TASKS["synthetic"], 0)
    ledger = train_window(model, window, (sizer.x, sizer.y), segments=segment_keys(model),
                          work=LocalWork(steps=3, batch_size=8), seed=1)
    assert ledger_mb == pytest.approx(ledger["total-bytes"] / 1e6)
    # deeper windows back-propagate further: more FLOPs and more saved activations
    deep_mb, deep_flops = sizer.measure(["conv1", "head"])
    assert deep_flops > flops and deep_mb > sizer.measure(["fc1", "head"])[0]


def test_misfit_names_the_limit_that_a_window_breaks():
    sizer = _sizer(window="auto", **{"hop-deadline-s": 1e-6})
    ledger_mb, _ = sizer.measure(SEGMENTS)
    assert "memory-budget-mb" in sizer.misfit(SEGMENTS, Capacity(memory_budget_mb=ledger_mb / 2))
    assert "hop-deadline-s" in sizer.misfit(SEGMENTS, Capacity(memory_budget_mb=ledger_mb))
    assert _sizer().misfit(SEGMENTS, Capacity(memory_budget_mb=ledger_mb)) is None


def test_profile_budgets_scale_with_the_full_models_ledger():
    sizer = _sizer(**{"capacity-profile": "mixed"})
    caps = NodeCapacities("mixed", 42, 8, sizer, SEGMENTS)
    full = caps.full_ledger_mb()
    budgets = [caps(r, {}).memory_budget_mb for r in range(8)]
    assert max(budgets) == pytest.approx(full, rel=1e-3) and min(budgets) == pytest.approx(full / 4, rel=1e-3)


@pytest.mark.parametrize("stated, message", [({"compute": 0}, "compute must be > 0"),
                                             ({"link-mbps": -1}, "link-mbps must be > 0"),
                                             ({"memory-budget-mb": -5}, "memory-budget-mb must be >= 0"),
                                             ({"compute": "fast"}, "compute must be a number")])
def test_a_bad_stated_capacity_is_a_one_line_error(stated, message):
    with pytest.raises(ValueError, match=message):
        reported_capacity(stated)


def test_a_node_without_a_rank_gets_no_share_of_the_profile():
    assert node_capacity({}, float("inf"), "mixed", 42, 8, 10.0) == Capacity()
