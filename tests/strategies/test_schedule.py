"""Serpentine schedule: window positions and the node chain."""

from __future__ import annotations

import pytest

from strategies import SnakeSchedule, serpentine_schedule

SEGMENTS = ["conv1", "conv2", "conv3", "fc1", "head"]


def test_serpentine_goes_down_and_back():
    assert serpentine_schedule(4, 1) == [0, 1, 2, 3, 2, 1]
    assert serpentine_schedule(4, 2) == [0, 1, 2, 1]
    assert serpentine_schedule(4, 4) == [0]


def test_forward_sweep_restarts():
    assert serpentine_schedule(4, 1, "forward") == [0, 1, 2, 3]


@pytest.mark.parametrize("window", [0, 5])
def test_impossible_window_is_refused(window):
    with pytest.raises(ValueError, match="window"):
        serpentine_schedule(4, window)


def test_head_and_stem_ride_along_every_window():
    s = SnakeSchedule(SEGMENTS, 1, train_head=True, train_stem=True)
    assert [s.window_at(h) for h in range(4)] == [
        ["conv1", "conv2", "head"], ["conv1", "conv3", "head"], ["conv1", "fc1", "head"],
        ["conv1", "conv3", "head"]]


def test_window_snakes_through_the_depth():
    s = SnakeSchedule(SEGMENTS, 1, train_head=False)
    assert [s.window_at(h)[0] for h in range(10)] == [
        "conv1", "conv2", "conv3", "fc1", "head", "fc1", "conv3", "conv2", "conv1", "conv2"]


def _coverage(schedule: SnakeSchedule, nodes: list[int], hops: int) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {n: set() for n in nodes}
    for hop in range(hops):
        seen[schedule.node_at(hop, nodes)].update(schedule.window_at(hop))
    return seen


@pytest.mark.parametrize("order", ["fixed", "shuffle"])
@pytest.mark.parametrize("num_nodes", [2, 3, 6, 8, 9])
@pytest.mark.parametrize("window,head", [(1, True), (1, False), (2, True)])
def test_every_node_trains_every_segment(order, num_nodes, window, head):
    # 6 nodes with a period-6 serpentine (window 1 + head) is the aliasing trap:
    # in plain round-robin node k would only ever see one position.
    s = SnakeSchedule(SEGMENTS, window, order=order, train_head=head, seed=3)
    nodes = list(range(100, 100 + num_nodes))
    seen = _coverage(s, nodes, hops=12 * num_nodes * s.period)
    assert all(covered == set(SEGMENTS) for covered in seen.values()), seen


def test_plain_round_robin_would_alias():
    # The failure the anti-aliasing prevents, shown on the bare arithmetic.
    s = SnakeSchedule(SEGMENTS, 1, train_head=True)
    assert s.period == 6
    positions_of_node0 = {s.offsets[h % s.period] for h in range(0, 600, 6)}
    assert positions_of_node0 == {0}


def test_shuffled_order_visits_each_node_once_per_cycle():
    s = SnakeSchedule(SEGMENTS, 1, order="shuffle", seed=0)
    nodes = [7, 3, 9, 1]
    cycles = [[s.node_at(c * 4 + i, nodes) for i in range(4)] for c in range(20)]
    assert all(sorted(c) == sorted(nodes) for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1  # the order really changes
    again = SnakeSchedule(SEGMENTS, 1, order="shuffle", seed=0)
    assert [again.node_at(h, nodes) for h in range(80)] == [n for c in cycles for n in c]


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order"):
        SnakeSchedule(SEGMENTS, 1, order="random")
