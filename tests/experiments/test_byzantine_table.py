"""byzantine_table: losses paired by seed against each strategy's own clean run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "experiments" / "byzantine_table.py"
SPEC = importlib.util.spec_from_file_location("byzantine_table", PATH)
table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(table)


def _spread(values: list) -> dict:
    return {"median": sorted(values)[1], "min": min(values), "max": max(values), "seeds": values}


def _line(seeds: list[int], finals: list[float], **extra: list) -> dict:
    line = {"seed": _spread(seeds), "final_accuracy": _spread(finals), "failed_rounds": _spread([0, 0, 0]),
            "bytes_to_target": {"median": 2e6, "min": 1e6, "max": None, "seeds": [1e6, None, 2e6]}}
    return {**line, **{key: _spread(values) for key, values in extra.items()}}


def _write(root: Path, folder: str, runs: dict) -> None:
    (root / folder).mkdir()
    (root / folder / "summary.json").write_text(json.dumps({"runs": runs}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    relay = {"seed": 42, "final_accuracy": 0.9, "bytes_to_target": 3e6, "failed_rounds": 0}
    _write(tmp_path, "calibrate", {"relay-calibrate": relay})
    _write(tmp_path, "clean-seeds3", {"snake-clean": _line([42, 43, 44], [0.90, 0.80, 0.70])})
    return tmp_path


def test_losses_are_paired_by_seed_not_by_position(root: Path):
    # the attacked arm's seeds come in another order: each must meet its own clean run
    gated = _line([44, 42, 43], [0.69, 0.89, 0.79], attacker_rounds=[10, 11, 12],
                  attacker_rounds_merged=[0, 1, 0], honest_rounds_not_merged=[2, 0, 1])
    _write(root, "sign-flip-seeds3", {"snake-gated": gated})
    row = next(line for line in table.tables(root).splitlines() if line.startswith("| snake-gated"))
    assert "+1.00 (+1.00–+1.00)" in row
    assert "0 of 10 / 1 of 11 / 0 of 12" in row and "| 2 / 0 / 1 |" in row
    assert "never" in row  # a seed that missed the target is not dropped from the bytes


def test_an_attacked_line_without_attack_figures_is_refused(root: Path):
    _write(root, "scale", {"snake": {"seed": 42, "final_accuracy": 0.5, "bytes_to_target": None, "failed_rounds": 0}})
    with pytest.raises(table.TableError, match="no attack figures"):
        table.tables(root)
