"""The network-time model's clock, one hop after the other and with hops in flight."""

from __future__ import annotations

from snake_flower.runtime.results import concurrent_clock, cumulative_network_time


def _clocks(times: list[float], concurrency: int) -> list[float]:
    rows: list[dict[str, float]] = []
    for i, seconds in enumerate(times):  # every hop sent once the one K before it merged
        rows.append({"network_time_s": seconds,
                     "network_clock_s": concurrent_clock(rows, seconds, max(0, i - concurrency + 1))})
    return cumulative_network_time(rows)


def test_one_hop_at_a_time_the_clock_is_the_sum():
    assert _clocks([4, 1, 1, 4], 1) == [4, 5, 6, 10]
    assert cumulative_network_time([{"network_time_s": 2}, {"network_time_s": 3}]) == [2, 5]


def test_hops_in_flight_overlap_and_merge_in_order():
    # K = 2: hops 0 and 1 leave at 0; hop 1 is back at 1 but merges after hop 0 (at 4); hop 2
    # leaves when hop 0 merged (4) and is back at 5; hop 3 leaves when hop 1 merged (4), back at 8
    assert _clocks([4, 1, 1, 4], 2) == [4, 4, 5, 8]
    # as many in flight as hops: the slowest one
    assert _clocks([4, 1, 1, 4], 4) == [4, 4, 4, 4]
