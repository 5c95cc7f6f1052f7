"""``fit-budget-mb``: ``compare`` does not run a strategy whose node would outgrow the budget.

A run's node growth is what ``snake-flower memory --measure`` measures on the ClientApp with
the run's own settings (``measure_runs.measure_run``): the larger of its two hops' growth
over the process's baseline. It is measured once per run config (the first seed's: the seed
does not change what a node holds), before any run starts, and kept in
``<out>/memory-<run name>.json`` with the config it was measured with; a later ``compare``
reuses it while that config is the run's (compared as ``resume`` compares a results file).

A run whose growth exceeds ``fit-budget-mb`` is made for no seed: ``compare`` says so in one
line (``refusal``), and the summary lists it under ``does_not_fit`` with its measured need
(``add_to_summary``); the runs that fit get ``fits`` and ``node_growth_bytes`` on their lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from snake_flower.config import RunConfig
from snake_flower.harness import resume
from snake_flower.runtime import results

MB = 1e6
"""``fit-budget-mb`` is in MB of 10^6 bytes, as ``memory-budget-mb`` is."""


def measure_growth(config: RunConfig) -> dict[str, Any]:
    """The run's arm of ``memory --measure --config`` (what ``check`` measures with by default;
    tests put a stand-in here)."""
    from snake_flower.harness.measure_runs import measure_run

    return measure_run(config)


def check(configs: Iterable[RunConfig], out: str | Path,
          measure: Callable[[RunConfig], dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Each run with ``fit-budget-mb > 0``: ``{"fits", "node_growth_bytes", "fit_budget_bytes"}``.

    ``configs``: one seed's run configs; ``measure``: a run's arm of the measurement (default
    ``measure_growth``), called only for a run whose cached figure in ``out`` is not its config's.

    Raises
    ------
    MeasureError
        If a run's node cannot be measured.
    """
    verdicts = {}
    for config in configs:
        if config.fit_budget_mb > 0:
            growth = node_growth(config, Path(out), measure or measure_growth)
            verdicts[config.name] = verdict(growth, config.fit_budget_mb)
    return verdicts


def verdict(growth: int, budget_mb: float) -> dict[str, Any]:
    """A run's line: whether its node's ``growth`` (bytes) fits ``budget_mb``, and the two in bytes."""
    budget = round(budget_mb * MB)
    return {"fits": growth <= budget, "node_growth_bytes": growth, "fit_budget_bytes": budget}


def cache_path(out: Path, name: str) -> Path:
    """Where run ``name``'s measured node growth is kept."""
    return out / f"memory-{name}.json"


def node_growth(config: RunConfig, out: Path, measure: Callable[[RunConfig], dict[str, Any]]) -> int:
    """The run's node growth (bytes): the cached figure if it was measured with this config, else measured."""
    path = cache_path(out, config.name)
    stored = _read(path)
    if stored is not None and not resume.differences(stored["config"], config):
        print(f"compare: {config.name}: node growth {stored['node_growth_bytes'] / MB:.1f} MB, "
              f"measured before ({path})", flush=True)
        if stored["config"] != resume.as_json(config.as_dict()):  # a new budget: report's verdict must be this one's
            results.write_json(path, {**stored, "config": config.as_dict()})
        return int(stored["node_growth_bytes"])
    print(f"compare: {config.name}: measuring its node for fit-budget-mb {config.fit_budget_mb:g} "
          "(snake-flower memory --measure)", flush=True)
    arm = measure(config)
    growth = int(arm["grown_bytes"])
    results.write_json(path, {"config": config.as_dict(), "node_growth_bytes": growth, "measured": arm})
    return growth


def _read(path: Path) -> dict[str, Any] | None:
    """A cache file's content, or ``None`` if there is none (or it is torn)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(stored, dict) and isinstance(stored.get("config"), dict) and "node_growth_bytes" in stored
    return stored if ok else None


def stored_verdicts(out: str | Path) -> dict[str, dict[str, Any]]:
    """The verdicts of the cache files in ``out`` whose run had a budget (``report`` rebuilds with them)."""
    verdicts = {}
    for path in sorted(Path(out).glob("memory-*.json")):
        stored = _read(path)
        if stored is not None and stored["config"].get("fit-budget-mb", 0.0) > 0:
            verdicts[path.stem.removeprefix("memory-")] = verdict(int(stored["node_growth_bytes"]),
                                                                  stored["config"]["fit-budget-mb"])
    return verdicts


def refusal(name: str, line: dict[str, Any]) -> str:
    """``compare``'s one line for a run that does not fit."""
    return (f"compare: {name} does not fit fit-budget-mb {line['fit_budget_bytes'] / MB:g}: its node grows by "
            f"{need_mb(line)} MB (snake-flower memory --measure); not run")


def add_to_summary(summary: dict[str, Any], verdicts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``summary`` with the verdicts: a line that fits gets them, a run that does not fit (and was
    not run) goes under ``does_not_fit``; without verdicts ``summary`` is left as it was."""
    runs = summary["runs"]
    for name, line in verdicts.items():
        if name in runs:
            runs[name].update(line)
        elif not line["fits"]:
            summary.setdefault("does_not_fit", {})[name] = dict(line)
    return summary


def report_rows(summary: dict[str, Any], columns: int) -> list[str]:
    """A table row per run that does not fit: its need where its figures would be."""
    return [f"| {name} | does not fit (needs {need_mb(v)} MB) |" + " – |" * (columns - 2)
            for name, v in summary.get("does_not_fit", {}).items()]


def report_notes(summary: dict[str, Any]) -> list[str]:
    """A statement per run that does not fit."""
    return [f"- {name} was **not run**: its node grows by {need_mb(v)} MB on the ClientApp with its settings "
            f"(`snake-flower memory --measure`), over fit-budget-mb {v['fit_budget_bytes'] / MB:g}."
            for name, v in summary.get("does_not_fit", {}).items()]


def need_mb(line: dict[str, Any]) -> str:
    """The measured need in MB, as the line and the report show it."""
    return f"{line['node_growth_bytes'] / MB:.1f}"
