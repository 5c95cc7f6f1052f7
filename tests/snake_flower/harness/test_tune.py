"""Tuning on equal terms: grids, the winner rule, the validation slice, the experiment file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from snake_flower.cli import main
from snake_flower.config import ConfigError, experiment_layers, load_toml, resolve
from snake_flower.harness.tune import label, parse_extras, parse_grid, pick, write_table
from snake_flower.server_app import run
from snake_flower.tasks import task as task_registry
from snake_flower.tasks.base import Task
from snake_flower.tasks.data import load_synthetic, partition_from_config, validation_split


def _run(accuracies: list[float | None], moved: int = 1000) -> dict:
    rows = [{"round": i + 1, "nodes": [0], "bytes_down": moved // 2, "bytes_up": moved // 2,
             "accuracy": acc} for i, acc in enumerate(accuracies)]
    return {"rounds": rows, "final": {"accuracy": accuracies[-1], "bytes_total": moved * len(rows), "wall_s": 1},
            "memory": {"total_bytes": 1}}


def test_grid_is_the_cartesian_product_of_typed_values():
    points = parse_grid("local-steps=100,300 lr=0.02,0.05")
    assert points == [{"local-steps": 100, "lr": 0.02}, {"local-steps": 100, "lr": 0.05},
                      {"local-steps": 300, "lr": 0.02}, {"local-steps": 300, "lr": 0.05}]
    assert label(points[1]) == "local-steps=100_lr=0.05" and parse_grid("") == [{}]
    with pytest.raises(ConfigError, match="grid: expected key=v1,v2"):
        parse_grid("lr")


def test_the_winner_moves_fewest_bytes_to_the_sustained_target_then_fewest_visits_then_best_accuracy():
    trials = [({"lr": 1}, _run([0.9, 0.8, 0.9], moved=100)),    # dips: sustained only at 300 B
              ({"lr": 2}, _run([0.5, 0.9, 0.9], moved=120)),    # sustained at 240 B: wins
              ({"lr": 3}, _run([0.95, 0.97, 0.8], moved=10))]   # ends below: never reached
    assert pick(trials, 0.85) == 1
    assert pick([({}, _run([0.5, 0.6])), ({}, _run([0.7, 0.6])), ({}, _run([0.65, 0.65]))], 0.85) == 1


def _with_cpu(run: dict, cpu_s: float, perplexities: list[float] | None = None) -> dict:
    for i, row in enumerate(run["rounds"]):
        row["train_cpu_s"] = cpu_s / len(run["rounds"])
        if perplexities:
            row["perplexity"] = perplexities[i]
    return run


def test_a_tie_on_bytes_and_visits_breaks_on_validation_quality_never_on_grid_order():
    # both hold the target from the second evaluation on, after the same bytes and visits
    worse = ({"local-steps": 300}, _with_cpu(_run([0.5, 0.88, 0.886]), 10.0))
    better = ({"local-steps": 600}, _with_cpu(_run([0.5, 0.89, 0.9]), 20.0))
    assert pick([worse, better], 0.85) == 1 and pick([better, worse], 0.85) == 0
    # equal best: the final accuracy decides; equal both: fewer CPU seconds
    ends_lower = ({}, _with_cpu(_run([0.5, 0.9, 0.88]), 5.0))
    assert pick([ends_lower, better], 0.85) == 1 and pick([better, ends_lower], 0.85) == 0
    cheaper = ({}, _with_cpu(_run([0.5, 0.89, 0.9]), 12.0))
    assert pick([better, cheaper], 0.85) == 1 and pick([cheaper, better], 0.85) == 0
    # a language model's quality is its perplexity: lower wins
    high = ({}, _with_cpu(_run([0.5, 0.9, 0.9]), 1.0, perplexities=[30.0, 12.0, 11.0]))
    low = ({}, _with_cpu(_run([0.5, 0.9, 0.9]), 9.0, perplexities=[30.0, 10.0, 9.5]))
    assert pick([high, low], 0.85) == 1 and pick([low, high], 0.85) == 0


def test_bytes_that_differ_by_a_config_string_tie_and_quality_decides():
    # the same evaluations; the better point's messages carry a longer lr-decay string (2 B a hop)
    plain = ({"lr-decay": "none"}, _with_cpu(_run([0.5, 0.88, 0.886], moved=1_000_000), 10.0))
    longer = ({"lr-decay": "cosine"}, _with_cpu(_run([0.5, 0.89, 0.9], moved=1_000_002), 10.0))
    assert pick([plain, longer], 0.85) == 1 and pick([longer, plain], 0.85) == 0
    # a real difference in bytes (here 1 %) still wins over quality
    heavier = ({}, _with_cpu(_run([0.5, 0.89, 0.95], moved=1_010_000), 10.0))
    assert pick([plain, heavier], 0.85) == 0 and pick([heavier, plain], 0.85) == 1


def test_the_winner_is_written_into_the_experiment_files_table(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('# comment kept\nlr = 0.05\n\n[fedavg]\nlocal-steps = 100  # old\nclip-norm = 0.0\n\n'
                    '# split: the comment above its table stays above it\n[split]\nlr = 0.01\n')
    write_table(toml, "fedavg", {"local-steps": 600, "lr": 0.02})
    write_table(toml, "snake", {"local-steps": 300, "kd": "on"})
    text = toml.read_text()
    assert text.startswith("# comment kept\n")
    assert "clip-norm = 0.0\nlr = 0.02\n\n# split: the comment above its table" in text  # read as written
    data = load_toml(toml)
    assert data["fedavg"] == {"local-steps": 600, "clip-norm": 0.0, "lr": 0.02}
    assert data["split"] == {"lr": 0.01} and data["snake"] == {"local-steps": 300, "kd": "on"}
    assert resolve(*experiment_layers(data, "fedavg"))["local-steps"] == 600


def test_the_validation_slice_is_held_out_stratified_and_no_node_trains_on_it():
    _, labels, _, _ = load_synthetic()
    config = resolve({"task": "synthetic", "validation-size": 200, "partitioner": "iid"})
    pool, held = validation_split(labels, config)
    assert len(held) == 200 and len(pool) == len(labels) - 200 and not set(pool) & set(held)
    assert np.bincount(labels[held].numpy(), minlength=10).tolist() == [20] * 10  # stratified
    parts = [partition_from_config(labels, config, 4, i) for i in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(pool.tolist())
    assert validation_split(labels, resolve({"task": "synthetic"}))[0] is None
    with pytest.raises(ConfigError, match="evaluate-on: 'validation' needs validation-size > 0"):
        resolve({"evaluate-on": "validation"})


@pytest.fixture
def test_set_poisoned(monkeypatch):
    """Task synthetic with a test set that no evaluation could score (NaN inputs, no labels in range)."""
    x_train, y_train, x_test, _ = load_synthetic()
    poisoned = Task("synthetic", task_registry.SEGMENTS, task_registry.tiny_cnn,
                    lambda data_dir: (x_train, y_train, torch.full_like(x_test, float("nan")),
                                      torch.full((len(x_test),), 99)))
    monkeypatch.setitem(task_registry.TASKS, "synthetic", poisoned)


def test_tuning_never_reads_the_test_set(loopback, nodes, tmp_path, test_set_poisoned, monkeypatch, capsys):
    def in_process(config, num_supernodes, parallel=0, ray_address=""):  # the ServerApp over in-process nodes
        node = nodes(num_supernodes)
        return run(loopback(list(node.contexts), node), config)

    monkeypatch.setattr("snake_flower.simulation.run_one", in_process)
    toml = tmp_path / "exp.toml"
    toml.write_text('task = "synthetic"\npartitioner = "iid"\nvalidation-size = 200\ntune-visits = 6\n'
                    'local-steps = 2\ntarget-accuracy = 0.3\n')
    args = ["tune", "--config", str(toml), "--strategy", "snake", "--grid", "lr=0.05,0.1", "--extra",
            "window=1", "--num-supernodes", "3", "--out", str(tmp_path / "out"), "--write"]
    assert main(args) == 0
    tuned = json.loads((tmp_path / "out" / "tune-snake.json").read_text())
    assert [t["settings"] for t in tuned["trials"]][:2] == [{"lr": 0.05}, {"lr": 0.1}]
    assert len(tuned["trials"]) == 3 and tuned["trials"][2]["settings"]["window"] == 1
    for trial in tuned["trials"]:  # scored on validation: the poisoned test set would score 0 and NaN
        result = json.loads((tmp_path / "out" / "snake" / label(trial["settings"]) / "snake.json").read_text())
        assert trial["node_visits"] == 6 and result["config"]["evaluate-on"] == "validation"
        assert result["final"]["accuracy"] > 0 and math.isfinite(result["final"]["loss"])
    assert load_toml(toml)["snake"] == tuned["winner"]
    assert "winner" in capsys.readouterr().out
    toml.write_text('task = "synthetic"\n')
    assert main(args) == 2  # no validation slice: refused before any run
    assert "validation-size: tune needs a slice" in capsys.readouterr().err


def test_an_interrupted_tune_reuses_only_finished_runs_of_the_same_configuration(tmp_path):
    from snake_flower.harness.tune import _finished
    from snake_flower.simulation import results_path

    config = resolve({"out-dir": str(tmp_path), "strategy": "fedavg", "local-steps": 600})
    path = results_path(config)
    assert _finished(config) is None                                  # nothing ran yet
    path.write_text(json.dumps({"config": config.as_dict(), "rounds": []}))     # killed before the end
    assert _finished(config) is None
    path.write_text(json.dumps({"config": config.as_dict(), "rounds": [], "final": {"accuracy": 0.9}}))
    assert _finished(config)["final"]["accuracy"] == 0.9
    assert _finished(config.replace(lr=0.02)) is None                  # another point's settings
    stored = {**config.as_dict(), "out-dir": "/elsewhere"}
    stored.pop("stop-after-held")                                      # a key newer than the file, at its default
    path.write_text(json.dumps({"config": stored, "rounds": [], "final": {"accuracy": 0.9}}))
    assert _finished(config)["final"]["accuracy"] == 0.9               # a moved folder is the same trial
    assert _finished(config.replace(stop_after_held=3)) is None        # ... unless the new key is set
    path.write_text("{not json")
    assert _finished(config) is None


@pytest.mark.parametrize("strategy", ["snake", "fedavg", "split"])
def test_a_run_below_the_target_past_its_bound_stops_and_is_written_as_pruned(loopback, nodes, tmp_path,
                                                                               strategy):
    config = {"task": "synthetic", "strategy": strategy, "num-server-rounds": 12, "local-steps": 2,
              "eval-every": 3, "prune-above-bytes": 1.0}
    node = nodes(3)
    below = run(loopback(list(node.contexts), node),
                resolve({**config, "target-accuracy": 0.99, "out-dir": str(tmp_path / "below")}))
    assert below["pruned"]["round"] == below["rounds"][-1]["round"] < below["config"]["num-server-rounds"] // (
        3 if strategy == "fedavg" else 1)
    assert json.loads((tmp_path / "below" / f"{strategy}.json").read_text())["pruned"] == below["pruned"]
    node = nodes(3)
    above = run(loopback(list(node.contexts), node),
                resolve({**config, "target-accuracy": 0.01, "out-dir": str(tmp_path / "above")}))
    assert "pruned" not in above and len(above["rounds"]) == (4 if strategy == "fedavg" else 12)


def test_tune_prunes_a_trial_that_can_no_longer_win(loopback, nodes, tmp_path, monkeypatch):
    def in_process(config, num_supernodes, parallel=0, ray_address=""):
        node = nodes(num_supernodes)
        return run(loopback(list(node.contexts), node), config)

    monkeypatch.setattr("snake_flower.simulation.run_one", in_process)
    toml = tmp_path / "exp.toml"
    toml.write_text('task = "synthetic"\npartitioner = "iid"\nvalidation-size = 200\ntune-visits = 12\n'
                    'local-steps = 20\ntarget-accuracy = 0.3\neval-every = 3\n')
    args = ["tune", "--config", str(toml), "--strategy", "snake", "--grid", "lr=0.05,0.0",
            "--num-supernodes", "3", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    tuned = json.loads((tmp_path / "out" / "tune-snake.json").read_text())
    learnt, still = tuned["trials"]                     # lr 0: the initial model, never at the target
    assert learnt["reached_target"] and learnt["pruned"] is None and learnt["node_visits"] == 12
    assert still["pruned"]["bytes"] >= learnt["bytes_to_target"] and still["node_visits"] < 12
    assert tuned["winner"] == {"lr": 0.05}
    assert "pruned at" in (tmp_path / "out" / "tune-snake.md").read_text()
    assert main(args) == 0                              # run again: both trials are reused, none re-run
    monkeypatch.setattr("snake_flower.simulation.run_one", lambda *a, **k: pytest.fail("re-ran a trial"))
    assert main(args) == 0


def test_a_perplexity_target_picks_and_tables_on_perplexity():
    from snake_flower.harness.targets import Target
    from snake_flower.harness.tune import table

    def ppl_run(perplexities, moved):
        run = _run([0.1] * len(perplexities), moved)
        for row, ppl in zip(run["rounds"], perplexities):
            row["perplexity"] = ppl
        run["final"]["perplexity"] = perplexities[-1]
        return run

    target = Target(0.85, perplexity=7.5)
    trials = [({"lr": 1}, ppl_run([9.0, 7.4, 7.2], moved=100)),   # at or below 7.5 from the second: 200 B
              ({"lr": 2}, ppl_run([7.0, 8.0, 7.5], moved=50)),    # dips back above: from the third, 150 B
              ({"lr": 3}, ppl_run([7.0, 7.1, 7.6], moved=10))]    # ends above: never
    assert pick(trials, target) == 1
    text = table("snake", trials, target, 1)
    assert "reached perplexity 7.5 on validation" in text and "best val ppl | final val ppl" in text
    assert "| **lr=2** | yes | 0.00 | 3 | 7.00 | 7.50 |" in text and "| lr=3 | no | – | – | 7.00 | 7.60 |" in text
    assert pick(trials, 0.05) == 2  # the same runs on an accuracy target: all reached it at once; fewest bytes


def test_an_extra_point_is_one_per_value_or_one_per_joined_recipe():
    assert parse_extras("kd=on window=2,3") == [{"kd": "on"}, {"window": 2}, {"window": 3}]
    recipe = parse_extras("lora-rank=16 optimizer=adamw+lr-decay=cosine+lr=5e-5")
    assert recipe == [{"lora-rank": 16}, {"optimizer": "adamw", "lr-decay": "cosine", "lr": 5e-5}]
    assert parse_extras("lr=1e+3") == [{"lr": 1000.0}] and parse_extras("") == []
    with pytest.raises(ConfigError, match="one value per key"):
        parse_extras("optimizer=adamw+lr=0.1,0.2")
    with pytest.raises(ConfigError, match="grid: expected key=v1,v2"):
        parse_extras("optimizer=adamw+lr")
