"""SnakeStrategy against an in-process Grid whose nodes add 1 to their window."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, MessageType, MetricRecord, RecordDict

from strategies import SnakeStrategy

SEGMENTS = {"s0": ["s0.w"], "s1": ["s1.w", "s1.b"], "s2": ["s2.w"], "head": ["head.w"]}


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.full((2, 2), i, np.float32))
                        for i, k in enumerate(k for keys in SEGMENTS.values() for k in keys)})


class AddOneNodes:
    """Nodes that keep a model copy, apply what they get and add 1 to their window."""

    def __init__(self, ranks: dict[int, int], tamper=None) -> None:
        self.ranks, self.tamper = ranks, tamper
        self.copies: dict[int, dict[str, np.ndarray]] = {}
        self.received: list[tuple[int, list[str]]] = []

    def __call__(self, msg):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == MessageType.QUERY:
            return RecordDict({"info": MetricRecord({"rank": self.ranks[node]})})
        copy = self.copies.setdefault(node, {})
        copy.update({k: v.numpy() for k, v in msg.content["arrays"].items()})
        self.received.append((node, list(msg.content["arrays"].keys())))
        keys = [k for name in msg.content["config"]["window"] for k in SEGMENTS[name]]
        step = self.step(node, msg)
        window = {k: copy[k] + step for k in keys}
        copy.update(window)
        arrays = ArrayRecord({k: Array(v) for k, v in window.items()})
        reply = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + self.ranks[node]})})
        return self.tamper(reply, node) if self.tamper else reply

    def step(self, node: int, msg) -> float:
        """What ``node`` adds to its window for ``msg``."""
        return 1.0


class Global:
    """What ``Strategy.start`` holds as the global model after each round."""

    def __init__(self) -> None:
        self.arrays: ArrayRecord | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self.arrays = arrays


def run(loopback, nodes: AddOneNodes, rounds: int, **kwargs):
    strategy = SnakeStrategy(SEGMENTS, kwargs.pop("window", 1), seed=0, **kwargs)
    grid = loopback(list(nodes.ranks), nodes)
    final = Global()
    strategy.start(grid=grid, initial_arrays=initial(), num_rounds=rounds, timeout=5.0,
                   evaluate_fn=final)
    return strategy, final


def values(arrays: ArrayRecord) -> dict[str, float]:
    return {k: float(v.numpy()[0, 0]) for k, v in arrays.items()}


def test_hops_merge_only_their_window(loopback):
    nodes = AddOneNodes({901: 0, 17: 1, 555: 2})
    strategy, result = run(loopback, nodes, rounds=6)
    start = values(initial())
    trained = {k: 0 for k in start}
    for hop in strategy.hops:
        assert hop["status"] == "merged"
        for name in hop["window"]:
            for key in SEGMENTS[name]:
                trained[key] += 1
    assert values(result.arrays) == {k: start[k] + trained[k] for k in start}
    last = strategy.hops[-1]
    assert strategy.provenance["head"] == {"node": last["node"], "round": 6,
                                           "num-examples": 10 + nodes.ranks[last["node"]]}


def test_chain_order_follows_reported_ranks_not_node_ids(loopback):
    a, _ = run(loopback, AddOneNodes({901: 0, 17: 1, 555: 2}), rounds=9, order="fixed")
    b, _ = run(loopback, AddOneNodes({3: 0, 2: 1, 1: 2}), rounds=9, order="fixed")
    rank_a = {901: 0, 17: 1, 555: 2}
    rank_b = {3: 0, 2: 1, 1: 2}
    assert [rank_a[h["node"]] for h in a.hops] == [rank_b[h["node"]] for h in b.hops]
    assert [rank_a[h["node"]] for h in a.hops][:3] == [0, 1, 2]


def test_delta_sync_sends_only_what_changed(loopback):
    nodes = AddOneNodes({1: 0, 2: 1})
    strategy, _ = run(loopback, nodes, rounds=4, order="fixed", sync="delta")
    sent = [set(h["segments_sent"]) for h in strategy.hops]
    assert sent[0] == sent[1] == set(SEGMENTS)  # first visits: the whole model
    # node 1 trained hop 1's window; since then only hop 2's window changed
    assert sent[2] == set(strategy.hops[1]["window"])


def test_window_sync_sends_only_the_window(loopback):
    strategy, _ = run(loopback, AddOneNodes({1: 0, 2: 1}), rounds=4, order="fixed", sync="window")
    for hop in strategy.hops[2:]:
        assert hop["segments_sent"] == hop["window"]


def _extra(reply, node):  # a layer the node was not given
    outside = next(k for keys in SEGMENTS.values() for k in keys if k not in reply["arrays"])
    reply["arrays"][outside] = Array(np.zeros((2, 2), np.float32))
    return reply


def _missing(reply, node):
    arrays = reply["arrays"]
    return RecordDict({"arrays": ArrayRecord({k: arrays[k] for k in list(arrays.keys())[1:]}),
                       "metrics": reply["metrics"]})


def _shape(reply, node):
    key = list(reply["arrays"].keys())[0]
    reply["arrays"][key] = Array(np.zeros((3, 3), np.float32))
    return reply


def _nan(reply, node):
    key = list(reply["arrays"].keys())[0]
    reply["arrays"][key] = Array(np.full((2, 2), np.nan, np.float32))
    return reply


def _examples(reply, node):  # a list where a count belongs
    reply["metrics"]["num-examples"] = [1, 2]
    return reply


@pytest.mark.parametrize("tamper", [_extra, _missing, _shape, _nan, _examples],
                         ids=["extra", "missing", "shape", "nan", "num-examples"])
def test_bad_reply_is_rejected_logged_counted_and_model_unchanged(loopback, caplog, tamper):
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy, result = run(loopback, AddOneNodes({1: 0, 2: 1}, tamper=tamper), rounds=3,
                           window=2)
    assert strategy.rejected_replies == 3
    assert [f["round"] for f in strategy.failures] == [1, 2, 3]
    assert all("rejected reply" in f["reason"] for f in strategy.failures)
    assert "rejected reply" in caplog.text
    assert values(result.arrays) == values(initial())
    assert strategy.provenance == {} and set(strategy.versions.values()) == {0}


def test_an_error_reply_records_the_last_line_of_its_remote_traceback(loopback):
    remote = ("<class 'flwr.clientapp.ClientAppException'>:<'Traceback (most recent call last):\n"
              "  File \"client_app.py\", line 40, in train\n"
              "Exception ClientAppException occurred. Message: disk full'>")
    nodes = AddOneNodes({1: 0}, tamper=lambda reply, node: Error(code=1, reason=remote))
    strategy, _ = run(loopback, nodes, rounds=1, order="fixed")
    assert strategy.failures[0]["reason"] == (
        "error reply: Exception ClientAppException occurred. Message: disk full")


def test_error_reply_costs_the_hop_and_forces_a_full_resync(loopback):
    def fail_first(reply, node):
        fail_first.calls += 1
        return Error(code=1, reason="node crashed") if fail_first.calls == 1 else reply
    fail_first.calls = 0
    nodes = AddOneNodes({1: 0, 2: 1}, tamper=fail_first)
    strategy, _ = run(loopback, nodes, rounds=6, order="fixed")
    assert strategy.failures == [{"round": 1, "node": 1, "reason": "error reply: node crashed",
                                  "backoff_hops": 2}]
    assert strategy.rejected_replies == 0
    assert [h["status"] for h in strategy.hops] == ["failed"] + ["merged"] * 5
    # node 1 sits out two hops (node 2 takes its turn), then on a later turn comes back
    back = next(i for i, h in enumerate(strategy.hops) if i > 0 and h["node"] == 1)
    assert back >= 3 and [h["node"] for h in strategy.hops[1:back]] == [2] * (back - 1)
    assert set(strategy.hops[back]["segments_sent"]) == set(SEGMENTS)  # its copy is unknown


def test_vanished_node_costs_only_its_hop(loopback):
    nodes = AddOneNodes({1: 0, 2: 1}, tamper=lambda reply, node: None if node == 2 else reply)
    strategy, result = run(loopback, nodes, rounds=4, order="fixed", backoff=0)
    assert [h["status"] for h in strategy.hops] == ["merged", "failed", "merged", "failed"]
    assert all(f["reason"] == "no reply before the hop timeout" for f in strategy.failures)
    assert values(result.arrays) != values(initial())


def test_failed_node_backs_off_doubling_while_others_carry_on(loopback):
    nodes = AddOneNodes({1: 0, 2: 1, 3: 2}, tamper=lambda reply, node: None if node == 2 else reply)
    strategy, _ = run(loopback, nodes, rounds=12, order="fixed", backoff=1)
    tried = [h["round"] for h in strategy.hops if h["node"] == 2]
    waits = [f["backoff_hops"] for f in strategy.failures]
    assert waits == [1, 2, 4][:len(waits)] and len(waits) >= 2  # doubling per failure in a row
    # between two tries it sat out at least its backoff (then waited for its turn)
    assert all(b - a - 1 >= wait for a, b, wait in zip(tried, tried[1:], waits))
    assert all(h["status"] == "merged" for h in strategy.hops if h["node"] != 2)


@pytest.mark.parametrize("discovery", ["all", "lazy"])
def test_nodes_that_join_or_leave_change_the_chain(loopback, discovery):
    nodes = AddOneNodes({1: 0, 2: 1, 3: 2})
    grid = loopback([1, 2], nodes)
    strategy = SnakeStrategy(SEGMENTS, 1, order="fixed", rank_discovery=discovery)
    seen = []

    def membership_changes(server_round, arrays):
        seen.append(server_round)
        if server_round == 3:
            grid.node_ids.append(3)  # a node joins
        if server_round == 6:
            grid.node_ids.remove(1)  # a node leaves for good
        return None

    strategy.start(grid=grid, initial_arrays=initial(), num_rounds=10, evaluate_fn=membership_changes)
    visited = [h["node"] for h in strategy.hops]
    assert 3 not in visited[:3] and 3 in visited[3:]
    assert 1 in visited[:6] and 1 not in visited[6:]
    assert [(m["round"], m["joined"], m["left"]) for m in strategy.membership] == [(4, [3], []), (7, [], [1])]
    assert all(h["status"] == "merged" for h in strategy.hops)


def test_unknown_sync_is_refused():
    with pytest.raises(ValueError, match="sync"):
        SnakeStrategy(SEGMENTS, 1, sync="full")


def test_sync_tolerance_skips_barely_changed_frozen_segments(loopback):
    # AddOneNodes moves each trained segment by +1: s0 (value 0 -> 1) drifts by more than
    # any tolerance; large values barely move relative to their size.
    nodes = AddOneNodes({1: 0, 2: 1})
    strict, _ = run(loopback, nodes, rounds=6, order="fixed", sync="delta")
    lax, final = run(loopback, AddOneNodes({1: 0, 2: 1}), rounds=6, order="fixed", sync="delta",
                     sync_tolerance=0.5)
    for a, b in zip(strict.hops, lax.hops):
        assert set(b["segments_sent"]) <= set(a["segments_sent"])
        # a stale window is always refreshed: the node must train the current one
        assert set(b["window"]) & set(a["segments_sent"]) <= set(b["segments_sent"])
    assert sum(map(len, (h["segments_sent"] for h in lax.hops))) < \
        sum(map(len, (h["segments_sent"] for h in strict.hops)))
    assert all(h["status"] == "merged" for h in lax.hops)


def test_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="sync_tolerance"):
        SnakeStrategy(SEGMENTS, 1, sync_tolerance=-0.1)


def test_state_resumes_to_the_same_model_on_new_node_ids(loopback):
    whole, final = run(loopback, AddOneNodes({1: 0, 2: 1, 3: 2}), rounds=9, order="shuffle")

    first, part = run(loopback, AddOneNodes({1: 0, 2: 1, 3: 2}), rounds=5, order="shuffle")
    state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
    resumed = SnakeStrategy(SEGMENTS, 1, seed=0, order="shuffle")
    resumed.load_state(state)
    nodes = AddOneNodes({41: 0, 42: 1, 43: 2})  # restarted: new ids, empty copies, same ranks
    rest = Global()
    resumed.start(grid=loopback(list(nodes.ranks), nodes), initial_arrays=part.arrays, num_rounds=4,
                  timeout=5.0, evaluate_fn=rest)
    assert values(rest.arrays) == values(final.arrays)
    assert [h["round"] for h in resumed.hops] == list(range(1, 10))
    assert [h["window"] for h in resumed.hops] == [h["window"] for h in whole.hops]
    # the same ranks in the same turns; every node's first visit after the restart is a full sync
    ranks = {1: 0, 2: 1, 3: 2, 41: 0, 42: 1, 43: 2}
    assert [ranks[h["node"]] for h in resumed.hops] == [ranks[h["node"]] for h in whole.hops]
    firsts = {h["node"]: h for h in reversed(resumed.hops[5:])}
    assert all(set(h["segments_sent"]) == set(SEGMENTS) for h in firsts.values())
