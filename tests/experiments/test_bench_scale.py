"""bench_scale's bookkeeping: equal work at every size, and which hops it measures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from strategies.nodes import relist_interval

PATH = Path(__file__).resolve().parents[2] / "experiments" / "bench_scale.py"
SPEC = importlib.util.spec_from_file_location("bench_scale", PATH)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def _rows(walls, listed):  # noqa: ANN001, ANN202
    return [{"wall_s": wall, "list_s": list_s} for wall, list_s in zip(walls, listed)]


def test_the_first_and_last_hops_are_left_out_and_relistings_counted_between():
    rows = _rows([9.0, 9.1, 9.3, 9.4, 10.4], [0.5, None, 0.02, None, 0.7])
    figures = bench.hop_figures(rows)
    assert figures["first_hop_s"] == 9.0 and figures["rank_discovery_s"] == 0.5
    assert figures["median_hop_s"] == pytest.approx(0.1) and figures["mean_hop_s"] == pytest.approx(0.4 / 3, abs=1e-4)
    assert (figures["relistings"], figures["list_s"]) == (1, 0.02)  # the last hop's listing is not measured
    assert bench.hop_figures(_rows([1.0, 2.0, 3.0, 4.0], [0.1, None, None, 0.1]))["list_s"] is None


def test_enough_hops_for_a_relisting_inside_the_measured_ones():
    hops = bench.min_hops([10, 10_000])
    relisted_at = 1 + relist_interval(10_000)  # the first hop lists, this one lists again
    assert 2 <= relisted_at <= hops - 1 and bench.min_hops([10]) == 3


@pytest.mark.parametrize(("examples", "full"), [(12, False), (16, True), (80, True), (84, True), (76, False)])
def test_only_sizes_whose_batches_are_all_full_are_measured(examples, full):
    assert bench.full_batches(examples, batch=8, steps=10) is full


def test_the_task_gives_full_batches_at_10000_nodes():
    assert bench.full_batches(bench.smallest_partition(10_000))


def test_paired_ratios_compare_the_sizes_of_each_repeat():
    keys = dict.fromkeys(bench.RATIOS[:-1], 1.0)
    base = [{**keys, "first_hop_s": hop} for hop in (10.0, 10.0, 20.0)]
    top = [{**keys, "first_hop_s": hop} for hop in (11.0, 20.0, 20.0)]  # the middle repeat's top ran slow
    assert bench.paired_ratios(base, top) == {**keys, "first_hop_s": 1.1}
