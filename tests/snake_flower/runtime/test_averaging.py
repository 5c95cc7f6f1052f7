"""The server-side moving average of the model over hops: evaluated and returned, never sent."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord

from snake_flower.config import ConfigError, resolve
from snake_flower.runtime.averaging import ModelAverage
from snake_flower.server_app import run


def test_the_average_starts_at_the_first_model_and_weights_the_past_by_decay():
    average = ModelAverage(0.75)
    first = {"w": torch.tensor([4.0]), "count": torch.tensor(1)}
    second = {"w": torch.tensor([8.0]), "count": torch.tensor(2)}
    assert average.update(ArrayRecord(first)).to_torch_state_dict()["w"].item() == 4.0
    mixed = average.update(ArrayRecord(second)).to_torch_state_dict()
    assert mixed["w"].item() == 0.75 * 4.0 + 0.25 * 8.0 and mixed["count"].item() == 2
    assert first["w"].item() == 4.0  # the models folded in are never changed
    with pytest.raises(ValueError, match="average-decay"):
        ModelAverage(1.0)
    with pytest.raises(ConfigError, match="only snake and relay average"):
        resolve({"strategy": "fedavg", "average-decay": 0.9})


def _run(loopback, nodes, out, hops, **overrides):
    config = resolve({"task": "synthetic", "num-server-rounds": hops, "out-dir": str(out), "local-steps": 2,
                      "window": 1, **overrides})
    node = nodes(3)
    run(loopback(list(node.contexts), node), config)
    return json.loads((out / "snake.json").read_text())


def test_nodes_get_the_raw_model_and_the_run_returns_the_average(loopback, nodes, tmp_path):
    raw = _run(loopback, nodes, tmp_path / "raw", hops=4)
    averaged = _run(loopback, nodes, tmp_path / "avg", hops=4, **{"average-decay": 0.5})
    # training is untouched: every hop moved the same bytes, trained the same window on the same node
    for a, b in zip(raw["rounds"], averaged["rounds"]):
        assert (a["bytes_down"], a["bytes_up"], a["window"], a["nodes"]) == \
               (b["bytes_down"], b["bytes_up"], b["window"], b["nodes"])
    assert raw["provenance"] == averaged["provenance"]
    # what is evaluated and returned is the average, not the last model
    assert averaged["final"]["model_sha256"] != raw["final"]["model_sha256"]
    assert averaged["final"]["accuracy"] != raw["final"]["accuracy"]


def test_a_resumed_run_continues_the_same_average(loopback, nodes, tmp_path):
    whole = _run(loopback, nodes, tmp_path / "whole", hops=4, **{"average-decay": 0.5})
    _run(loopback, nodes, tmp_path / "cut", hops=2, **{"average-decay": 0.5})
    resumed = _run(loopback, nodes, tmp_path / "cut", hops=4, resume=True, **{"average-decay": 0.5})
    assert resumed["resumed_at_round"] == 2
    assert resumed["final"]["model_sha256"] == whole["final"]["model_sha256"]
