"""The comparison: summary lines, report and plots from results files."""

from __future__ import annotations

import json

from snake_flower.cli import main
from snake_flower.harness.compare import summarize, write_comparison


def _run(name: str, accuracies: list[float | None], nodes: int, moved: int) -> dict:
    rows = [{"round": i + 1, "nodes": list(range(nodes)), "bytes_down": moved // 2, "bytes_up": moved // 2,
             "bytes_control": 0, "raw_bytes_down": moved // 2 - 10, "raw_bytes_up": moved // 2 - 10,
             "accuracy": acc, "loss": None if acc is None else 1 - acc} for i, acc in enumerate(accuracies)]
    return {"strategy": name, "task": "synthetic", "rounds": rows,
            "final": {"accuracy": accuracies[-1], "bytes_total": moved * len(rows), "wall_s": 1.0},
            "memory": {"total_bytes": 100, "trainable_param_bytes": 40, "frozen_param_bytes": 60}}


def test_bytes_and_visits_to_the_sustained_target():
    line = summarize(_run("snake", [0.5, None, 0.86, None, 0.87], nodes=1, moved=1000), target=0.85)
    assert line["reached_target"] and line["bytes_to_target"] == 3000 and line["visits_to_target"] == 3
    assert line["round_to_target"] == 3 and line["best_accuracy"] == 0.87
    assert line["bytes_to_first_target"] == 3000 and line["visits_to_first_target"] == 3
    assert line["payload_efficiency"] == 1000 / 980


def test_an_attacked_run_counts_merged_attacker_rounds_and_honest_rounds_rolled_back():
    run = _run("snake", [0.5, 0.6, 0.7, 0.8, 0.8, 0.9, 0.9], nodes=1, moved=1000)
    statuses = ["merged", "rejected", "rejected", "merged", "merged", "merged", "failed"]
    for row, node, status in zip(run["rounds"], [3, 1, 3, 2, 2, 3, 3], statuses):
        row.update(nodes=[node + 100], partitions=[node], status=status)
    run["rounds"][-1]["partitions"] = []  # failed without a reply: its node's partition is known
    assert "attacker_rounds_merged" not in summarize(run, target=0.85)  # nobody attacked
    run["byzantine_partitions"] = [3]
    line = summarize(run, target=0.85)
    assert line["attacker_rounds"] == 4 and line["attacker_rounds_merged"] == 2
    assert line["honest_rounds_not_merged"] == 1


def test_a_fedavg_round_counts_the_attacker_only_if_its_reply_was_aggregated():
    run = _run("fedavg", [0.5, 0.6], nodes=8, moved=1000)
    run["rounds"][0].update(partitions=list(range(8)), status="merged")
    run["rounds"][1].update(partitions=[0, 1, 2, 3, 5, 6, 7], status="merged")  # MultiKrum left 4 out
    run["byzantine_partitions"] = [4]
    line = summarize(run, target=0.85)
    assert line["attacker_rounds"] == 1 and line["attacker_rounds_merged"] == 1
    assert line["honest_rounds_not_merged"] == 0


def test_a_summary_line_names_its_seed():
    run = _run("snake", [0.5], nodes=1, moved=1000)
    run["config"] = {"seed": 43}
    assert summarize(run, target=0.85)["seed"] == 43


def test_a_dip_after_the_first_touch_moves_the_target_to_where_it_stays():
    line = summarize(_run("snake", [0.5, 0.86, 0.80, None, 0.85, 0.9], nodes=1, moved=1000), target=0.85)
    assert line["bytes_to_first_target"] == 2000 and line["visits_to_first_target"] == 2
    assert line["bytes_to_target"] == 5000 and line["visits_to_target"] == 5 and line["round_to_target"] == 5


def test_a_run_that_ends_below_the_target_has_not_reached_it():
    line = summarize(_run("snake", [0.5, None, 0.86, 0.84], nodes=1, moved=1000), target=0.85)
    assert not line["reached_target"] and line["bytes_to_target"] is None and line["visits_to_target"] is None
    assert line["bytes_to_first_target"] == 3000 and line["best_accuracy"] == 0.86
    never = summarize(_run("fedavg", [0.5, 0.6], nodes=4, moved=4000), target=0.85)
    assert not never["reached_target"] and never["bytes_to_target"] is None and never["node_visits"] == 8


