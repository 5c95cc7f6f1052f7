"""The comparison: summary lines, report and plots from results files."""

from __future__ import annotations

import json
import math

from snake_flower.cli import main
from snake_flower.harness.comparison import _headline
from snake_flower.harness.compare import summarize, write_comparison
from snake_flower.harness.targets import Target, first_touch, sustained


def _run(name: str, accuracies: list[float | None], nodes: int, moved: int) -> dict:
    rows = [{"round": i + 1, "nodes": list(range(nodes)), "bytes_down": moved // 2, "bytes_up": moved // 2,
             "bytes_control": 0, "raw_bytes_down": moved // 2 - 10, "raw_bytes_up": moved // 2 - 10,
             "accuracy": acc, "loss": None if acc is None else 1 - acc} for i, acc in enumerate(accuracies)]
    return {"strategy": name, "task": "synthetic", "rounds": rows,
            "final": {"accuracy": accuracies[-1], "bytes_total": moved * len(rows), "wall_s": 1.0},
            "memory": {"total_bytes": 100, "trainable_param_bytes": 40, "frozen_param_bytes": 60}}


PPL_CONFIG = {"target-accuracy": 0.85, "target-perplexity": 7.5, "perplexity-levels": "12,9,7.1"}


def _llm_run(name: str, perplexities: list[float | None], moved: int = 1000) -> dict:
    """A task llm run: one node per hop, 0.5 network seconds per hop, its token accuracy meaningless."""
    run = _run(name, [None if p is None else 0.3 for p in perplexities], nodes=1, moved=moved)
    run["task"], run["config"] = "llm", dict(PPL_CONFIG)
    for row, ppl in zip(run["rounds"], perplexities):
        row.update(perplexity=ppl, loss=None if ppl is None else math.log(ppl), network_time_s=0.5)
    run["final"]["perplexity"] = perplexities[-1]
    return run


# summarize's line for _run("snake", [0.5, 0.86, 0.80, None, 0.85, 0.9], 1, 1000) at 0.85, as written
# before perplexity targets existed: an accuracy summary must stay as it was, key order included
ACCURACY_LINE = {"final_accuracy": 0.9, "best_accuracy": 0.9, "reached_target": True, "bytes_total": 6000,
                 "bytes_to_target": 5000, "bytes_to_first_target": 2000, "mode": "cs", "network_time_s": 0.0,
                 "network_time_to_target_s": 0.0, "visits_to_target": 5, "visits_to_first_target": 2,
                 "round_to_target": 5, "node_peak_memory_bytes": 100, "cpu_s_per_visit": 0.0,
                 "flops_per_visit": 0.0, "wall_s": 1.0, "rounds": 6, "node_visits": 6, "failed_rounds": 0,
                 "payload_efficiency": 1000 / 980}


def test_an_accuracy_summary_is_as_before_perplexity_targets(tmp_path):
    run = _run("snake", [0.5, 0.86, 0.80, None, 0.85, 0.9], nodes=1, moved=1000)
    run["config"] = {"target-accuracy": 0.85, "target-perplexity": 0.0, "perplexity-levels": ""}
    for target in (0.85, Target(0.85), Target.of(run["config"])):
        line = summarize(run, target)
        assert line == ACCURACY_LINE and list(line) == list(ACCURACY_LINE)
    write_comparison(tmp_path, {"snake": run}, Target.of(run["config"]))
    before = {"target_accuracy": 0.85, "side_by_side": False, "runs": {"snake": ACCURACY_LINE}}
    assert (tmp_path / "summary.json").read_text() == json.dumps(before, indent=1) + "\n"
    assert "| run | mode | final acc | best acc |" in (tmp_path / "report.md").read_text()


def test_a_perplexity_target_is_reached_where_the_curve_stays_at_or_below_it():
    dips = [20.0, 7.0, 8.0, None, 7.5, 6.0]  # touches 7.5 at row 1, rises, then stays from row 4
    assert sustained(dips, 7.5, lower_is_better=True) == 4 and first_touch(dips, 7.5, lower_is_better=True) == 1
    assert sustained([20.0, 7.0, 8.0], 7.5, lower_is_better=True) is None  # touched, then rose: not reached
    assert sustained([7.0, 7.0, 7.6], 7.5, lower_is_better=True) is None  # the last evaluation is above
    assert first_touch([20.0, 9.0], 7.5, lower_is_better=True) is None
    gaps = [None, 9.0, None, 7.2, None]  # rows without an evaluation are skipped, at the end too
    assert sustained(gaps, 7.5, lower_is_better=True) == 3 and first_touch(gaps, 7.5, lower_is_better=True) == 3
    assert sustained([0.5, 0.9, 0.8, 0.9], 0.85) == 3 and first_touch([0.5, 0.9, 0.8, 0.9], 0.85) == 1


