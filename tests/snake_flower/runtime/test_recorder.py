"""The run record's early stops: a target held for ``stop-after-held`` evaluations, on accuracy or perplexity."""

from __future__ import annotations

import json

import pytest

from snake_flower.config import resolve
from snake_flower.harness.compare import summarize
from snake_flower.harness.targets import Target
from snake_flower.server_app import run

SYNTHETIC = {"task": "synthetic", "num-server-rounds": 12, "local-steps": 2, "eval-every": 3}
TINY_LLM = {"task": "llm", "model": "tiny-opt", "seq-len": 48, "partitioner": "topic", "window": 1,
            "train-head": False, "local-steps": 1, "batch-size": 4, "kd": "off", "eval-samples": 16,
            "num-server-rounds": 8, "eval-every": 2, "frozen-dtype": "fp16"}


def _run(loopback, nodes, config, count=3):
    node = nodes(count)
    return run(loopback(list(node.contexts), node), resolve(config))


@pytest.mark.parametrize("strategy", ["snake", "fedavg"])
def test_a_run_stops_once_it_held_the_target_for_n_evaluations(loopback, nodes, tmp_path, strategy):
    config = {**SYNTHETIC, "strategy": strategy, "stop-after-held": 2, "target-accuracy": 0.01,
              "out-dir": str(tmp_path / "held")}
    held = _run(loopback, nodes, config)
    evaluated = [row["round"] for row in held["rounds"] if row["accuracy"] is not None]
    assert len(evaluated) == 2 and held["rounds"][-1]["round"] == evaluated[-1]  # stopped at the second
    assert held["stopped_held"] == {"round": evaluated[-1], "evaluations": 2}
    assert held["final"]["round"] == evaluated[-1]
    stored = json.loads((tmp_path / "held" / f"{strategy}.json").read_text())
    assert stored["stopped_held"] == held["stopped_held"]
    # reached at the first of the held evaluations, as a run that went on at the target counts it
    assert summarize(stored, 0.01)["round_to_target"] == evaluated[0]
    never = _run(loopback, nodes, {**config, "target-accuracy": 0.999, "out-dir": str(tmp_path / "never")})
    assert "stopped_held" not in never and len(never["rounds"]) == (4 if strategy == "fedavg" else 12)


def test_a_perplexity_target_stops_and_prunes_on_perplexity(loopback, nodes, tmp_path):
    easy = _run(loopback, nodes, {**TINY_LLM, "target-perplexity": 1e9, "stop-after-held": 2,
                                  "out-dir": str(tmp_path / "easy")}, count=4)
    assert easy["stopped_held"]["evaluations"] == 2 and easy["rounds"][-1]["round"] == 4  # evaluated at 2 and 4
    line = summarize(easy, Target.of(easy["config"]))
    assert line["reached_target"] and line["round_to_target"] == 2
    # an accuracy that would count as met (0.0 is reached by anything) does not stop a perplexity run
    hard = _run(loopback, nodes, {**TINY_LLM, "target-perplexity": 1.0, "target-accuracy": 0.001,
                                  "stop-after-held": 1, "prune-above-bytes": 1.0,
                                  "out-dir": str(tmp_path / "hard")}, count=4)
    assert "stopped_held" not in hard
    assert hard["pruned"]["round"] == 2 and hard["pruned"]["perplexity"] > 1.0
