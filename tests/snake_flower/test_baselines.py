"""Baselines as their own communities train them, relay, equal evaluation, per-run settings."""

from __future__ import annotations

import argparse
import json

import pytest
from torch.utils.flop_counter import FlopCounterMode

from snake_flower.cli import resolve_runs
from snake_flower.config import ConfigError, experiment_layers, kd_enabled, resolve
from snake_flower.harness.comparison import evaluated_alike
from snake_flower.runtime.results import cumulative_visits
from snake_flower.server_app import run
from snake_flower.tasks.task import TASKS, build_model, segment_keys
from snake_flower.training import loop


def _run(loopback, nodes, tmp_path, hops=6, **overrides):
    config = resolve({"task": "synthetic", "num-server-rounds": hops, "out-dir": str(tmp_path),
                      "local-steps": 3, **overrides})
    node = nodes(3)
    run(loopback(list(node.contexts), node), config)
    return json.loads((tmp_path / f"{config['run-name'] or config['strategy']}.json").read_text())


@pytest.fixture
def distillations(monkeypatch):
    """How many times a node computed the distillation loss."""
    calls = []
    real = loop.distillation_loss
    monkeypatch.setattr(loop, "distillation_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_under_the_default_config_a_fedavg_node_trains_without_distillation(loopback, nodes, tmp_path,
                                                                            distillations):
    assert resolve({})["partitioner"] != "iid" and resolve({})["kd"] == "auto"  # KD is on for Snake
    _run(loopback, nodes, tmp_path / "s", hops=3)
    assert distillations, "Snake distils under the default non-IID config"
    distillations.clear()
    fedavg = _run(loopback, nodes, tmp_path / "f", hops=6, strategy="fedavg", kd="on")
    assert not distillations and len(fedavg["rounds"]) == 2
    assert not kd_enabled(resolve({"strategy": "fedavg", "kd": "on"}))
    assert not kd_enabled(resolve({"strategy": "split", "kd": "on"}))
    assert kd_enabled(resolve({"strategy": "relay", "kd": "on"}))


def test_relay_trains_and_moves_the_whole_model_one_node_at_a_time(loopback, nodes, tmp_path):
    relay = _run(loopback, nodes, tmp_path, hops=4, strategy="relay", window=1)
    segments = list(TASKS["synthetic"].segment_names)
    model = relay["final"]["model_bytes"]
    for row in relay["rounds"]:
        assert len(row["nodes"]) == 1 and row["window"] == segments and row["status"] == "merged"
        assert model < row["bytes_up"] < model * 1.05  # the whole model goes up every hop
    assert relay["strategy"] == "relay" and set(relay["provenance"]) == set(segments)
    assert all(p["round"] == 4 for p in relay["provenance"].values())  # the last hop trained every segment
    # every parameter trains (with KD, the received copy a teacher needs is counted apart, as frozen)
    params = sum(p.numel() * 4 for p in build_model(TASKS["synthetic"], 0).parameters())
    assert relay["memory"]["trainable_param_bytes"] == params


def test_every_visit_reports_its_compute(loopback, nodes, tmp_path):
    snake = _run(loopback, nodes, tmp_path / "s", hops=3, window=1)
    plain = _run(loopback, nodes, tmp_path / "p", hops=3, window=1, kd="off")
    fedavg = _run(loopback, nodes, tmp_path / "f", hops=3, strategy="fedavg")
    for row in snake["rounds"] + fedavg["rounds"]:
        assert row["train_flops"] > 0 and row["train_cpu_s"] > 0
    # the same windows: distillation adds the teacher's forward pass to every step
    assert [r["window"] for r in snake["rounds"]] == [r["window"] for r in plain["rounds"]]
    assert all(s["train_flops"] > p["train_flops"] for s, p in zip(snake["rounds"], plain["rounds"]))
    # FLOPs are one step's times the steps: FedAvg's three nodes did 3 steps each
    model = build_model(TASKS["synthetic"], 0)
    x, y = TASKS["synthetic"].load("")[2:]
    with FlopCounterMode(display=False) as counter:
        loop.train_window(model, list(segment_keys(model)), (x[:32], y[:32]), segments=segment_keys(model),
                          work=loop.LocalWork(steps=1), seed=0)
    assert fedavg["rounds"][0]["train_flops"] == 3 * 3 * counter.get_total_flops()