def test_a_perplexity_summary_counts_to_the_target_and_to_each_level():
    # row 5 is an older LLM row with its loss only: perplexity exp(loss) = 8.0, above the target
    run = _llm_run("snake", [20.0, None, 11.0, 7.0, 8.0, 7.2])
    run["rounds"][4]["perplexity"] = None
    line = summarize(run, Target.of(run["config"]))
    assert line["final_perplexity"] == 7.2 and line["best_perplexity"] == 7.0
    assert line["final_accuracy"] == 0.3  # still there, not what the target counts
    assert line["reached_target"] and line["round_to_target"] == 6 and line["bytes_to_target"] == 6000
    assert line["visits_to_target"] == 6 and line["network_time_to_target_s"] == 3.0
    assert line["bytes_to_first_target"] == 4000 and line["visits_to_first_target"] == 4
    assert line["levels"] == [
        {"level": 12.0, "bytes_to_level": 3000, "visits_to_level": 3, "network_time_to_level_s": 1.5},
        {"level": 9.0, "bytes_to_level": 4000, "visits_to_level": 4, "network_time_to_level_s": 2.0},
        # touched at row 4 (7.0), above it after: never got down to 7.1 for good
        {"level": 7.1, "bytes_to_level": None, "visits_to_level": None, "network_time_to_level_s": None}]
    above = summarize(_llm_run("snake", [20.0, 7.0, 7.6]), Target(0.85, perplexity=7.5))
    assert not above["reached_target"] and above["bytes_to_target"] is None and "levels" not in above
    assert above["bytes_to_first_target"] == 2000


def test_a_perplexity_comparison_names_its_target_and_reports_perplexities(tmp_path):
    runs = {"snake": _llm_run("snake", [20.0, 11.0, 7.0], moved=10**6),
            "fedavg": _llm_run("fedavg", [20.0, 8.0, 9.0], moved=10**6)}
    summary = write_comparison(tmp_path, runs, Target.of(PPL_CONFIG))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["target_accuracy"] == 0.85
    assert summary["target"] == {"metric": "perplexity", "value": 7.5, "levels": [12.0, 9.0, 7.1]}
    report = (tmp_path / "report.md").read_text()
    assert ("| run | mode | final ppl | best ppl | reached target | visits to target | MB to target "
            "| MB to first touch | MB to ppl 12 | MB to ppl 9 | MB to ppl 7.1 | MB total |") in report
    assert "| snake | cs | 7.00 | 7.00 | yes | 3 | 3.00 | 3.00 | 2.00 | 3.00 | 3.00 | 3.00 |" in report
    assert "| fedavg | cs | 9.00 | 8.00 | no | – | – | – | 2.00 | 2.00 | – | 3.00 |" in report
    assert "snake reached perplexity 7.5 for good at round 3" in report
    assert "fedavg did **not** reach perplexity 7.5 (best 8.00)" in report
    assert "stays at or below it" in report and (tmp_path / "accuracy_vs_mb.png").exists()


def test_the_headline_of_a_perplexity_run_gives_its_final_perplexity():
    line = summarize(_llm_run("snake", [20.0, 7.41], moved=6_150_000), Target.of(PPL_CONFIG))
    assert _headline(line) == "final ppl 7.41, 12.30 MB to the sustained target"
    medians = {"final_perplexity": {"median": 8.0}, "bytes_to_target": {"median": None}}
    assert _headline(medians) == "final ppl 8.00, sustained target not reached"
    assert _headline(summarize(_run("snake", [0.5, 0.9], 1, 1000), 0.85)) == \
        "final 0.9000, 0.00 MB to the sustained target"


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


def test_report_command_counts_to_the_runs_perplexity_target_or_the_one_asked(tmp_path, capsys):
    for name, perplexities in (("snake", [20.0, 11.0, 7.0]), ("fedavg", [20.0, 8.0, 9.0])):
        (tmp_path / f"{name}.json").write_text(json.dumps(_llm_run(name, perplexities)))
    assert main(["report", str(tmp_path)]) == 0  # the runs' own target-perplexity, 7.5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"]["value"] == 7.5 and summary["runs"]["fedavg"]["bytes_to_target"] is None
    assert main(["report", str(tmp_path), "--target-perplexity", "9.5"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"]["value"] == 9.5 and summary["runs"]["fedavg"]["bytes_to_target"] == 2000
    assert main(["report", str(tmp_path), "--target-perplexity", "0", "--target-accuracy", "0.25"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "target" not in summary and summary["target_accuracy"] == 0.25
    assert "final_perplexity" not in summary["runs"]["snake"] and summary["runs"]["snake"]["bytes_to_target"] == 1000
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--target-perplexity", "-1"]) == 2
    assert capsys.readouterr().err.startswith("snake-flower: error: --target-perplexity: must be >= 0")
    assert main(["report", str(tmp_path), "--target-accuracy", "0.3"]) == 2  # would change nothing: said
    assert capsys.readouterr().err.startswith("snake-flower: error: --target-accuracy: these runs count to a "
                                              "perplexity target")


def test_report_command_refuses_a_perplexity_target_for_runs_without_a_perplexity(tmp_path, capsys):
    run = {**_run("snake", [0.5, 0.9], 1, 1000), "config": {"target-accuracy": 0.85}}
    (tmp_path / "snake.json").write_text(json.dumps(run))
    assert main(["report", str(tmp_path), "--target-perplexity", "7.5"]) == 2
    assert capsys.readouterr().err.strip() == ("snake-flower: error: --target-perplexity: only task llm runs "
                                               "have a perplexity, not 'synthetic'")


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
