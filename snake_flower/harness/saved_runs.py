"""``snake-flower report`` and ``snake-flower plot``: outputs rebuilt from runs already saved.

A comparison's folder keeps every run's results file (``<run>.json``, per seed in
``seed-<s>/``); ``report`` writes its summaries, tables and plots again, at the runs' own
target or another one, and ``plot`` overlays runs from different folders.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from snake_flower.config import CHOICES, ConfigError
from snake_flower.harness.targets import Target


def saved_runs(folder: Path) -> dict[str, dict[str, Any]]:
    """The run results (``<run>.json``) in ``folder``, in a default comparison's order."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
            if p.name != "summary.json" and not p.name.startswith("tune-")}
    runs = {name: run for name, run in runs.items() if isinstance(run, dict) and "rounds" in run}
    known = CHOICES["strategy"]  # snake, relay, fedavg, split: the order of a default comparison
    return dict(sorted(runs.items(), key=lambda kv: known.index(kv[0]) if kv[0] in known else len(known)))


def seed_runs(folder: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """The saved runs of each ``seed-<s>/`` folder of ``compare --seeds``, by seed (none if empty)."""
    by_seed = {int(d.name.removeprefix("seed-")): saved_runs(d) for d in sorted(folder.glob("seed-*"))
               if d.is_dir() and d.name.removeprefix("seed-").isdigit()}
    return {seed: runs for seed, runs in by_seed.items() if runs}


def _report_target(args: argparse.Namespace, run: dict[str, Any]) -> Target:
    """``report``'s target: the run's own, each of ``--target-accuracy`` and ``--target-perplexity``
    replacing its key; a perplexity target (> 0) wins over the accuracy one."""
    perplexity = args.target_perplexity
    if perplexity is not None and not (perplexity >= 0 and math.isfinite(perplexity)):
        raise ConfigError(f"--target-perplexity: must be >= 0 (0: count to the accuracy target), got {perplexity}")
    target = Target.of(run["config"], accuracy=args.target_accuracy, perplexity=perplexity)
    if target.lower_is_better and run["task"] != "llm":
        raise ConfigError(f"--target-perplexity: only task llm runs have a perplexity, not {run['task']!r}")
    if target.lower_is_better and args.target_accuracy is not None:
        raise ConfigError("--target-accuracy: these runs count to a perplexity target; "
                          "add --target-perplexity 0 to count to an accuracy")
    return target


def report_command(args: argparse.Namespace) -> int:
    """``snake-flower report DIR``: the comparison's outputs again, from its saved runs
    (``DIR/seed-<s>/`` of ``compare --seeds``: each seed's and the medians over them)."""
    from snake_flower.harness.compare import write_comparison
    from snake_flower.harness.fit_budget import stored_verdicts
    from snake_flower.harness.seeds import write_seed_comparison

    out = Path(args.out)
    by_seed = seed_runs(out)
    runs = saved_runs(out)
    if not runs and not by_seed:
        print(f"snake-flower: error: no run results (<strategy>.json) in {out}", file=sys.stderr)
        return 2
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    side_by_side = bool(previous.get("side_by_side", False))
    first = next(iter(runs.values())) if runs else next(iter(next(iter(by_seed.values())).values()))
    try:
        target = _report_target(args, first)
    except ConfigError as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    fit = stored_verdicts(out)  # fit-budget-mb: the node growth compare measured and kept in out
    for seed, of_seed in by_seed.items():
        write_comparison(out / f"seed-{seed}", of_seed, target, side_by_side=side_by_side, fit=fit)
    if by_seed:
        write_seed_comparison(out, by_seed, target, side_by_side=side_by_side, fit=fit)
    else:
        write_comparison(out, runs, target, side_by_side=side_by_side, fit=fit)
    print(f"report: {out / 'report.md'}")
    return 0


def plot_command(args: argparse.Namespace) -> int:
    """``snake-flower plot LABEL=RUN.json ...``: runs from different folders on one set of axes."""
    from snake_flower.harness.plots import plot_accuracy

    runs = {}
    for spec in args.runs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        label = label or f"{Path(path).parent.name}/{Path(path).stem}"
        try:
            run = json.loads(Path(path).read_text())
            if not isinstance(run, dict) or "rounds" not in run:
                raise ValueError("not a run's results file")
        except (OSError, ValueError) as err:
            print(f"snake-flower: error: {path}: {err}", file=sys.stderr)
            return 2
        runs[label] = run
    if args.metric == "perplexity" and any(run["task"] != "llm" for run in runs.values()):
        print("snake-flower: error: --metric perplexity: only task llm runs have a perplexity", file=sys.stderr)
        return 2
    print(f"plot: {plot_accuracy(runs, args.out, x=args.x, metric=args.metric)}")
    return 0
