"""Concurrent snakes: K hops in flight, disjoint windows, merged in the order they were sent."""

from __future__ import annotations

import json
import random
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from strategies import SnakeSchedule, SnakeStrategy

SEGMENTS = {f"s{i}": [f"s{i}.w"] for i in range(6)}


def initial() -> ArrayRecord:
    return ArrayRecord({f"s{i}.w": Array(np.full((2, 2), float(i), np.float32)) for i in range(6)})


class MeanNodes:
    """Nodes whose update depends on the whole model they hold, frozen segments included:
    window += 0.1 * mean(copy) + rank. Which model each hop was sent therefore shows in the result."""

    def __init__(self, ranks: dict[int, int], strategy: SnakeStrategy | None = None) -> None:
        self.ranks, self.strategy = ranks, strategy
        self.copies: dict[int, dict[str, np.ndarray]] = {}
        self.in_flight: list[list[tuple[int, list[str]]]] = []  # at every train push: (node, window) pending

    def __call__(self, msg: Message) -> RecordDict:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == MessageType.QUERY:
            return RecordDict({"info": MetricRecord({"rank": self.ranks[node]})})
        if self.strategy is not None:
            self.in_flight.append([(h["node"], h["window"]) for h in self.strategy.hops if h["status"] == "pending"])
        copy = self.copies.setdefault(node, {})
        copy.update({k: v.numpy() for k, v in msg.content["arrays"].items()})
        level = float(np.mean([v.mean() for v in copy.values()]))
        keys = [k for name in msg.content["config"]["window"] for k in SEGMENTS[name]]
        window = {k: (copy[k] + 0.1 * level + self.ranks[node]).astype(np.float32) for k in keys}
        copy.update(window)
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in window.items()}),
                           "metrics": MetricRecord({"num-examples": 10})})


def shuffled_grid(loopback, seed: int):
    """A loopback Grid whose replies turn up late and out of order (each after 0-3 pulls)."""

    class Late(loopback):
        def __init__(self, node_ids, handler) -> None:
            super().__init__(node_ids, handler)
            self.rng, self.hidden = random.Random(seed), {}

        def push_messages(self, messages):
            messages = list(messages)
            ids = super().push_messages(messages)
            for i, msg in zip(ids, messages):  # rank queries are answered at once
                self.hidden[i] = self.rng.randint(0, 3) if msg.metadata.message_type == MessageType.TRAIN else 0
            return ids

        def pull_messages(self, message_ids):
            ready = []
            for i in list(message_ids):
                if self.hidden.get(i, 0) > 0:
                    self.hidden[i] -= 1
                elif i in self._replies:
                    ready.append(self._replies.pop(i))
            return ready

    return Late


class Global:
    def __init__(self) -> None:
        self.arrays: ArrayRecord | None = None
        self.rounds: list[int] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self.arrays = arrays
        self.rounds.append(server_round)


def run(grid_class, ranks, rounds, concurrency, strategy=None, arrays=None, watch=False, **kwargs):
    strategy = strategy or SnakeStrategy(SEGMENTS, 1, train_head=False, seed=0, concurrency=concurrency,
                                         **kwargs)
    nodes = MeanNodes(ranks, strategy if watch else None)
    final = Global()
    strategy.start(grid=grid_class(list(ranks), nodes), initial_arrays=arrays or initial(), num_rounds=rounds,
                   timeout=5.0, evaluate_fn=final)
    return strategy, final, nodes


def values(arrays: ArrayRecord) -> list[float]:
    return [round(float(v.numpy()[0, 0]), 5) for v in arrays.values()]


@pytest.mark.parametrize("concurrency", [2, 3])
def test_hops_in_flight_are_on_different_nodes_with_disjoint_windows(loopback, concurrency):
    strategy, _, nodes = run(loopback, {1: 0, 2: 1, 3: 2, 4: 3}, 24, concurrency, watch=True)
    assert all(h["status"] == "merged" for h in strategy.hops)
    for pending in nodes.in_flight:
        windows = [set(window) for _, window in pending]
        assert len({node for node, _ in pending}) == len(pending)
        assert all(a.isdisjoint(b) for i, a in enumerate(windows) for b in windows[i + 1:]), pending
    # the pipeline really keeps K hops out: every send after the first K finds K - 1 others pending
    assert [len(p) for p in nodes.in_flight[concurrency:]] == [concurrency] * (24 - concurrency)


