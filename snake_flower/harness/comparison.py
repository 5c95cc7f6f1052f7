"""``snake-flower compare``: every run of a comparison, seed after seed, then its report.

Runs go one after the other in this process, or with ``--jobs N`` up to N at once as
child processes (``harness.jobs``). Every run is evaluated at the same node visits.
A run whose finished results file is already there with its settings is not made again
(``harness.resume``; ``--fresh`` makes every run). A run whose node, measured with its
settings, outgrows its ``fit-budget-mb`` is not made at all (``harness.fit_budget``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from snake_flower.config import RunConfig, resolve
from snake_flower.harness import fit_budget, resume
from snake_flower.harness.compare import whole_rounds, write_comparison
from snake_flower.harness.measure import MeasureError
from snake_flower.harness.seeds import write_seed_comparison
from snake_flower.harness.targets import Target
from snake_flower.simulation import load_results, results_path, run_one


def _run_side_by_side(args: argparse.Namespace, configs: list[RunConfig],
                      skipped: set[str]) -> dict[str, dict[str, Any]]:
    """``compare --jobs N``: the strategies' runs as child processes, N at a time.

    Runs named in ``skipped`` are not started; their stored results are read like the others'.
    Nothing is deleted here: each child's ``run_one`` removes its own file as it starts.
    """
    from snake_flower.harness.jobs import child_command, run_side_by_side

    out = Path(configs[0].out_dir)
    # what the children must share with this process beyond the file and --run-config
    fixed = f"seed={configs[0].seed} eval-every={configs[0].eval_every}"
    commands = {cfg.name: child_command(args.config, f"{args.run_config} {fixed}".strip(), cfg.name,
                                             args.num_supernodes, str(out), args.ray_address)
                for cfg in configs if cfg.name not in skipped}
    codes = run_side_by_side(commands, out, jobs=args.jobs) if commands else {}
    runs = {cfg.name: load_results(cfg, codes.get(cfg.name, 0)) for cfg in configs}
    return {name: run for name, run in runs.items() if run is not None}


def compare(args: argparse.Namespace, configs: list[RunConfig]) -> int:
    """``compare``: every run, seed after seed, then the summary, report and plots.

    Every seed's results files are checked before the first run starts, so that a file
    with other settings stops the comparison at once (exit 2) rather than hours in. Then each
    run with a ``fit-budget-mb`` has its node measured (or its measurement reused): a run that
    does not fit is said so in one line and not made; if none fits, nothing is (exit 1).
    """
    out, target = Path(configs[0].out_dir), Target.of(configs[0])
    seeds = [configs[0].seed + i for i in range(args.seeds)]
    folders = {seed: out if len(seeds) == 1 else out / f"seed-{seed}" for seed in seeds}
    plan = {seed: [resolve(cfg, {"seed": seed, "out-dir": str(folder)}) for cfg in configs]
            for seed, folder in folders.items()}
    try:
        found = {} if args.fresh else resume.survey(cfg for seeded in plan.values() for cfg in seeded)
    except resume.OtherSettings as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    try:  # a node's memory does not depend on the seed: the first seed's configs are measured
        fit = fit_budget.check(plan[seeds[0]], out)
    except MeasureError as err:
        print(f"snake-flower: error: fit-budget-mb: {err}", file=sys.stderr)
        return 1
    refused = [name for name, line in fit.items() if not line["fits"]]
    for name in refused:
        print(fit_budget.refusal(name, fit[name]), flush=True)
    if len(refused) == len(configs):
        print("snake-flower: error: no run fits its fit-budget-mb; nothing was run", file=sys.stderr)
        return 1
    plan = {seed: [cfg for cfg in seeded if cfg.name not in refused] for seed, seeded in plan.items()}
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed, seeded in plan.items():
        folder = folders[seed]
        if len(seeds) > 1:
            print(f"seed {seed} ({seeds.index(seed) + 1}/{len(seeds)}) -> {folder}", flush=True)
        for cfg in seeded:
            resume.announce(cfg, found.get(results_path(cfg)))
        skipped = {cfg.name for cfg in seeded if found.get(results_path(cfg)) == resume.FINISHED}
        if args.jobs > 1:
            try:
                runs = _run_side_by_side(args, seeded, skipped)
            except KeyboardInterrupt as why:  # Ctrl-C or SIGTERM: the children were stopped first
                print(f"snake-flower: interrupted ({why or 'Ctrl-C'}); every run was stopped, "
                      f"logs in {folder}", file=sys.stderr)
                return 130
        else:
            runs = _run_in_turn(args, seeded, skipped)
        if len(runs) < len(seeded):
            return 1
        by_seed[seed] = runs
        summary = write_comparison(folder, runs, target, side_by_side=args.jobs > 1, fit=fit)
    if len(seeds) > 1:
        summary = write_seed_comparison(out, by_seed, target, side_by_side=args.jobs > 1, fit=fit)
    for name, line in summary["runs"].items():
        print(f"{name}: {_headline(line)}")
    print(f"report: {out / 'report.md'}")
    return 0


def _run_in_turn(args: argparse.Namespace, configs: list[RunConfig],
                 skipped: set[str]) -> dict[str, dict[str, Any]]:
    """``compare --jobs 1``: the runs one after the other in this process. A run in ``skipped``
    (finished already) is not made again: its stored results are read as at the end of a run."""
    runs = {}
    for i, cfg in enumerate(configs, 1):
        if cfg.name in skipped:
            result = load_results(cfg)
        else:
            print(f"[{i}/{len(configs)}] {cfg.name} on {cfg.task}, {args.num_supernodes} nodes", flush=True)
            result = run_one(cfg, args.num_supernodes, getattr(args, "parallel", 0), args.ray_address)
        if result is not None:
            runs[cfg.name] = result
    return runs


def _headline(line: dict[str, Any]) -> str:
    """``final 0.8800, 10.20 MB to the sustained target``, for a perplexity target ``final ppl 7.41,
    12.30 MB to the sustained target`` (medians over seeds when there are several)."""
    ppl = "final_perplexity" in line  # only a perplexity target's lines carry it
    final, to_target = line["final_perplexity" if ppl else "final_accuracy"], line["bytes_to_target"]
    if isinstance(final, dict):
        final, to_target = final["median"], to_target["median"]
    reached = f"{to_target / 1e6:.2f} MB to the sustained target" if to_target is not None \
        else "sustained target not reached"
    return f"final ppl {final:.2f}, {reached}" if ppl else f"final {final:.4f}, {reached}"


def evaluated_alike(configs: list[RunConfig], num_supernodes: int) -> list[RunConfig]:
    """Every run of a comparison is evaluated at the same node visits.

    A FedAvg round is ``num_supernodes`` visits and can only be evaluated at its end, so
    when FedAvg is compared every run's ``eval-every`` becomes the smallest multiple of a
    round at least as large as the largest asked for.
    """
    every = max(cfg.eval_every for cfg in configs)
    if any(cfg.strategy == "fedavg" for cfg in configs):
        every = whole_rounds(every, num_supernodes)
    if any(cfg.eval_every != every for cfg in configs):
        print(f"compare: every run is evaluated every {every} node visits (eval-every), at the same visits",
              flush=True)
    return [resolve(cfg, {"eval-every": every}) for cfg in configs]
