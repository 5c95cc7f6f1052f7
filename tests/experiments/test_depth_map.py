"""depth_map: the byte model replays SnakeStrategy's schedule and sync, and reads summaries right."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from snake_flower.config import resolve
from strategies.schedule import SnakeSchedule

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("depth_map", ROOT / "experiments" / "depth_map.py")
depth_map = importlib.util.module_from_spec(SPEC)
sys.modules["depth_map"] = depth_map  # its dataclass looks its module up
SPEC.loader.exec_module(depth_map)

SIZES = {"a": 100, "b": 100, "c": 100, "d": 100}  # four equal segments


def _fixed(window: int = 1, train_head: bool = False) -> SnakeSchedule:
    """Serpentine a b c d c b ... (window 1), nodes in fixed order, shifted by one every lcm(nodes, period) hops."""
    return SnakeSchedule(list(SIZES), window, order="fixed", train_head=train_head)


def _down_up(nodes: int, hops: int, sync: str = "delta", **schedule) -> tuple[list[int], list[int]]:
    out = depth_map.hop_bytes(SIZES, _fixed(**schedule), nodes, hops, sync)
    return [d for d, _ in out], [u for _, u in out]


def test_one_node_keeps_its_own_changes_and_is_sent_nothing_more():
    # its copy holds every merge (it made them all): delta sync sends nothing after the first visit
    assert _down_up(1, 6) == ([400, 0, 0, 0, 0, 0], [100] * 6)
    # window sync sends the window anyway, whether or not it moved
    assert _down_up(1, 6, "window") == ([400, 100, 100, 100, 100, 100], [100] * 6)


def test_delta_sync_sends_what_the_other_nodes_trained_since_the_last_visit():
    # 3 nodes A B C train a b c d c b: at hop 3, A lacks b and c (B's, C's); at hop 4, B lacks c and d;
    # at hop 5, C lacks d and B's new c (its own c of hop 2 is stale since hop 4)
    assert _down_up(3, 6) == ([400, 400, 400, 200, 200, 200], [100] * 6)
    assert _down_up(3, 6, "window") == ([400, 400, 400, 100, 100, 100], [100] * 6)


def test_the_head_trained_every_hop_is_sent_every_hop():
    # a b c swept with d as the head: each hop trains one of them and d; the other node changed both
    assert _down_up(2, 4, train_head=True) == ([400, 400, 200, 200], [200] * 4)


def test_relay_sends_the_whole_model_unless_a_node_follows_itself():
    # relay's window never moves (period 1), so the fixed order shifts by one node every
    # lcm(2, 1) = 2 hops against aliasing: A B B A, and B's second hop in a row is sent nothing
    assert _down_up(2, 4, window=4) == ([400, 400, 0, 400], [400] * 4)
    assert _down_up(1, 3, window=4) == ([400, 0, 0], [400] * 3)


def test_per_visit_splits_the_first_visits_from_the_rest():
    visits = depth_map.per_visit([(400, 100), (400, 100), (0, 100), (200, 100)], nodes=2)
    assert visits == {"first_visit": 500, "down": 100, "up": 100, "visit": 200}


def test_memory_ratio_is_the_ledger_of_the_largest_window_over_fedavgs():
    config = resolve({"task": "synthetic", "window": 1, "train-head": False})  # fp32 frozen
    params = {"a": 100, "b": 100, "c": 100, "d": 300}
    # the largest window is d: 16 B x 300 trained + 4 B x 300 frozen, against 16 B x 600
    assert depth_map.memory_ratio(config, params, _fixed()) == pytest.approx((16 * 300 + 4 * 300) / (16 * 600))


def _spread(values: list) -> dict:
    return {"median": sorted(values)[1], "min": min(values), "max": max(values), "seeds": values}


def test_measured_ratios_are_read_from_a_summary():
    line = {"bytes_to_target": _spread([2e6, 3e6, 1e6]), "visits_to_target": _spread([16, 24, 8]),
            "node_visits": _spread([128] * 3), "node_peak_memory_bytes": _spread([6e6, 6e6, 6e6])}
    summary = {"seeds": [42, 43, 44], "runs": {
        "snake": {**line, "bytes_total": _spread([2.56e7] * 3), "payload_efficiency": _spread([1.0] * 3)},
        "relay": {**line, "bytes_to_target": _spread([1e6] * 3), "bytes_total": _spread([1.28e8, 1.024e8, 1.28e8]),
                  "payload_efficiency": _spread([1.0] * 3)},
        "fedavg": {**line, "bytes_to_target": _spread([8e6, 4e6, 6e6]), "bytes_total": _spread([1.01e8] * 3),
                   "payload_efficiency": _spread([1.01] * 3), "node_peak_memory_bytes": 8e6}}}
    point = depth_map.measured(summary)
    assert point["snake_relay"] == 2.0 and point["snake_fedavg"] == pytest.approx(2 / 6)
    assert point["memory_snake_fedavg"] == 0.75
    # raw bytes per visit: counted / visits / payload efficiency, median over seeds
    assert point["per_visit_snake_relay"] == pytest.approx(2e5 / 1e6)
    assert point["per_visit_snake_fedavg"] == pytest.approx(2e5 / 7.8125e5)
    assert point["strategies"]["snake"]["seeds"] == [42, 43, 44]
    assert point["strategies"]["snake"]["visits_to_target"] == [16, 24, 8]


def test_the_model_reproduces_the_committed_cnn_runs_seed_by_seed():
    """Each seed's bytes counted = the model's bytes of that run x its payload efficiency (framing)."""
    summary = json.loads((ROOT / "experiments/results/noniid-seeds3-2026-12-07-summary.json").read_text())
    case = next(c for c in depth_map.CASES if c.key == "cnn")
    sizes = {n: b for n, (b, _) in depth_map.segment_sizes(depth_map.strategy_config(case, "snake")).items()}
    for name in ("snake", "relay"):
        line = summary["runs"][name]
        for seed, counted, efficiency in zip(summary["seeds"], line["bytes_total"]["seeds"],
                                             line["payload_efficiency"]["seeds"]):
            modelled = depth_map._run_bytes(case, name, sizes, seed, 128)
            assert modelled * efficiency == pytest.approx(counted, rel=2e-4), (name, seed)
