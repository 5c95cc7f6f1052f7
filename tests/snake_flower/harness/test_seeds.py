"""Comparisons over seeds: medians with ranges, unreached seeds as infinity, median curves."""

from __future__ import annotations

import json
import math

from snake_flower.harness.comparison import _headline
from snake_flower.harness.seeds import aggregate, spread, write_seed_comparison
from snake_flower.harness.targets import Target


def _run(accuracies: list[float | None], moved: int = 1000) -> dict:
    rows = [{"round": i + 1, "nodes": [0], "bytes_down": moved // 2, "bytes_up": moved // 2,
             "accuracy": acc, "loss": None} for i, acc in enumerate(accuracies)]
    return {"strategy": "snake", "task": "synthetic", "rounds": rows,
            "final": {"accuracy": accuracies[-1], "bytes_total": moved * len(rows), "wall_s": 1.0},
            "memory": {"total_bytes": 100}}


def _llm_run(perplexities: list[float], moved: int = 10**6) -> dict:
    run = _run([0.3] * len(perplexities), moved)
    run["task"] = "llm"
    for row, ppl in zip(run["rounds"], perplexities):
        row.update(perplexity=ppl, loss=math.log(ppl))
    run["final"]["perplexity"] = perplexities[-1]
    return run


def test_perplexity_levels_over_seeds_count_a_seed_that_never_got_down_to_one_as_infinity(tmp_path):
    by_seed = {42: {"snake": _llm_run([20.0, 11.0, 8.5, 7.0])},  # level 12 at 2 MB, 9 at 3 MB, 7.5 at 4 MB
               43: {"snake": _llm_run([15.0, 10.0, 9.5, 8.0])},  # 12 at 2 MB, 9 at 4 MB, 7.5 never
               44: {"snake": _llm_run([14.0, 13.0, 12.5, 11.0])}}  # 12 at 4 MB, 9 and 7.5 never
    target = Target(0.85, perplexity=7.5, levels=(12.0, 9.0))
    summary = write_seed_comparison(tmp_path, by_seed, target)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["target"] == {"metric": "perplexity", "value": 7.5, "levels": [12.0, 9.0]}
    snake = summary["runs"]["snake"]
    assert snake["final_perplexity"] == {"median": 8.0, "min": 7.0, "max": 11.0, "seeds": [7.0, 8.0, 11.0]}
    twelve, nine = snake["levels"]
    assert twelve["level"] == 12.0 and twelve["bytes_to_level"]["median"] == 2 * 10**6
    assert nine["bytes_to_level"] == {"median": 4 * 10**6, "min": 3 * 10**6, "max": None,
                                      "seeds": [3 * 10**6, 4 * 10**6, None]}  # the median of 3, 4 and inf
    assert nine["visits_to_level"]["median"] == 4 and nine["network_time_to_level_s"]["max"] is None
    assert snake["bytes_to_target"]["median"] is None and snake["reached_target"]["count"] == 1
    report = (tmp_path / "report.md").read_text()
    assert ("| run | seeds at target | final ppl | MB to target | MB to first touch | MB to ppl 12 | MB to ppl 9 "
            "| visits to target |") in report
    assert "| snake | 1/3 | 8.00 [7.00–11.00] | ∞ [4.00–∞] | ∞ [4.00–∞] | 2.00 [2.00–4.00] | 4.00 [3.00–∞] |" in report
    assert "Target perplexity 7.5" in report and "stays at or below it" in report
    assert _headline(snake) == "final ppl 8.00, sustained target not reached"


def test_a_seed_that_never_reaches_the_target_counts_as_infinity():
    assert spread([3000, None, 1000], never_is_infinite=True) == {"median": 3000, "min": 1000, "max": None,
                                                                  "seeds": [3000, None, 1000]}
    # fewer than half reached it: no median
    assert spread([None, None, 1000], never_is_infinite=True)["median"] is None
    # elsewhere a missing value is just missing
    assert spread([0.5, None, 0.7], never_is_infinite=False) == {"median": 0.6, "min": 0.5, "max": 0.7,
                                                                 "seeds": [0.5, None, 0.7]}


def test_every_figure_of_a_line_becomes_a_spread():
    line = aggregate([{"final_accuracy": 0.8, "reached_target": True, "mode": "cs", "bytes_to_target": 10},
                      {"final_accuracy": 0.9, "reached_target": False, "mode": "cs", "bytes_to_target": None},
                      {"final_accuracy": 0.7, "reached_target": True, "mode": "cs", "bytes_to_target": 30}])
    assert line["final_accuracy"]["median"] == 0.8 and line["final_accuracy"]["min"] == 0.7
    assert line["reached_target"] == {"count": 2, "seeds": [True, False, True]}
    assert line["bytes_to_target"]["median"] == 30 and line["mode"] == "cs"


def test_seed_comparison_writes_medians_a_report_and_band_plots(tmp_path):
    by_seed = {42: {"snake": _run([0.5, 0.9, 0.9]), "fedavg": _run([0.4, 0.6, 0.7], 4000)},
               43: {"snake": _run([0.6, 0.8, 0.9]), "fedavg": _run([0.5, 0.9, 0.88], 4000)},
               44: {"snake": _run([0.5, 0.7, 0.8]), "fedavg": _run([0.5, 0.86, 0.9], 4000)}}
    summary = write_seed_comparison(tmp_path, by_seed, target=0.85, side_by_side=True)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert list(summary) == ["target_accuracy", "side_by_side", "seeds", "runs"]  # as before perplexity targets
    snake, fedavg = summary["runs"]["snake"], summary["runs"]["fedavg"]
    assert snake["bytes_to_target"]["seeds"] == [2000, 3000, None] and snake["bytes_to_target"]["median"] == 3000
    assert fedavg["bytes_to_target"]["seeds"] == [None, 8000, 8000] and fedavg["bytes_to_target"]["median"] == 8000
    assert snake["final_accuracy"]["median"] == 0.9 and snake["reached_target"]["count"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| snake | 2/3 |" in report and "Snake / FedAvg median bytes to the sustained target: 0.38." in report
    assert "| network s to target |" in report
    assert "target: 0.38.\n- Runs were made side by side" in report
    # without a Snake / FedAvg ratio the notes are still a list of their own, not a row of the table
    (tmp_path / "solo").mkdir()
    write_seed_comparison(tmp_path / "solo", {s: {"snake": runs["snake"]} for s, runs in by_seed.items()},
                          target=0.85, side_by_side=True)
    assert "|\n\n- Runs were made side by side" in (tmp_path / "solo" / "report.md").read_text()
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "accuracy_vs_network_time.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_the_report_command_rebuilds_a_comparison_over_seeds(tmp_path):
    from snake_flower.cli import main

    for seed, accuracies in ((42, [0.5, 0.9]), (43, [0.9, 0.8])):
        (tmp_path / f"seed-{seed}").mkdir()
        run = {**_run(accuracies), "config": {"target-accuracy": 0.85}}
        (tmp_path / f"seed-{seed}" / "snake.json").write_text(json.dumps(run))
    assert main(["report", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [42, 43] and summary["runs"]["snake"]["bytes_to_target"]["seeds"] == [2000, None]
    assert (tmp_path / "seed-43" / "report.md").exists()