def test_report_says_who_reached_the_target(tmp_path):
    runs = {"snake": _run("snake", [0.5, 0.9], 1, 1000), "fedavg": _run("fedavg", [0.4, 0.7], 4, 4000)}
    summary = write_comparison(tmp_path, runs, target=0.85)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    report = (tmp_path / "report.md").read_text()
    assert "snake reached 0.85 for good at round 2" in report and "fedavg did **not** reach 0.85" in report
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "memory_per_node.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "side by side" not in report and "failed" not in report
    runs["snake"]["rounds"][0]["status"] = "failed"
    assert summarize(runs["snake"], 0.85)["failed_rounds"] == 1
    write_comparison(tmp_path, runs, target=0.85)
    assert "**snake: 1 of 2 rounds failed**" in (tmp_path / "report.md").read_text()
    write_comparison(tmp_path, runs, target=0.85, side_by_side=True)
    assert "side by side (`--jobs`)" in (tmp_path / "report.md").read_text()


def test_report_command_rebuilds_the_outputs_from_saved_runs(tmp_path, capsys):
    runs = {"fedavg": _run("fedavg", [0.4, 0.9], 4, 4000), "snake": _run("snake", [0.5, 0.9], 1, 1000)}
    for name, run in runs.items():
        run["config"] = {"target-accuracy": 0.85}
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    assert main(["report", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["runs"]) == ["snake", "fedavg"] and summary["target_accuracy"] == 0.85
    assert "snake reached 0.85 for good at round 2" in (tmp_path / "report.md").read_text()
    assert main(["report", str(tmp_path), "--target-accuracy", "0.95"]) == 0
    assert "snake did **not** reach 0.95" in (tmp_path / "report.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == f"snake-flower: error: no run results (<strategy>.json) in {empty}"


def test_plot_command_overlays_runs_from_different_folders(tmp_path, capsys, monkeypatch):
    for folder, accuracies in (("plain", [0.5, 0.9]), ("chaos", [0.4, None, 0.8])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "snake.json").write_text(json.dumps(_run("snake", accuracies, 1, 1000)))
    png = tmp_path / "overlay.png"
    args = ["plot", f"fault-free={tmp_path / 'plain' / 'snake.json'}", str(tmp_path / "chaos" / "snake.json"),
            "--out", str(png)]
    assert main(args) == 0 and png.read_bytes()[:4] == b"\x89PNG"
    seen = {}
    monkeypatch.setattr("snake_flower.harness.plots.plot_accuracy",
                        lambda runs, path, x, metric: seen.update(labels=list(runs), x=x, metric=metric) or path)
    assert main(args + ["--x", "megabytes"]) == 0
    assert seen == {"labels": ["fault-free", "chaos/snake"], "x": "megabytes", "metric": None}
    capsys.readouterr()
    assert main(args + ["--metric", "perplexity"]) == 2  # these runs are not task llm
    assert capsys.readouterr().err.strip() == ("snake-flower: error: --metric perplexity: "
                                               "only task llm runs have a perplexity")
    assert main(["plot", str(tmp_path / "missing.json"), "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"snake-flower: error: {tmp_path / 'missing.json'}: ") and "\n" not in err


def test_an_llm_run_plots_its_perplexity_from_the_pretrained_model_on(tmp_path, monkeypatch):
    from snake_flower.harness import plots

    run = _run("snake", [0.4, None, 0.5], 1, 1000)
    run["task"] = "llm"
    run["initial"] = {"accuracy": 0.3, "loss": 3.0, "perplexity": 20.0}
    for row, ppl in zip(run["rounds"], (12.0, None, 9.0)):
        row["perplexity"] = ppl
    drawn = []
    monkeypatch.setattr(plots.plt.Axes, "plot", lambda ax, xs, ys, **kw: drawn.append((list(xs), list(ys))))
    png = plots.plot_accuracy({"snake": run}, tmp_path / "ppl.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert drawn == [([0.0, 1.0, 3.0], [20.0, 12.0, 9.0])]  # initial, then the evaluated visits