def test_each_hop_trains_against_the_model_as_sent_and_no_update_is_lost(loopback):
    strategy, final, _ = run(loopback, {1: 0, 2: 1, 3: 2}, 12, 2, order="fixed")
    # replay: hop h sees the model after the merges before h - 1 (h - 2 and earlier), then its
    # own window's update lands on top of every other merge
    merged = {k: v.numpy().copy() for k, v in initial().items()}
    history, copies = [dict(merged)], {}
    for index, hop in enumerate(strategy.hops):
        sent = history[max(0, index - 1)]  # K = 2: hop h is sent after hop h - 2 merged
        copy = copies.setdefault(hop["node"], {})
        copy.update({k: sent[k] for name in hop["segments_sent"] for k in SEGMENTS[name]})
        level = float(np.mean([v.mean() for v in copy.values()]))
        rank = {1: 0, 2: 1, 3: 2}[hop["node"]]
        for name in hop["window"]:
            key = SEGMENTS[name][0]
            copy[key] = (copy[key] + 0.1 * level + rank).astype(np.float32)
            merged[key] = copy[key]
        history.append(dict(merged))
    assert values(final.arrays) == [round(float(merged[k][0, 0]), 5) for k in merged]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replies_merge_in_the_order_sent_whatever_order_they_arrive_in(loopback, seed):
    ranks = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    _, instant, _ = run(loopback, ranks, 20, 3)
    strategy, late, _ = run(shuffled_grid(loopback, seed), ranks, 20, 3)
    assert values(late.arrays) == values(instant.arrays)
    assert late.rounds == list(range(21))
    assert [h["round"] for h in strategy.hops] == list(range(1, 21))


def test_concurrency_changes_the_model_one_hop_at_a_time_would_not(loopback):
    # guards the tests above: K = 2 really trains against older models than K = 1
    ranks = {1: 0, 2: 1, 3: 2}
    _, one, _ = run(loopback, ranks, 12, 1)
    _, two, _ = run(loopback, ranks, 12, 2)
    assert values(one.arrays) != values(two.arrays)


