"""An attacked, gated run through the real ServerApp and ClientApp (in-process Grid, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from snake_flower.config import resolve
from snake_flower.harness.compare import summarize
from snake_flower.runtime.byzantine import gate_slice
from snake_flower.server_app import run
from snake_flower.training.attack import attacking_partitions

NODES, HOPS = 3, 6
TOLERANCE = 0.05  # honest hops of this task move the gate loss by < 0.03; a scaled window by > 0.3
GATED = {"task": "synthetic", "partitioner": "iid", "local-steps": 20, "eval-every": 2, "num-server-rounds": HOPS,
         "validation-size": 200, "merge-gate": "loss", "gate-size": 100, "gate-tolerance": TOLERANCE,
         "byzantine-nodes": 1, "attack": "scale"}


def _run(grid_class, nodes, out, node_ids=1000, **overrides) -> dict:
    config = resolve({**GATED, "out-dir": str(out), **overrides})
    node = nodes(NODES, first_id=node_ids)
    run(grid_class(list(node.contexts), node), config)
    return json.loads((out / "snake.json").read_text())


def test_a_gated_run_rolls_the_attacker_back_and_resumes_to_the_same_model(loopback, nodes, tmp_path):
    whole = _run(loopback, nodes, tmp_path / "whole")
    attackers = whole["byzantine_partitions"]
    assert attackers == attacking_partitions(GATED.get("seed", 42), 1, NODES) and whole["attack"] == "scale"
    rows = whole["rounds"]
    statuses = {r["round"]: (r["partitions"][0] in attackers, r["status"]) for r in rows}
    assert {status for attacker, status in statuses.values() if attacker} == {"rejected"}
    assert {status for attacker, status in statuses.values() if not attacker} == {"merged"}
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert rejected and all(r["gate_loss_change"] > TOLERANCE and r["reason"].startswith("gate: loss")
                            and r["bytes_up"] > 0 for r in rejected)  # its bytes are still metered
    assert all(r["gate_loss_change"] <= TOLERANCE and r["gate_cpu_s"] >= 0 for r in rows if r["status"] == "merged")
    assert [g["round"] for g in whole["gate"]["rejections"]] == [r["round"] for r in rejected]
    assert whole["failures"] == [] and whole["rejected_replies"] == 0  # well-formed: validation passed them
    assert summarize(whole, 0.5)["gate_rejected_rounds"] == len(rejected)

    Stopping = loopback.stopping_at(4)  # the server dies as it sends hop 4, after a rejection

    out = tmp_path / "stopped"
    with pytest.raises(Stopping.Stopped):
        _run(Stopping, nodes, out)
    resumed = _run(loopback, nodes, out, node_ids=5000, resume=True)  # new node ids, empty copies
    assert resumed["resumed_at_round"] == 3
    assert [r["status"] for r in resumed["rounds"]] == [r["status"] for r in rows]
    # the attacker's second rejection in a row backs it off, after the resume as without one
    assert [(g["round"], g["backoff_hops"]) for g in resumed["gate"]["rejections"]] == \
        [(g["round"], g["backoff_hops"]) for g in whole["gate"]["rejections"]]
    assert any(g["backoff_hops"] for g in whole["gate"]["rejections"])
    assert resumed["final"]["model_sha256"] == whole["final"]["model_sha256"]


def test_the_gate_slice_is_a_seeded_part_of_the_held_out_examples():
    held_out = np.arange(100, 300)
    drawn = gate_slice(held_out, 50, seed=42)
    assert len(drawn) == 50 and set(drawn) < set(held_out) and list(drawn) == sorted(drawn)
    assert np.array_equal(drawn, gate_slice(held_out, 50, seed=42))  # every arm draws the same slice
    assert not np.array_equal(drawn, gate_slice(held_out, 50, seed=7))
    assert np.array_equal(gate_slice(held_out, 0, seed=42), held_out)  # 0: all of them
    assert np.array_equal(gate_slice(held_out, 1000, seed=42), held_out)  # more than held out: all
