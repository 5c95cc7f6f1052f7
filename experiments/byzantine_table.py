"""Print the markdown tables of issue 34's comparison (docs/reliability.md) from its summaries.

    python experiments/byzantine_table.py experiments/results/byzantine-2026-12-07

``ROOT`` holds the folders of experiments/README.md's ``byzantine.toml`` commands, each with its
``summary.json`` (rebuilt by ``snake-flower report`` so that every line names its seed and, for an
attacked run, its attack figures): ``calibrate/`` (seed 42), ``clean-seeds3/``, and per attack
``<attack>/`` (every arm, seed 42) and ``<attack>-seeds3/`` (gated Snake and the best robust FedAvg,
seeds 42-44; these lines replace the same arm's line of ``<attack>/``).

Accuracy lost is against the same strategy's clean run with the same seed (Snake arms against
``snake-clean``, relay against ``relay-calibrate``, whose gate rejected nothing, FedAvg arms against
``fedavg-clean``), in points; over 3 seeds, the median of the three seed-by-seed losses. "Attacker's
visits merged" counts the rounds in which an attacking node's reply went into the model (Snake and
relay: its window merged; FedAvg: its reply among those aggregated, for FedMedian and
FedTrimmedAvg an input of the robust statistic, for MultiKrum one that Krum kept) out of the
rounds it took part in. "Honest rounds not merged" counts the hops of honest nodes that were rolled
back by the gate or rejected by reply validation (``max-update-norm``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ATTACKS = ("label-flip", "sign-flip", "scale")
CLEAN = ("calibrate", "clean-seeds3")
ORDER = ("snake-clean", "snake-gated-clean", "fedavg-clean", "relay-calibrate", "snake", "snake-norm", "snake-gated",
         "relay-gated", "fedavg", "fedavg-median", "fedavg-trimmed", "fedavg-krum")
HEADER = ("| arm | seeds | final accuracy | points lost vs its clean run | MB to the sustained target | "
          "attacker's visits merged | honest rounds not merged | gate CPU s per hop |\n"
          "|---|---|---|---|---|---|---|---|")


class TableError(Exception):
    """A folder or a summary line the table cannot be built from."""


def _per_seed(line: dict[str, Any], key: str) -> list[Any]:
    """A figure of one summary line, one value per seed (a single-seed line: one value)."""
    value = line[key]
    return value["seeds"] if isinstance(value, dict) and "seeds" in value else [value]


def _by_seed(line: dict[str, Any], key: str) -> dict[int, Any]:
    """``{seed: value}`` of one figure (lines name their seed: rebuild old summaries with ``report``)."""
    if "seed" not in line:
        raise TableError("a summary line names no seed: run `snake-flower report <folder>` on the current code")
    return dict(zip(_per_seed(line, "seed"), _per_seed(line, key)))


def _clean_of(arm: str) -> str:
    """The clean run an arm's accuracy is measured against."""
    if arm.startswith("relay"):
        return "relay-calibrate"
    return "fedavg-clean" if arm.startswith("fedavg") else "snake-clean"


def _ordered(lines: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The arms in the table's order (unknown arms last)."""
    return sorted(lines.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER))


def _spread(values: list[float], fmt: str) -> str:
    """``median`` or ``median (min–max)``."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def _bytes_cell(line: dict[str, Any]) -> str:
    """MB to the sustained target; over seeds the line's own median, where a miss counts as never."""
    value = line["bytes_to_target"]
    if not isinstance(value, dict):
        return f"{value / 1e6:.2f}" if value is not None else "never"
    mb = [f"{v / 1e6:.2f}" if v is not None else "never" for v in value["seeds"]]
    median = f"{value['median'] / 1e6:.2f}" if value["median"] is not None else "never"
    return f"{median} ({', '.join(mb)})"


def _row(arm: str, line: dict[str, Any], clean: dict[str, dict[int, float]], attacked: bool) -> str:
    finals = _by_seed(line, "final_accuracy")
    reference = clean[_clean_of(arm)]
    if not set(finals) <= set(reference):
        raise TableError(f"{arm}: seeds {sorted(set(finals) - set(reference))} have no clean {_clean_of(arm)} run")
    lost = [100 * (reference[seed] - acc) for seed, acc in finals.items()]
    if attacked:
        if "attacker_rounds_merged" not in line:
            raise TableError(f"{arm}: an attacked run's line has no attack figures: run `snake-flower report`")
        # FedAvg trains every node in every round, but a MultiKrum row lists only the replies kept
        took_part = _per_seed(line, "rounds" if arm.startswith("fedavg") else "attacker_rounds")
        merged = " / ".join(f"{m} of {n}" for m, n in zip(_per_seed(line, "attacker_rounds_merged"), took_part))
        honest = _per_seed(line, "honest_rounds_not_merged")
    else:  # a clean run: every round is honest
        merged = "–"
        gated = _per_seed(line, "gate_rejected_rounds") if "gate_rejected_rounds" in line else [0] * len(finals)
        honest = [f + g for f, g in zip(_per_seed(line, "failed_rounds"), gated)]
    gate_cpu = _per_seed(line, "gate_cpu_s_per_hop") if "gate_cpu_s_per_hop" in line else None
    return (f"| {arm} | {len(finals)} | {_spread(list(finals.values()), '.4f')} | {_spread(lost, '+.2f')} | "
            f"{_bytes_cell(line)} | {merged} | {' / '.join(str(h) for h in honest)} | "
            f"{_spread(gate_cpu, '.3f') if gate_cpu else '–'} |")


def tables(root: Path) -> str:
    """The markdown of every table, clean runs first, then one per attack."""
    folders = {path.parent.name: json.loads(path.read_text())["runs"] for path in sorted(root.glob("*/summary.json"))}
    missing = set(CLEAN) - set(folders)
    if missing:
        raise TableError(f"no summary.json in {', '.join(sorted(missing))} under {root}")
    clean = {arm: _by_seed(line, "final_accuracy") for arm, line in folders["clean-seeds3"].items()}
    clean["relay-calibrate"] = _by_seed(folders["calibrate"]["relay-calibrate"], "final_accuracy")
    out = ["### Clean runs (no attacker)\n", HEADER]
    out += [_row(arm, line, clean, attacked=False) for arm, line in _ordered(folders["clean-seeds3"])]
    out.append(_row("relay-calibrate", folders["calibrate"]["relay-calibrate"], clean, attacked=False))
    for attack in (a for a in ATTACKS if a in folders or f"{a}-seeds3" in folders):
        lines = {**folders.get(attack, {}), **folders.get(f"{attack}-seeds3", {})}
        out += [f"\n### {attack}\n", HEADER]
        out += [_row(arm, line, clean, attacked=True) for arm, line in _ordered(lines)]
    return "\n".join(out)


def main(root: str) -> int:
    try:
        print(tables(Path(root)))
    except TableError as err:
        print(f"byzantine_table: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/byzantine-2026-12-07"))