def test_a_comparison_evaluates_every_run_at_the_same_node_visits(loopback, nodes, tmp_path, capsys):
    configs = evaluated_alike([resolve({"strategy": s, "task": "synthetic", "eval-every": e})
                                for s, e in (("snake", 2), ("fedavg", 2), ("split", 1))], num_supernodes=3)
    assert [c["eval-every"] for c in configs] == [3, 3, 3]
    assert "evaluated every 3 node visits" in capsys.readouterr().out
    visits = {}
    for config in configs[:2]:
        name = config["strategy"]
        result = _run(loopback, nodes, tmp_path / name, hops=9, strategy=name, **{"eval-every": 3})
        rows = result["rounds"]
        visits[name] = [v for v, r in zip(cumulative_visits(rows), rows) if r["accuracy"] is not None]
    assert visits["snake"] == visits["fedavg"] == [3, 6, 9]


def test_experiment_tables_take_precedence_over_flat_keys_and_yield_to_overrides(tmp_path):
    data = {"lr": 0.05, "local-steps": 100, "fedavg": {"local-steps": 600, "clip-norm": 0.0},
            "snake-w1": {"strategy": "snake", "window": 1}}
    fedavg = resolve(*experiment_layers(data, "fedavg"))
    assert (fedavg["strategy"], fedavg["local-steps"], fedavg["clip-norm"], fedavg["lr"]) == ("fedavg", 600, 0.0, 0.05)
    assert resolve(*experiment_layers(data, "fedavg"), {"local-steps": 7})["local-steps"] == 7
    snake = resolve(*experiment_layers(data, "snake"))
    assert (snake["local-steps"], snake["clip-norm"], snake["run-name"]) == (100, 1.0, "")
    variant = resolve(*experiment_layers(data, "snake-w1"))
    assert (variant["strategy"], variant["window"], variant["run-name"]) == ("snake", 1, "snake-w1")
    with pytest.raises(ConfigError, match=r"^\[w2\]: a variant table must set strategy"):
        experiment_layers({"w2": {"window": 2}}, "snake")
    with pytest.raises(ConfigError, match="neither a strategy nor a table"):
        experiment_layers(data, "snek")


def test_compare_reads_the_per_strategy_tables_of_the_experiment_file(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('task = "synthetic"\nlr = 0.02\n[fedavg]\nlocal-steps = 600\nclip-norm = 0.0\n'
                    '[relay]\nkd = "off"\n[snake-w1]\nstrategy = "snake"\nwindow = 1\n')
    args = argparse.Namespace(config=str(toml), run_config="seed=7", num_supernodes=3, out=str(tmp_path),
                              jobs=1, seeds=1, parallel=0)
    configs = {c["run-name"]: c for c in resolve_runs(args, ["snake", "relay", "fedavg", "snake-w1"])}
    assert configs["fedavg"]["local-steps"] == 600 and configs["fedavg"]["clip-norm"] == 0.0
    assert configs["snake"]["local-steps"] == 100 and configs["snake"]["clip-norm"] == 1.0
    assert configs["relay"]["kd"] == "off" and configs["snake-w1"]["window"] == 1
    assert all(c["lr"] == 0.02 and c["seed"] == 7 for c in configs.values())


def test_a_fedavg_visit_without_a_good_reply_is_recorded_as_a_failure(loopback, nodes, tmp_path, capsys):
    from flwr.app import Error

    from snake_flower.simulation import load_results

    config = resolve({"task": "synthetic", "strategy": "fedavg", "num-server-rounds": 6, "local-steps": 3,
                      "out-dir": str(tmp_path)})
    node = nodes(3)
    failing = sorted(node.contexts)[1]
    node.tamper = lambda content, node_id: Error(code=1, reason="Traceback ...\nRuntimeError: boom") \
        if node_id == failing and "arrays" in content else content
    run(loopback(list(node.contexts), node), config)
    result = load_results(config)
    assert [(f["round"], f["node"], f["reason"]) for f in result["failures"]] == \
        [(1, failing, "RuntimeError: boom"), (2, failing, "RuntimeError: boom")]
    assert "2 FAILED visits" in capsys.readouterr().out
