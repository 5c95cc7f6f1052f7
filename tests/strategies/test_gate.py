"""MergeGate: a poisoned window is rolled back bit for bit, its node backs off, resume keeps the gate."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord

from strategies import MergeGate, SnakeStrategy
from test_snake import SEGMENTS, AddOneNodes, initial

KEYS = [k for keys in SEGMENTS.values() for k in keys]
TARGET = 50.0  # honest nodes move every value one step towards it; the gate's loss is the distance
POISON = -20.0  # what a poisoning node adds to its window instead
TOLERANCE = 0.5  # above zero, far below the rise of one poisoned window


def sha256(arrays: ArrayRecord) -> str:
    return hashlib.sha256(b"".join(k.encode() + arrays[k].numpy().tobytes() for k in arrays.keys())).hexdigest()


class Loss:
    """Mean squared distance of every value to TARGET, and how often it was computed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, arrays: ArrayRecord) -> float:
        self.calls += 1
        return float(np.mean([np.mean((arrays[k].numpy() - TARGET) ** 2) for k in KEYS]))


class Nodes(AddOneNodes):
    """Nodes that add 1 to their window, except the ``poisoners`` (at every hop, or at the hops of
    ``rounds``), which add POISON."""

    def __init__(self, ranks: dict[int, int], poisoners: set[int] = frozenset(), rounds: set[int] | None = None):
        super().__init__(ranks)
        self.poisoners, self.rounds = set(poisoners), rounds

    def step(self, node: int, msg) -> float:
        poisons = node in self.poisoners and (self.rounds is None or msg.content["config"]["server-round"] in self.rounds)
        return POISON if poisons else 1.0


class Models:
    """The global model after every round (``evaluate_fn``)."""

    def __init__(self) -> None:
        self.by_round: dict[int, ArrayRecord] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        self.by_round[server_round] = arrays


def run(loopback, nodes: Nodes, rounds: int, strategy: SnakeStrategy | None = None, arrays=None, **kwargs):
    strategy = strategy or SnakeStrategy(SEGMENTS, 1, seed=0, order="fixed", **kwargs)
    models = Models()
    strategy.start(grid=loopback(list(nodes.ranks), nodes), initial_arrays=arrays or initial(),
                   num_rounds=rounds, timeout=5.0, evaluate_fn=models)
    return strategy, models


def test_a_poisoned_window_is_rolled_back_and_the_model_is_bit_identical(loopback):
    loss = Loss()
    strategy, models = run(loopback, Nodes({1: 0, 2: 1}, poisoners={2}), rounds=4,
                           gate=MergeGate(loss, TOLERANCE), backoff=0)
    assert [h["node"] for h in strategy.hops] == [1, 2, 1, 2]
    assert [h["status"] for h in strategy.hops] == ["merged", "rejected", "merged", "rejected"]
    for rejected in (2, 4):  # the model after a rejected hop is the model before it, bit for bit
        assert sha256(models.by_round[rejected]) == sha256(models.by_round[rejected - 1])
    assert sha256(models.by_round[1]) != sha256(models.by_round[0])  # honest hops did merge
    hop = strategy.hops[1]
    assert hop["reason"].startswith("gate: loss") and "gate-tolerance 0.5" in hop["reason"]
    assert hop["gate"]["loss_change"] > TOLERANCE and hop["gate"]["cpu_seconds"] >= 0
    assert strategy.hops[0]["gate"]["loss_change"] < 0
    merged = [name for h in strategy.hops if h["status"] == "merged" for name in h["window"]]
    assert strategy.versions == {name: merged.count(name) for name in SEGMENTS}  # rejected: no bump
    assert strategy.rejected_replies == 0 and strategy.failures == []  # well formed: not a bad reply
    assert [r["round"] for r in strategy.gate.rejections] == [2, 4]
    assert loss.calls == 1 + 4  # the initial model once, then one candidate per hop (kept loss)


def test_a_rolled_back_node_is_sent_the_whole_model_next_time(loopback):
    # node 2 merges at hop 2, is rolled back at hop 4; its copy holds a window the server does not
    strategy, _ = run(loopback, Nodes({1: 0, 2: 1}, poisoners={2}, rounds={4}), rounds=6,
                      gate=MergeGate(Loss(), TOLERANCE), backoff=0)
    assert [h["status"] for h in strategy.hops] == ["merged", "merged", "merged", "rejected", "merged", "merged"]
    after = strategy.hops[4:]
    assert [set(h["segments_sent"]) == set(SEGMENTS) for h in after if h["node"] == 2] == [True]  # a full resync
    assert all(set(h["segments_sent"]) < set(SEGMENTS) for h in after if h["node"] == 1)  # a delta, as usual


