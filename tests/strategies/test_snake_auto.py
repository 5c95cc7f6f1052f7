"""Auto windows and capacity order: SnakeStrategy with node capacities (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from strategies import SnakeStrategy
from strategies.schedule import SnakeSchedule

from test_snake import SEGMENTS, AddOneNodes, run


@dataclass(frozen=True)
class Cap:
    compute: float
    most: int  # the largest window (body segments) this node can hold


def capacity(rank, reported):  # noqa: ANN001, ANN201 - the strategy's callable
    return {0: Cap(1.0, 3), 1: Cap(4.0, 2), 2: Cap(2.0, 1), 3: Cap(0.5, 0)}[int(rank)]


def misfit(window, cap):  # noqa: ANN001, ANN201
    body = [name for name in window if name != "head"]
    return None if len(body) <= cap.most else f"{len(body)} segments exceed {cap.most}"


def test_sized_windows_cover_the_snakes_position():
    schedule = SnakeSchedule(["a", "b", "c", "d", "head"], 1)
    positions = [schedule.window_at(hop)[0] for hop in range(schedule.period)]
    for size in (1, 2, 3, 4):
        for hop, position in enumerate(positions):
            window = schedule.sized_window_at(hop, size)
            assert len(window) == size + 1 and window[-1] == "head" and position in window
    with pytest.raises(ValueError, match="does not fit"):
        schedule.sized_window_at(0, 5)


def test_auto_gives_each_node_its_largest_window_and_skips_a_node_that_fits_none(loopback, caplog):
    nodes = AddOneNodes({11: 0, 22: 1, 33: 2, 44: 3})
    strategy, _ = run(loopback, nodes, rounds=12, window="auto", capacity=capacity, misfit=misfit)
    ranks = {11: 0, 22: 1, 33: 2, 44: 3}
    assert strategy.skipped.keys() == {44} and "exceed 0" in strategy.skipped[44]
    assert "node 44 is skipped" in caplog.text
    for hop in strategy.hops:
        body = [name for name in hop["window"] if name != "head"]
        assert hop["node"] != 44 and len(body) == capacity(ranks[hop["node"]], {}).most
        assert hop["status"] == "merged"
    assert {hop["node"] for hop in strategy.hops} == {11, 22, 33}


def test_a_node_that_fits_nothing_here_is_passed_over_for_the_next(loopback):
    def deep_is_heavy(window, cap):  # noqa: ANN001, ANN202 - only rank 0 may train s0
        return "s0 needs more memory" if "s0" in window and cap.compute != 1.0 else None

    nodes = AddOneNodes({11: 0, 22: 1, 33: 2})
    strategy, _ = run(loopback, nodes, rounds=8, window="auto", capacity=capacity, misfit=deep_is_heavy)
    for hop in strategy.hops:
        if "s0" in hop["window"]:
            assert hop["node"] == 11
        for passed in hop.get("passed_over", []):
            assert passed["node"] != 11 and "s0 needs more memory" in passed["reason"]
    assert any(hop.get("passed_over") for hop in strategy.hops)


def test_capacity_order_visits_the_fastest_node_first(loopback):
    nodes = AddOneNodes({11: 0, 22: 1, 33: 2})
    strategy, _ = run(loopback, nodes, rounds=3, order="capacity", capacity=capacity)
    assert [hop["node"] for hop in strategy.hops] == [22, 33, 11]  # compute 4, 2, 1


def test_auto_without_capacities_is_refused():
    with pytest.raises(ValueError, match="misfit"):
        SnakeStrategy(SEGMENTS, "auto")
    with pytest.raises(ValueError, match="capacities"):
        SnakeStrategy(SEGMENTS, 1, order="capacity")