def test_a_stale_reply_is_rejected_and_the_model_left_as_it_was(loopback):
    strategy = SnakeStrategy({"a": ["a.w"], "b": ["b.w"]}, 1, train_head=False, seed=0, concurrency=2)
    arrays = ArrayRecord({"a.w": Array(np.zeros(2, np.float32)), "b.w": Array(np.ones(2, np.float32))})
    grid = loopback([1, 2], lambda m: RecordDict({"info": MetricRecord({"rank": m.metadata.dst_node_id})}))
    # the pipeline bypassed: two hops of one lane (one segment: the same window) out at once
    first = strategy.dispatch(0, arrays, ConfigRecord(), grid)
    again = strategy.dispatch(2, arrays, ConfigRecord(), grid, busy={first.metadata.dst_node_id})
    assert strategy.hops[0]["window"] == strategy.hops[1]["window"] == ["a"]

    def reply(message: Message, value: float) -> Message:
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        content = RecordDict({"arrays": ArrayRecord({"a.w": Array(np.full(2, value, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=message)

    after, _ = strategy.merge(strategy.hops[1], [reply(again, 5.0)], arrays)
    assert after is not None and float(after["a.w"].numpy()[0]) == 5.0
    stale, _ = strategy.merge(strategy.hops[0], [reply(first, 9.0)], after)
    assert stale is None and strategy.rejected_replies == 1
    assert "stale" in strategy.failures[-1]["reason"] and strategy.hops[0]["status"] == "failed"


def _stopped_after(loopback, ranks, rounds, at):
    """A K = 3 run's checkpoint after round ``at`` (what run_snake's evaluate_fn saves), and a
    fresh strategy resumed from it."""
    checkpoint = {}

    def save(server_round, arrays):
        if server_round == at:
            checkpoint.update(state=json.loads(json.dumps(first.state())), arrays=arrays,
                              flights=first.in_flight_arrays(arrays))

    first = SnakeStrategy(SEGMENTS, 1, train_head=False, seed=0, concurrency=3)
    first.start(grid=loopback(list(ranks), MeanNodes(ranks)), initial_arrays=initial(), num_rounds=rounds,
                timeout=5.0, evaluate_fn=save)
    resumed = SnakeStrategy(SEGMENTS, 1, train_head=False, seed=0, concurrency=3)
    resumed.load_state(checkpoint["state"], checkpoint["flights"])
    return checkpoint, resumed


def test_a_resumed_run_with_hops_in_flight_ends_with_the_same_model(loopback):
    ranks = {1: 0, 2: 1, 3: 2, 4: 3}
    whole, final, _ = run(loopback, ranks, 14, 3)
    checkpoint, resumed = _stopped_after(loopback, ranks, 14, at=6)
    assert [h["round"] for h in checkpoint["state"]["in-flight"]] == [7, 8]  # two hops were out
    assert any(len(record) for record in checkpoint["flights"].values())  # ... sent older models

    fresh = {40 + rank: rank for rank in ranks.values()}  # restarted: new ids, empty copies, same ranks
    rest = Global()
    resumed.start(grid=loopback(list(fresh), MeanNodes(fresh)), initial_arrays=checkpoint["arrays"],
                  num_rounds=8, timeout=5.0, evaluate_fn=rest)
    assert values(rest.arrays) == values(final.arrays)
    assert [h["window"] for h in resumed.hops] == [h["window"] for h in whole.hops]
    assert [fresh.get(h["node"], ranks.get(h["node"])) for h in resumed.hops] == \
        [ranks[h["node"]] for h in whole.hops]


def test_a_resume_with_fewer_free_nodes_than_hops_in_flight_sends_them_in_turn(loopback):
    checkpoint, resumed = _stopped_after(loopback, {1: 0, 2: 1, 3: 2, 4: 3}, 14, at=6)
    alone = {40: 0}  # one node came back for two hops in flight
    resumed.start(grid=loopback(list(alone), MeanNodes(alone)), initial_arrays=checkpoint["arrays"],
                  num_rounds=8, timeout=5.0)
    assert [h["round"] for h in resumed.hops] == list(range(1, 15))  # the six before, then 7 to 14
    assert [h["status"] for h in resumed.hops[6:]] == ["merged"] * 8 and {h["node"] for h in resumed.hops[6:]} == {40}


def test_a_failed_hop_costs_only_itself(loopback):
    ranks = {1: 0, 2: 1, 3: 2}
    nodes = MeanNodes(ranks)

    def flaky(msg):
        if msg.metadata.message_type == MessageType.TRAIN and msg.content["config"]["server-round"] == 4:
            return None  # hop 4's node vanishes
        return nodes(msg)

    strategy = SnakeStrategy(SEGMENTS, 1, train_head=False, seed=0, concurrency=2)
    final = Global()
    strategy.start(grid=loopback(list(ranks), flaky), initial_arrays=initial(), num_rounds=8, timeout=0.2,
                   evaluate_fn=final)
    assert [h["status"] for h in strategy.hops].count("failed") == 1
    assert strategy.hops[3]["status"] == "failed" and final.rounds == list(range(9))


@pytest.mark.parametrize("kwargs, match", [
    ({"train_head": True}, "head"),
    ({"train_head": False, "window": 4}, "need 8 segments"),
    ({"train_head": False, "window": "auto", "capacity": lambda r, i: None, "misfit": lambda w, c: None},
     "auto"),
])
def test_windows_that_could_overlap_are_refused(kwargs, match):
    window = kwargs.pop("window", 1)
    with pytest.raises(ValueError, match=match):
        SnakeStrategy(SEGMENTS, window, seed=0, concurrency=2, **kwargs)


def test_lanes_cover_the_depth_and_every_node_trains_every_segment():
    schedule = SnakeSchedule(list(SEGMENTS), 1, train_head=False, lanes=4, order="fixed")
    assert schedule.lanes == [(0, 2), (2, 2), (4, 1), (5, 1)]
    nodes = [10, 11, 12, 13]  # 4 nodes, 4 lanes: a plain round robin would pin node k to lane k
    seen = {node: set() for node in nodes}
    for hop in range(40 * schedule.period):
        seen[schedule.node_at(hop, nodes)].update(schedule.window_at(hop))
        assert not set(schedule.window_at(hop)) & set(schedule.window_at(hop + 1))
    assert all(trained == set(SEGMENTS) for trained in seen.values())


def test_fewer_nodes_than_hops_in_flight_send_fewer_at_once(loopback):
    strategy, final, nodes = run(loopback, {1: 0, 2: 1}, 10, 4, watch=True)
    assert [h["status"] for h in strategy.hops] == ["merged"] * 10 and final.rounds == list(range(11))
    assert max(len(pending) for pending in nodes.in_flight) == 2  # two nodes: two out, never more
    # hop h went out once hop h - 2 merged, not h - 4: what the network-time model's clock reads
    assert [h["sent_after"] for h in strategy.hops] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_more_lanes_than_hops_in_flight_train_the_same_windows_one_at_a_time(loopback):
    ranks = {1: 0, 2: 1, 3: 2, 4: 3}
    concurrent, _, _ = run(loopback, ranks, 16, 3)
    sequential, _, nodes = run(loopback, ranks, 16, 1, lanes=3, watch=True)
    assert max(len(pending) for pending in nodes.in_flight) == 1  # one hop at a time
    assert [h["window"] for h in sequential.hops] == [h["window"] for h in concurrent.hops]
    with pytest.raises(ValueError, match="lanes"):
        SnakeStrategy(SEGMENTS, 1, train_head=False, concurrency=3, lanes=2)


def test_a_failed_node_sits_out_its_hops_counted_from_the_last_hop_sent(loopback):
    ranks = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    nodes = MeanNodes(ranks)

    def broken(msg):  # node 1 fails every hop it is sent
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id == 1:
            return None
        return nodes(msg)

    concurrency = 4
    # fixed order: node 1's turn comes back every 5 hops, right where a short sit-out would end
    strategy = SnakeStrategy(SEGMENTS, 1, train_head=False, seed=0, concurrency=concurrency, order="fixed")
    strategy.start(grid=loopback(list(ranks), broken), initial_arrays=initial(), num_rounds=24, timeout=0.2)
    visits = [i for i, h in enumerate(strategy.hops) if h["node"] == 1]
    assert strategy.failures and len(visits) >= 2
    for failure, later in zip(strategy.failures, visits[1:]):
        # hop h failed when hops up to h + K - 1 had gone out: it sits out `wait` hops after those
        last_sent = failure["round"] - 1 + concurrency - 1
        assert later > last_sent + failure["backoff_hops"]


def test_fewer_than_one_hop_in_flight_is_refused():
    with pytest.raises(ValueError, match="concurrency: hops in flight must be at least 1"):
        SnakeStrategy(SEGMENTS, 1, train_head=False, concurrency=0, lanes=2)


def test_as_many_nodes_as_hops_in_flight_pins_each_node_to_its_lane_and_says_so(loopback, caplog):
    with caplog.at_level("WARNING"):
        strategy, _, _ = run(loopback, {1: 0, 2: 1, 3: 2}, 18, 3)
    windows = {node: {w for h in strategy.hops if h["node"] == node for w in h["window"]} for node in (1, 2, 3)}
    assert sum(map(len, windows.values())) == len(SEGMENTS)  # no segment trained by two nodes
    assert any("each node trains the same layers" in r.getMessage() for r in caplog.records)