def test_without_a_gate_the_same_poisoned_window_is_merged(loopback):
    """The control: the gate, not the harness, stops the poisoned window."""
    strategy, _ = run(loopback, Nodes({1: 0, 2: 1}, poisoners={2}), rounds=4, backoff=0)
    assert [h["status"] for h in strategy.hops] == ["merged"] * 4


def test_with_hops_in_flight_each_merge_is_gated_in_dispatch_order(loopback):
    loss = Loss()
    strategy, models = run(loopback, Nodes({1: 0, 2: 1, 3: 2}, poisoners={2}), rounds=9, gate=MergeGate(loss, TOLERANCE),
                           backoff=0, concurrency=2, train_head=False)
    statuses = [(h["node"] == 2, h["status"]) for h in strategy.hops]
    assert {s for poisoner, s in statuses if poisoner} == {"rejected"} and any(p for p, _ in statuses)
    assert {s for poisoner, s in statuses if not poisoner} == {"merged"}
    for hop in strategy.hops:  # each scored against the model the merges before it left
        assert hop["gate"]["loss_before"] == pytest.approx(Loss()(models.by_round[hop["round"] - 1]))
        if hop["status"] == "rejected":
            assert sha256(models.by_round[hop["round"]]) == sha256(models.by_round[hop["round"] - 1])
    assert loss.calls == 1 + 9  # the kept loss follows the merges: one scoring per hop


def test_a_nan_loss_is_rejected_whatever_the_tolerance(loopback):
    gate = MergeGate(lambda arrays: float("nan") if arrays["s1.w"].numpy()[0, 0] > 1.5 else 0.0, 1e9)
    strategy, _ = run(loopback, Nodes({1: 0}), rounds=2, gate=gate, sweep="forward", train_head=False)
    assert [h["status"] for h in strategy.hops] == ["merged", "rejected"]
    assert math.isnan(strategy.hops[1]["gate"]["loss_change"])


@pytest.mark.parametrize("strikes", [1, 2])
def test_a_node_rejected_strikes_times_in_a_row_backs_off(loopback, strikes):
    nodes = Nodes({1: 0, 2: 1, 3: 2}, poisoners={2})
    strategy, _ = run(loopback, nodes, rounds=15, gate=MergeGate(Loss(), TOLERANCE, strikes=strikes), backoff=2)
    tried = [h["round"] for h in strategy.hops if h["node"] == 2]
    waits = [r["backoff_hops"] for r in strategy.gate.rejections]
    # every strikes-th rejection in a row backs the node off, doubling as failures do
    assert waits == [2 * 2 ** ((i + 1) // strikes - 1) if (i + 1) % strikes == 0 else 0
                     for i in range(len(waits))] and max(waits) > 0
    assert all(b - a - 1 >= wait for a, b, wait in zip(tried, tried[1:], waits))  # it sat its backoff out
    assert len(tried) < 5  # fixed order would have sent it every third hop
    assert all(h["status"] == "merged" for h in strategy.hops if h["node"] != 2)


@pytest.mark.parametrize(("stop", "kept"), [(3, "streak"), (5, "backoff")])
def test_resume_keeps_the_gate_state_and_gives_the_same_model(loopback, stop, kept):
    def gated():
        return SnakeStrategy(SEGMENTS, 1, seed=0, order="fixed", backoff=1,
                             gate=MergeGate(Loss(), TOLERANCE, strikes=2))

    poisoners = {2}
    whole, whole_models = run(loopback, Nodes({1: 0, 2: 1, 3: 2}, poisoners), 12, gated())
    first, part = run(loopback, Nodes({1: 0, 2: 1, 3: 2}, poisoners), stop, gated())
    state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
    # stopped after rank 1's first rejection (one strike to go) or after its back-off began
    assert (state["gate"]["streak"] if kept == "streak" else state["backoff"]) == \
        ([[1.0, 1]] if kept == "streak" else [[1.0, 6, 1]])
    resumed = gated()
    resumed.load_state(state)
    loss = resumed.gate.loss_fn
    _, rest = run(loopback, Nodes({41: 0, 42: 1, 43: 2}, {42}), 12 - stop, resumed, arrays=part.by_round[stop])
    assert sha256(rest.by_round[12 - stop]) == sha256(whole_models.by_round[12])
    assert [h["status"] for h in resumed.hops] == [h["status"] for h in whole.hops]
    assert [r["round"] for r in resumed.gate.rejections] == [r["round"] for r in whole.gate.rejections]
    assert [r["backoff_hops"] for r in resumed.gate.rejections] == [r["backoff_hops"] for r in whole.gate.rejections]
    assert loss.calls == 12 - stop  # the kept loss came back with the state: no extra scoring of the model


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="tolerance: must be > 0"):
        MergeGate(Loss(), 0.0)
    with pytest.raises(ValueError, match="strikes: must be >= 1"):
        MergeGate(Loss(), 1.0, strikes=0)
