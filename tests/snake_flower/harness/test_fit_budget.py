"""``fit-budget-mb``: ``compare`` does not run a strategy whose node, measured with its own
settings, outgrows the budget; it says so in one line and reports it as "does not fit"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snake_flower import simulation
from snake_flower.cli import main
from snake_flower.harness import comparison, fit_budget
from snake_flower.runtime import results

# the cheapest comparison a fit budget applies to (task llm): tiny-opt, 3 nodes, a few short hops
ARGS = ["--num-supernodes", "3", "--strategies", "snake,fedavg"]
RUN = "task=llm model=tiny-opt seq-len=48 partitioner=topic window=1 train-head=false num-server-rounds=6 local-steps=3"
GROWTH = {"snake": 120_000_000, "fedavg": 900_000_000}  # the stand-in measurement's node growth
REFUSAL = ("compare: fedavg does not fit fit-budget-mb 500: its node grows by 900.0 MB "
           "(snake-flower memory --measure); not run")


@pytest.fixture
def measured(monkeypatch):
    """The run configs measured, by a stand-in for ``memory --measure`` (``GROWTH`` per strategy)."""
    calls = []

    def measure(config):  # noqa: ANN001, ANN202
        calls.append((config.name, config.seed, config.local_steps))
        return {"grown_bytes": GROWTH[config.strategy], "hops": {}}

    monkeypatch.setattr(fit_budget, "measure_growth", measure)
    return calls


@pytest.fixture
def stand_in(monkeypatch):
    """``run_one`` without training: a small finished results file of its config."""
    def run_one(config, *args):  # noqa: ANN001, ANN002, ANN202
        rows = [{"round": i + 1, "nodes": [0], "status": "merged", "bytes_down": 500, "bytes_up": 500,
                 "accuracy": acc, "loss": None} for i, acc in enumerate([0.5, 0.9])]
        results.write_json(simulation.results_path(config), {
            "strategy": config.strategy, "run_name": config.name, "task": config.task,
            "config": config.as_dict(), "rounds": rows, "final": {"accuracy": 0.9, "bytes_total": 2000, "wall_s": 1.0},
            "memory": {"total_bytes": 100}})
        return simulation.load_results(config)

    monkeypatch.setattr(comparison, "run_one", run_one)


def _compare(out: Path, run_config: str, *extra: str) -> int:
    return main(["compare", *ARGS, "--run-config", run_config, "--out", str(out), *extra])


def test_a_strategy_over_the_budget_is_refused_in_one_line_and_shown_as_does_not_fit(
        tmp_path, in_process, made, measured, capsys):
    assert _compare(tmp_path, f"{RUN} fit-budget-mb=500") == 0
    assert made == [("snake", 42)]  # fedavg was never started
    assert sorted(name for name, _, _ in measured) == ["fedavg", "snake"]
    shown = capsys.readouterr().out
    assert [line for line in shown.splitlines() if "does not fit" in line] == [REFUSAL]
    assert not (tmp_path / "fedavg.json").exists() and (tmp_path / "snake.json").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["does_not_fit"] == {"fedavg": {"fits": False, "node_growth_bytes": 900_000_000,
                                                  "fit_budget_bytes": 500_000_000}}
    snake = summary["runs"]["snake"]
    assert list(summary["runs"]) == ["snake"] and snake["rounds"] > 0  # the other arm ran as usual
    assert (snake["fits"], snake["node_growth_bytes"], snake["fit_budget_bytes"]) == (True, 120_000_000, 500_000_000)
    report = (tmp_path / "report.md").read_text()
    assert "| fedavg | does not fit (needs 900.0 MB) |" in report
    assert "- fedavg was **not run**: its node grows by 900.0 MB" in report
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0  # rebuilt from the saved runs, the refusal kept
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| fedavg | does not fit (needs 900.0 MB) |" in (tmp_path / "report.md").read_text()


def test_without_a_budget_nothing_is_measured_and_the_summary_is_as_before(tmp_path, stand_in, measured):
    assert _compare(tmp_path, RUN) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert measured == [] and "does_not_fit" not in summary and "fits" not in summary["runs"]["snake"]
    assert not list(tmp_path.glob("memory-*.json"))


def test_when_no_strategy_fits_nothing_is_run_and_compare_exits_1(tmp_path, stand_in, measured, capsys):
    assert _compare(tmp_path, f"{RUN} fit-budget-mb=100") == 1
    out, err = capsys.readouterr()
    assert "compare: snake does not fit fit-budget-mb 100: its node grows by 120.0 MB" in out
    assert "compare: fedavg does not fit fit-budget-mb 100" in out
    assert err.strip() == "snake-flower: error: no run fits its fit-budget-mb; nothing was run"
    assert not list(tmp_path.glob("snake.json")) and not (tmp_path / "summary.json").exists()


def test_over_seeds_a_run_is_measured_once_and_its_refusal_stands_beside_the_medians(
        tmp_path, stand_in, measured):
    assert _compare(tmp_path, f"{RUN} fit-budget-mb=500", "--seeds", "2") == 0
    assert measured == [("snake", 42, 3), ("fedavg", 42, 3)]  # the first seed's configs, once
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"]["snake"]["fits"] is True  # one verdict per run, not a spread over seeds
    assert summary["runs"]["snake"]["bytes_total"]["median"] == 2000
    assert summary["does_not_fit"]["fedavg"]["node_growth_bytes"] == 900_000_000
    assert not (tmp_path / "seed-42" / "fedavg.json").exists() and not (tmp_path / "seed-43" / "fedavg.json").exists()
    assert "| fedavg | does not fit (needs 900.0 MB) |" in (tmp_path / "report.md").read_text()
    assert {p.name for p in tmp_path.glob("memory-*.json")} == {"memory-snake.json", "memory-fedavg.json"}


def test_the_measurement_is_reused_while_the_config_is_the_same_and_redone_when_it_changes(
        tmp_path, stand_in, measured, capsys):
    assert _compare(tmp_path, f"{RUN} fit-budget-mb=500") == 0
    assert [name for name, _, _ in measured] == ["snake", "fedavg"]
    cached = json.loads((tmp_path / "memory-fedavg.json").read_text())
    assert cached["node_growth_bytes"] == 900_000_000 and cached["config"]["strategy"] == "fedavg"
    measured.clear()
    capsys.readouterr()

    assert _compare(tmp_path, f"{RUN} fit-budget-mb=500") == 0  # the same settings: nothing measured
    assert measured == []
    shown = capsys.readouterr().out
    assert "compare: fedavg: node growth 900.0 MB, measured before" in shown and REFUSAL in shown
    assert _compare(tmp_path, f"{RUN} fit-budget-mb=1000") == 0  # the budget is no part of the measurement
    assert measured == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"]["fedavg"]["fits"] is True
    assert main(["report", str(tmp_path)]) == 0  # report rebuilds with the budget compare last used
    assert json.loads((tmp_path / "summary.json").read_text())["runs"]["fedavg"] == summary["runs"]["fedavg"]

    assert _compare(tmp_path, f"{RUN.replace('local-steps=3', 'local-steps=4')} fit-budget-mb=500", "--fresh") == 0
    assert measured == [("snake", 42, 4), ("fedavg", 42, 4)]  # other settings: measured again
    assert json.loads((tmp_path / "memory-snake.json").read_text())["config"]["local-steps"] == 4


def test_a_budget_is_a_non_negative_number(tmp_path, capsys):
    assert _compare(tmp_path, f"{RUN} fit-budget-mb=-1") == 2
    assert capsys.readouterr().err.strip() == "snake-flower: error: fit-budget-mb: must be >= 0, got -1.0"
