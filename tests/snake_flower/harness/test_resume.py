"""``compare`` resumes a folder: finished runs with the same settings are skipped, others are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snake_flower import simulation
from snake_flower.cli import main
from snake_flower.harness import comparison, jobs
from snake_flower.runtime import results

# the cheapest comparison that trains: the synthetic task, 3 nodes, a few short hops
ARGS = ["--run-config", "task=synthetic num-server-rounds=6 local-steps=3", "--num-supernodes", "3",
        "--strategies", "snake,fedavg"]
# figures of a run made again that depend on its measured times (the network-time model counts compute)
TIMED = ("wall_s", "cpu_s_per_visit", "network_time_s", "network_time_to_target_s")


@pytest.fixture
def stand_in(monkeypatch):
    """``run_one`` without training: it writes a small finished results file of its config."""
    def run_one(config, *args):  # noqa: ANN001, ANN002, ANN202
        results.write_json(simulation.results_path(config), _finished(config))
        return simulation.load_results(config)

    monkeypatch.setattr(simulation, "run_one", run_one)
    monkeypatch.setattr(comparison, "run_one", run_one)


def _finished(config) -> dict:  # noqa: ANN001
    rows = [{"round": i + 1, "nodes": [0], "status": "merged", "bytes_down": 500, "bytes_up": 500,
             "accuracy": acc, "loss": None} for i, acc in enumerate([0.5, 0.9])]
    return {"strategy": config.strategy, "run_name": config.name, "task": config.task,
            "config": config.as_dict(), "rounds": rows,
            "final": {"accuracy": 0.9, "bytes_total": 2000, "wall_s": 1.0},
            "memory": {"total_bytes": 100}}


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_a_second_compare_makes_only_the_missing_run(tmp_path, in_process, made, capsys):
    out = ["--out", str(tmp_path)]
    assert main(["compare", *ARGS, *out]) == 0
    assert made == [("snake", 42), ("fedavg", 42)]
    first, snake = _summary(tmp_path), (tmp_path / "snake.json").read_bytes()
    (tmp_path / "fedavg.json").unlink()
    made.clear()
    capsys.readouterr()

    assert main(["compare", *ARGS, *out]) == 0
    assert made == [("fedavg", 42)]
    shown = capsys.readouterr().out
    assert f"compare: snake seed 42: finished run in {tmp_path.resolve() / 'snake.json'}, skipped\n" in shown
    assert "[1/2] snake" not in shown and "[2/2] fedavg on synthetic" in shown
    assert (tmp_path / "snake.json").read_bytes() == snake
    again = _summary(tmp_path)
    assert again["runs"]["snake"] == first["runs"]["snake"]  # the skipped run's line, exactly
    untimed = [{k: v for k, v in s["runs"]["fedavg"].items() if k not in TIMED} for s in (first, again)]
    assert untimed[0] == untimed[1]
    assert {**again, "runs": first["runs"]} == first


def test_a_finished_run_with_other_settings_stops_the_comparison_before_any_run(tmp_path, stand_in, made,
                                                                                 capsys):
    out = ["--out", str(tmp_path), "--seeds", "2"]
    assert main(["compare", *ARGS, *out]) == 0
    stored = tmp_path / "seed-43" / "fedavg.json"
    edited = json.loads(stored.read_text())
    edited["config"]["lr"] = 0.02
    stored.write_text(json.dumps(edited))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    (tmp_path / "seed-42" / "snake.json").unlink()  # a run that would be made first
    made.clear()
    capsys.readouterr()

    assert main(["compare", *ARGS, *out]) == 2
    assert made == []  # seed 42's missing run was not started: seed 43's file was checked first
    err = capsys.readouterr().err
    assert err == (f"snake-flower: error: {stored.resolve()} holds a fedavg run with other settings "
                   f"(lr: 0.02 -> 0.05); remove it or choose another --out\n")
    del before[tmp_path / "seed-42" / "snake.json"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.json")} == before


def test_an_unfinished_results_file_is_made_again(tmp_path, stand_in, made, capsys):
    assert main(["compare", *ARGS, "--out", str(tmp_path)]) == 0
    partial = json.loads((tmp_path / "fedavg.json").read_text())
    del partial["final"]  # as a run stopped before its end leaves it
    (tmp_path / "fedavg.json").write_text(json.dumps(partial))
    (tmp_path / "snake.json").write_text('{"rounds": [')  # torn
    made.clear()
    capsys.readouterr()

    assert main(["compare", *ARGS, "--out", str(tmp_path)]) == 0
    assert made == [("snake", 42), ("fedavg", 42)]
    shown = capsys.readouterr().out
    for name in ("snake", "fedavg"):
        assert (f"compare: {name} seed 42: {tmp_path.resolve() / f'{name}.json'} holds no finished run "
                f"(interrupted?), it is made again\n") in shown
        assert "final" in json.loads((tmp_path / f"{name}.json").read_text())


def test_side_by_side_starts_only_the_missing_runs_and_deletes_nothing(tmp_path, stand_in, monkeypatch):
    out = ["--out", str(tmp_path)]
    assert main(["compare", *ARGS, *out]) == 0
    stored = {name: (tmp_path / f"{name}.json").read_bytes() for name in ("snake", "fedavg")}
    first = _summary(tmp_path)
    started, present = [], []

    def side_by_side(commands, folder, jobs=None):  # noqa: ANN001, ANN202
        started.append(sorted(commands))
        present.append(sorted(p.stem for p in folder.glob("*.json") if p.stem in stored))
        for name in commands:  # each child writes its own file, as `snake-flower run` does
            (folder / f"{name}.json").write_bytes(stored[name])
        return dict.fromkeys(commands, 0)

    monkeypatch.setattr(jobs, "run_side_by_side", side_by_side)
    (tmp_path / "fedavg.json").unlink()
    assert main(["compare", *ARGS, *out, "--jobs", "2"]) == 0
    assert started == [["fedavg"]] and present == [["snake"]]  # the skipped run's file was kept
    assert (tmp_path / "snake.json").read_bytes() == stored["snake"]
    assert _summary(tmp_path)["runs"] == first["runs"]
    # --fresh: every run is started again, and still nothing is deleted before its child starts
    assert main(["compare", *ARGS, *out, "--jobs", "2", "--fresh"]) == 0
    assert started[1] == ["fedavg", "snake"] and present[1] == ["fedavg", "snake"]


def test_a_moved_folder_still_resumes(tmp_path, stand_in, made):
    assert main(["compare", *ARGS, "--out", str(tmp_path / "before")]) == 0
    (tmp_path / "before").rename(tmp_path / "after")  # every stored out-dir now names the old folder
    made.clear()
    assert main(["compare", *ARGS, "--out", str(tmp_path / "after")]) == 0
    assert made == []


def test_a_key_newer_than_the_file_counts_only_when_set_and_the_target_never(tmp_path, stand_in, made, capsys):
    out = tmp_path / "runs"
    assert main(["compare", *ARGS, "--out", str(out)]) == 0
    stored = json.loads((out / "snake.json").read_text())
    del stored["config"]["optimizer"]  # a file written before the key existed ran with its default
    (out / "snake.json").write_text(json.dumps(stored))
    made.clear()
    # another target is the report's business while nothing stops a run on it: the runs stand
    assert main(["compare", *ARGS[:1], ARGS[1] + " target-accuracy=0.6", *ARGS[2:], "--out", str(out)]) == 0
    assert made == []
    assert json.loads((out / "summary.json").read_text())["target_accuracy"] == 0.6
    capsys.readouterr()
    assert main(["compare", *ARGS[:1], ARGS[1] + " optimizer=adam", *ARGS[2:], "--out", str(out)]) == 2
    assert 'optimizer: null -> "adam"' in capsys.readouterr().err


def test_a_run_that_stops_on_its_target_is_another_run_under_another_target(tmp_path, stand_in, made, capsys):
    out = tmp_path / "runs"
    held = ARGS[1] + " stop-after-held=2"
    assert main(["compare", ARGS[0], held + " target-accuracy=0.5", *ARGS[2:], "--out", str(out)]) == 0
    made.clear()
    capsys.readouterr()
    assert main(["compare", ARGS[0], held + " target-accuracy=0.6", *ARGS[2:], "--out", str(out)]) == 2
    assert "target-accuracy: 0.5 -> 0.6" in capsys.readouterr().err and made == []


def test_a_run_whose_rounds_all_failed_is_made_again(tmp_path, stand_in, made, capsys):
    out = tmp_path / "runs"
    assert main(["compare", *ARGS, "--out", str(out)]) == 0
    stored = json.loads((out / "snake.json").read_text())
    for row in stored["rounds"]:
        row["status"] = "failed"
    (out / "snake.json").write_text(json.dumps(stored))
    made.clear()
    assert main(["compare", *ARGS, "--out", str(out)]) == 0
    assert [name for name, _ in made] == ["snake"] and "holds no finished run" in capsys.readouterr().out
