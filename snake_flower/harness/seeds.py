"""A comparison over several seeds: medians with ranges, and median curves with a band.

Each seed's runs live in ``<out>/seed-<s>/`` with that seed's own ``summary.json``;
``<out>/summary.json`` holds, for every figure, ``{"median", "min", "max", "seeds"}``.
A to-target figure of a seed that never reached the target counts as +infinity: its
entry in ``seeds`` is ``null``, and so is the median when fewer than half the seeds
reached the target (and the max when any seed missed it). A perplexity target's ``levels``
stay a list, one entry per level, each figure of which is such a spread.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from snake_flower.harness.compare import level_columns, summarize
from snake_flower.harness.fit_budget import add_to_summary, report_notes, report_rows
from snake_flower.harness.plots import plot_bands
from snake_flower.harness.targets import LEVEL_FIGURES, Target, as_target
from snake_flower.runtime import results

# figures where a missing value means "never": +inf, not "unknown"
TO_TARGET = ("bytes_to_target", "bytes_to_first_target", "network_time_to_target_s", "visits_to_target",
             "visits_to_first_target", "round_to_target")


def spread(values: list[float | None], never_is_infinite: bool) -> dict[str, Any]:
    """``{"median", "min", "max", "seeds"}`` of one figure over the seeds."""
    if never_is_infinite:
        numbers = [math.inf if v is None else float(v) for v in values]
    else:
        numbers = [float(v) for v in values if v is not None]

    def finite(x: float | None) -> float | None:
        return None if x is None or math.isinf(x) else x

    return {"median": finite(statistics.median(numbers)) if numbers else None,
            "min": finite(min(numbers)) if numbers else None,
            "max": finite(max(numbers)) if numbers else None, "seeds": list(values)}


def aggregate(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's summary line over its seeds' lines."""
    out: dict[str, Any] = {}
    for key in lines[0]:
        values = [line.get(key) for line in lines]
        if isinstance(values[0], bool) or key == "reached_target":
            out[key] = {"count": sum(bool(v) for v in values), "seeds": values}
        elif key in TO_TARGET or all(isinstance(v, (int, float)) or v is None for v in values):
            out[key] = spread(values, key in TO_TARGET)
        elif key == "levels":
            out[key] = _aggregate_levels(values)
        else:
            out[key] = values[0]
    return out


def _aggregate_levels(by_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The seeds' ``levels`` (the same levels, in the same order, from one target): per level,
    each figure a spread, a seed that never got down to the level counting as +inf."""
    return [{"level": seeds[0]["level"], **{key: spread([s[key] for s in seeds], never_is_infinite=True)
                                             for key in LEVEL_FIGURES}}
            for seeds in zip(*by_seed)]


def write_seed_comparison(out: str | Path, by_seed: dict[int, dict[str, dict[str, Any]]],
                          target: float | Target, side_by_side: bool = False,
                          fit: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``<out>/summary.json``, ``report.md`` and median-and-band plots over the seeds
    (``target``: a ``Target``, or a plain number for an accuracy target; ``fit``: the runs'
    ``fit-budget-mb`` verdicts, one per run and not per seed, added after the medians)."""
    out, target = Path(out), as_target(target)
    seeds = sorted(by_seed)
    names = list(by_seed[seeds[0]])
    runs = {name: [by_seed[s][name] for s in seeds if name in by_seed[s]] for name in names}
    summary = add_to_summary({**target.header(), "side_by_side": side_by_side, "seeds": seeds,
                              "runs": {name: aggregate([summarize(run, target) for run in group])
                                       for name, group in runs.items()}}, fit or {})
    results.write_json(out / "summary.json", summary)
    plot_bands(runs, out / "accuracy_vs_round.png", x="visits", metric=target.metric)
    plot_bands(runs, out / "accuracy_vs_mb.png", x="megabytes", metric=target.metric)
    plot_bands(runs, out / "accuracy_vs_network_time.png", x="network", metric=target.metric)
    (out / "report.md").write_text(report(summary, runs))
    return summary


def _fmt(figure: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    def one(x: float | None) -> str:
        return "∞" if x is None else f"{x / scale:.{digits}f}"

    if figure["median"] is None and all(v is None for v in figure["seeds"]):
        return "never"
    return f"{one(figure['median'])} [{one(figure['min'])}–{one(figure['max'])}]"


def report(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table of medians with [min–max] over the seeds (a perplexity target: final
    perplexity, and the MB to each perplexity level beside the MB to the target)."""
    target, seeds = Target.of_summary(summary), summary["seeds"]
    metric = target.metric
    task = next(iter(runs.values()))[0]["task"] if runs else ""
    columns = ["run", "seeds at target", f"final {target.short}", "MB to target", "MB to first touch",
               *level_columns(target), "visits to target", "MB total", "network s to target", "CPU s / visit",
               "GFLOP / visit", "node peak memory (MB)"]
    lines = [f"# {task}: {', '.join(runs)}, {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             f"Medians over the seeds, [min–max] beside them. Target {metric} {target.value}, reached where the "
             f"{metric} gets to it and stays at or {target.side} it at every later evaluation; a seed that never "
             "reached it counts as ∞ (a median of ∞ means fewer than half the seeds reached it).", "",
             f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for name, s in summary["runs"].items():
        levels = "".join(f" | {_fmt(level['bytes_to_level'], 1e6)}" for level in s.get("levels", []))
        lines.append(f"| {name} | {s['reached_target']['count']}/{len(seeds)} "
                     f"| {_fmt(s[f'final_{metric}'], 1, target.digits)} "
                     f"| {_fmt(s['bytes_to_target'], 1e6)} | {_fmt(s['bytes_to_first_target'], 1e6)}{levels} "
                     f"| {_fmt(s['visits_to_target'], 1, 0)} | {_fmt(s['bytes_total'], 1e6)} "
                     f"| {_fmt(s['network_time_to_target_s'], 1, 1)} | {_fmt(s['cpu_s_per_visit'])} "
                     f"| {_fmt(s['flops_per_visit'], 1e9, 1)} | {_fmt(s['node_peak_memory_bytes'], 1e6)} |")
    lines += report_rows(summary, len(columns))
    notes = report_notes(summary)
    snake, fedavg = summary["runs"].get("snake"), summary["runs"].get("fedavg")
    if snake and fedavg and snake["bytes_to_target"]["median"] and fedavg["bytes_to_target"]["median"]:
        ratio = snake["bytes_to_target"]["median"] / fedavg["bytes_to_target"]["median"]
        notes.append(f"- Snake / FedAvg median bytes to the sustained target: {ratio:.2f}.")
    if summary.get("side_by_side"):
        notes.append("- Runs were made side by side (`--jobs`): wall times include waiting for the CPU.")
    lines += ["", *notes] if notes else []
    lines += ["", f"![{metric} vs node visits](accuracy_vs_round.png)", f"![{metric} vs MB](accuracy_vs_mb.png)",
              f"![{metric} vs network time](accuracy_vs_network_time.png)", ""]
    return "\n".join(lines)
