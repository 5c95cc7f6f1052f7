"""llm_head_to_head: issue 36's table and plots from a 3-seed comparison and a one-seed reference."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from snake_flower.harness.compare import write_comparison
from snake_flower.harness.fit_budget import verdict
from snake_flower.harness.seeds import write_seed_comparison
from snake_flower.harness.targets import Target

PATH = Path(__file__).resolve().parents[2] / "experiments" / "llm_head_to_head.py"
SPEC = importlib.util.spec_from_file_location("llm_head_to_head", PATH)
h2h = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(h2h)

TARGET = Target(0.0, perplexity=7.5, levels=(12.0, 9.0))


def _llm_run(perplexities: list[float], moved: int = 10**6) -> dict:
    rows = [{"round": i + 1, "nodes": [0], "bytes_down": moved // 2, "bytes_up": moved // 2, "accuracy": 0.3,
             "perplexity": ppl, "loss": math.log(ppl), "train_cpu_s": 2.0, "train_flops": 4e9}
            for i, ppl in enumerate(perplexities)]
    return {"strategy": "snake", "task": "llm", "rounds": rows, "initial": {"perplexity": 20.0},
            "final": {"accuracy": 0.3, "perplexity": perplexities[-1], "bytes_total": moved * len(rows),
                      "wall_s": 1.0}, "memory": {"total_bytes": 100}}


def _comparison(root: Path) -> Path:
    by_seed = {42: {"snake": _llm_run([15.0, 11.0, 8.5, 7.0]), "fedavg-lora": _llm_run([10.0, 7.0, 7.0, 7.2], 4 * 10**6)},
               43: {"snake": _llm_run([15.0, 10.0, 9.5, 8.0]), "fedavg-lora": _llm_run([11.0, 8.0, 7.4, 7.1], 4 * 10**6)},
               44: {"snake": _llm_run([14.0, 13.0, 12.5, 11.0]), "fedavg-lora": _llm_run([9.0, 7.0, 7.1, 7.0], 4 * 10**6)}}
    fit = {"snake": verdict(100 * 10**6, 500.0), "fedavg-lora": verdict(450 * 10**6, 500.0)}
    for seed, runs in by_seed.items():
        (root / f"seed-{seed}").mkdir(parents=True)
        write_comparison(root / f"seed-{seed}", runs, TARGET, fit=fit)
        for name, run in runs.items():
            (root / f"seed-{seed}" / f"{name}.json").write_text(json.dumps(run))
    write_seed_comparison(root, by_seed, TARGET, fit=fit)
    return root


def test_the_table_has_every_run_with_its_spreads_levels_and_measured_node_growth(tmp_path, capsys):
    compare = _comparison(tmp_path / "h2h")
    reference = tmp_path / "ref"
    reference.mkdir()
    write_comparison(reference, {"fedavg": _llm_run([9.0, 7.0, 6.5, 6.4], 30 * 10**6)}, TARGET)
    (reference / "fedavg.json").write_text(json.dumps(_llm_run([9.0, 7.0, 6.5, 6.4], 30 * 10**6)))
    memory = tmp_path / "memory.json"
    memory.write_text(json.dumps({"arms": {"fedavg": {"grown_bytes": 2_596_000_000}}}))
    out = tmp_path / "out"
    h2h.main([str(compare), "--reference", str(reference), "--memory", str(memory), "--out", str(out)])
    rows = {line.split(" | ")[0].strip("| "): line for line in (out / "table.md").read_text().splitlines()[2:]}
    assert list(rows) == ["snake", "fedavg-lora", "fedavg"]
    # snake: target 7.5 held by seed 42 only (at 4 MB); level 12 at 2, 2 and 4 MB; node growth 100 MB, fits
    assert rows["snake"].startswith("| snake | 1/3 | ∞ [4.0–∞] | 2.0 [2.0–4.0] | 4.0 [3.0–∞] |")
    assert "| 8.00 [7.00–11.00] | 100.0 (fits) |" in rows["snake"]
    # fedavg-lora: every seed at the target from its second evaluation on (8 MB), or its third (12 MB)
    assert rows["fedavg-lora"].startswith("| fedavg-lora | 3/3 | 8.0 [8.0–12.0] |")
    assert "| 450.0 (over budget) |" not in rows["fedavg-lora"] and "| 450.0 (fits) |" in rows["fedavg-lora"]
    # the one-seed reference (9.0 is at level 9), its growth from the memory report, over the budget
    assert rows["fedavg"].startswith("| fedavg | 1/1 | 60.0 | 30.0 | 30.0 | 2 | ")
    assert "| 6.40 | 2,596.0 (over budget) | 2.00 | 4.0 |" in rows["fedavg"]
    assert (out / "perplexity_vs_mb.png").stat().st_size > 0
    assert (out / "perplexity_vs_node_growth.png").stat().st_size > 0
    assert "table.md" in capsys.readouterr().out


def test_a_folder_without_a_perplexity_summary_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="holds no comparison's summary.json"):
        h2h.main([str(tmp_path), "--out", str(tmp_path / "out")])
    memory = tmp_path / "memory.json"
    memory.write_text("{}")
    with pytest.raises(SystemExit, match="no memory --measure report"):
        h2h.measured_growth([str(memory)])
