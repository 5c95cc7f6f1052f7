"""Lazy rank discovery: no rank query, the chain walks the node ids, ranks come with replies."""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import MessageType

from strategies import SnakeStrategy, nodes
from strategies.nodes import discovers_lazily, rank_in

from test_snake import SEGMENTS, AddOneNodes, Global, initial


class CountingNodes(AddOneNodes):
    """AddOneNodes that state their rank in every train reply, as snake_flower's ClientApp does."""

    def __init__(self, ranks: dict[int, int]) -> None:
        super().__init__(ranks, tamper=self._with_rank)
        self.queries = 0

    def _with_rank(self, reply, node):  # noqa: ANN001, ANN202
        reply["metrics"]["partition-id"] = float(self.ranks[node])
        return reply

    def __call__(self, msg):  # noqa: ANN001, ANN204
        self.queries += msg.metadata.message_type == MessageType.QUERY
        return super().__call__(msg)


def run(loopback, handler: CountingNodes, rounds: int, **kwargs):  # noqa: ANN001, ANN201
    strategy = SnakeStrategy(SEGMENTS, 1, seed=0, order="fixed", **kwargs)
    strategy.start(grid=loopback(list(handler.ranks), handler), initial_arrays=initial(),
                   num_rounds=rounds, timeout=5.0, evaluate_fn=Global())
    return strategy


def test_lazy_discovery_asks_no_node_and_learns_each_rank_from_its_reply(loopback):
    ranks = {900 - 7 * i: i for i in range(12)}  # ids fall as ranks rise
    handler = CountingNodes(ranks)
    strategy = run(loopback, handler, rounds=4, rank_discovery="lazy")
    assert handler.queries == 0
    visited = [h["node"] for h in strategy.hops]
    assert visited == sorted(ranks)[:4]  # the chain walks the ids, not the ranks
    assert strategy.node_ranks == {node: float(ranks[node]) for node in visited}  # only who replied
    assert all(h["status"] == "merged" for h in strategy.hops)


def test_auto_asks_every_node_up_to_the_threshold_and_none_above(loopback, monkeypatch):
    monkeypatch.setattr(nodes, "LAZY_ABOVE", 3)
    small, large = CountingNodes({1: 0, 2: 1, 3: 2}), CountingNodes({1: 0, 2: 1, 3: 2, 4: 3})
    run(loopback, small, rounds=2)
    run(loopback, large, rounds=2)
    assert (small.queries, large.queries) == (3, 0)


def test_capacities_need_every_rank_so_lazy_is_refused_for_them():
    assert not discovers_lazily("auto", 10_000, needs_every_rank=True)
    assert discovers_lazily("auto", 10_000, needs_every_rank=False)
    assert not discovers_lazily("all", 10_000, needs_every_rank=False)
    with pytest.raises(ValueError, match="'lazy' cannot order by capacity"):
        SnakeStrategy(SEGMENTS, 1, order="capacity", capacity=lambda rank, info: None,
                      rank_discovery="lazy")
    with pytest.raises(ValueError, match="rank_discovery"):
        SnakeStrategy(SEGMENTS, 1, rank_discovery="some")
    assert rank_in({"rank": 3, "partition-id": 5}) == 3.0 and rank_in({"partition-id": 5}) == 5.0
    assert rank_in({"num-examples": 10}) is None


def test_a_lazy_run_resumes_and_counts_its_rounds_on(loopback):
    first = run(loopback, CountingNodes({1: 0, 2: 1, 3: 2}), rounds=3, rank_discovery="lazy")
    resumed = SnakeStrategy(SEGMENTS, 1, seed=0, order="fixed", rank_discovery="lazy")
    resumed.load_state(json.loads(json.dumps(first.state())))
    handler = CountingNodes({41: 0, 42: 1, 43: 2})  # restarted: new ids, no copies
    resumed.start(grid=loopback(list(handler.ranks), handler), initial_arrays=initial(), num_rounds=3,
                  timeout=5.0, evaluate_fn=Global())
    assert [h["round"] for h in resumed.hops] == list(range(1, 7)) and handler.queries == 0
    assert all(set(h["segments_sent"]) == set(SEGMENTS) for h in resumed.hops[3:])  # full resyncs
    assert resumed.versions == {name: sum(name in h["window"] for h in resumed.hops) for name in SEGMENTS}


def test_a_large_federation_is_listed_every_n_over_256_hops_and_after_a_failed_hop(loopback, monkeypatch):
    monkeypatch.setattr(nodes, "RELIST_SHARE", 2)  # 6 nodes are listed every 3 hops, 5 every 2
    handler = CountingNodes({node: node for node in range(1, 7)})
    answer = handler.__call__
    grid = loopback(list(handler.ranks), lambda msg: None if msg.metadata.dst_node_id == 5 and gone else answer(msg))
    strategy = SnakeStrategy(SEGMENTS, 1, seed=0, order="fixed", rank_discovery="lazy")
    listed, listing, gone = [], grid.get_node_ids, False

    def get_node_ids():  # noqa: ANN202
        listed.append(len(strategy.hops))  # the hop about to be configured
        return listing()

    def after(server_round, arrays):  # noqa: ANN001, ANN202
        nonlocal gone
        if server_round == 4:  # node 5 leaves; the chain still holds it until the next listing
            gone = True
            grid.node_ids.remove(5)

    grid.get_node_ids = get_node_ids
    strategy.start(grid=grid, initial_arrays=initial(), num_rounds=8, timeout=5.0, evaluate_fn=after)
    assert [h["node"] for h in strategy.hops[:5]] == [1, 2, 3, 4, 5]
    assert [h["status"] for h in strategy.hops].count("failed") == 1 and strategy.hops[4]["status"] == "failed"
    assert listed == [0, 0, 3, 5, 7]  # first hop twice (the size, then the chain); after the failure at once
    assert [(m["round"], m["left"]) for m in strategy.membership] == [(6, [5])]
    assert 5 not in [h["node"] for h in strategy.hops[5:]]


def test_each_hop_records_how_long_it_spent_listing_the_nodes(loopback, monkeypatch):
    monkeypatch.setattr(nodes, "RELIST_SHARE", 2)  # 6 nodes are listed every 3 hops
    handler = CountingNodes({node: node for node in range(1, 7)})
    grid = loopback(list(handler.ranks), handler)
    listing = grid.get_node_ids

    def slow_listing():  # noqa: ANN202
        time.sleep(0.01)
        return listing()

    grid.get_node_ids = slow_listing
    strategy = SnakeStrategy(SEGMENTS, 1, seed=0, order="fixed", rank_discovery="lazy")
    strategy.start(grid=grid, initial_arrays=initial(), num_rounds=7, timeout=5.0, evaluate_fn=Global())
    listed = {h["round"]: h["list_s"] for h in strategy.hops if h["list_s"] is not None}
    assert sorted(listed) == [1, 4, 7]  # the other hops went on with the last listing (list_s None)
    assert listed[1] >= 0.02 and listed[4] >= 0.01  # the first hop also sized the federation
