"""``snake-flower``: run the app in-process in Flower's Ray simulation engine."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from snake_flower.config import (
    CHOICES,
    ConfigError,
    experiment_layers,
    load_toml,
    parse_overrides,
    resolve,
    run_name,
)
from snake_flower.tasks.data import DataError, partition_from_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snake-flower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run Snake Learning in the Ray simulation engine")
    run.add_argument("--config", help="experiment TOML file (run-config keys)")
    run.add_argument("--run-config", default="", help='overrides, e.g. "window=1 lr=0.01"')
    run.add_argument("--num-supernodes", type=int, default=8, help="simulated nodes (default 8)")
    run.add_argument("--out", help="output folder (default: run-config out-dir)")
    run.add_argument("--parallel", type=int, default=0,
                     help="ClientApps that train at once (default: one per core, at most one per node); "
                          "1 keeps one model in training, for models that strain memory")
    compare = sub.add_parser("compare", help="run several strategies head to head, then report")
    compare.add_argument("--config", help="experiment TOML file (run-config keys)")
    compare.add_argument("--run-config", default="", help="overrides for every strategy")
    compare.add_argument("--strategies", default="snake,fedavg,split",
                         help="comma-separated strategies (snake, relay, fedavg, split) or tables of the "
                              "experiment file (default snake,fedavg,split)")
    compare.add_argument("--num-supernodes", type=int, default=8, help="simulated nodes (default 8)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--jobs", type=int, default=1,
                         help="strategies run at once, each in its own process (default 1: in turn)")
    compare.add_argument("--seeds", type=int, default=1,
                         help="seeds per strategy (seed, seed+1, ...), each in <out>/seed-<s>/ (default 1)")
    report = sub.add_parser("report", help="rebuild summary.json, report.md and plots from a compare folder")
    report.add_argument("out", help="a folder holding <strategy>.json files of one comparison")
    report.add_argument("--target-accuracy", type=float, help="default: the runs' own target-accuracy")
    plot = sub.add_parser("plot", help="overlay the accuracy curves of saved runs in one PNG")
    plot.add_argument("runs", nargs="+", help="LABEL=path/to/<strategy>.json, or just the path")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument("--x", choices=("visits", "megabytes", "network"), default="visits",
                      help="x axis (default visits)")
    plot.add_argument("--metric", choices=("accuracy", "perplexity"),
                      help="y axis (default: perplexity for task llm, else accuracy)")
    memory = sub.add_parser("memory", help="FedAvg and Snake memory per node of an LLM, from its "
                                           "architecture alone (meta device, no weights)")
    memory.add_argument("--model", required=True,
                        help="opt-1.3b, llama-3-8b, smollm2-135m, tiny-opt, or a folder with a config.json")
    memory.add_argument("--window", default="1", help="decoder layers Snake trains at once (default 1)")
    memory.add_argument("--frozen-dtype", default="fp16", help="fp16 (default), bf16, fp32 or int8")
    memory.add_argument("--finetune", default="full", help="full (default) or lora")
    memory.add_argument("--lora-rank", default="8", help="LoRA rank (default 8)")
    memory.add_argument("--lora-targets", default="q_proj,v_proj",
                        help="modules that get LoRA adapters (default q_proj,v_proj)")
    memory.add_argument("--batch", default="0", help="sequences per step, to count activations (default 0: not counted)")
    memory.add_argument("--seq", default="0", help="tokens per sequence, to count activations (default 0)")
    memory.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def resolve_runs(args: argparse.Namespace, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One config per run: defaults < the file's flat keys < its table < ``--run-config`` < ``--out``.

    ``names`` are the comparison's strategies or variant tables; ``run`` resolves the one
    its ``run-name`` or ``strategy`` names. Checks that the data is there.
    """
    data = load_toml(args.config) if args.config else {}
    overrides = parse_overrides(args.run_config)
    if names is None:
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        names = [overrides.get("run-name") or overrides.get("strategy") or flat.get("run-name")
                 or flat.get("strategy") or "snake"]
    if len(set(names)) < len(names):
        raise ConfigError(f"strategies: each may appear once, got {','.join(names)}")
    if getattr(args, "jobs", 1) < 1:
        raise ConfigError(f"jobs: must be >= 1, got {args.jobs}")
    if getattr(args, "seeds", 1) < 1:
        raise ConfigError(f"seeds: must be >= 1, got {args.seeds}")
    if args.num_supernodes < 1:
        raise ConfigError(f"num-supernodes: must be >= 1, got {args.num_supernodes}")
    if getattr(args, "parallel", 0) < 0:
        raise ConfigError(f"parallel: must be >= 0, got {args.parallel}")
    configs = []
    for name in names:
        layers = [*experiment_layers(data, name), overrides, {"run-name": name}]
        if args.out:
            layers.append({"out-dir": args.out})
        config = resolve(*layers)
        config["out-dir"] = str(Path(config["out-dir"]).resolve())
        if not any("min-nodes" in layer for layer in layers):
            config["min-nodes"] = args.num_supernodes  # simulation: start once every node is up
        if config["min-nodes"] > args.num_supernodes:
            raise ConfigError(f"min-nodes: {config['min-nodes']} exceeds --num-supernodes {args.num_supernodes}")
        configs.append(config)
    from snake_flower.tasks.task import task_for

    for config in {c["task"]: c for c in configs}.values():
        task = task_for(config)
        _, y_train, _, _ = task.load(config["data-dir"])  # fail now, not inside a Ray actor
        labels = task.partition_by(config["data-dir"]) if task.partition_by else y_train
        partition_from_config(labels, config, args.num_supernodes, 0)  # e.g. fewer topics than nodes
    return configs


def simulate(config: dict[str, Any], num_supernodes: int, parallel: int = 0) -> None:
    """Run the ServerApp and ClientApp in Flower's Ray simulation engine.

    ``parallel`` ClientApps train at once (0: one per core, at most one per node).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from snake_flower.client_app import app as client_app
    from snake_flower.runtime.dispatch import quick_pickup
    from snake_flower.server_app import make_server_app

    quick_pickup()  # split learning waits on every batch's round trip (see runtime/dispatch.py)

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": parallel or max(1, min(os.cpu_count() or 1, num_supernodes)),
                             "num_gpus": 0, "logging_level": "ERROR"}}
    run_simulation(server_app=make_server_app(config), client_app=client_app,
                   num_supernodes=num_supernodes, backend_config=backend)


def _run_one(config: dict[str, Any], num_supernodes: int, parallel: int = 0) -> dict[str, Any] | None:
    """Simulate one strategy; return its results (``None`` if none were written)."""
    _results_path(config).unlink(missing_ok=True)  # never report a previous run's file as this one's
    simulate(config, num_supernodes, parallel)
    return _load_results(config)


def _results_path(config: dict[str, Any]) -> Path:
    return Path(config["out-dir"]) / f"{run_name(config)}.json"


def _load_results(config: dict[str, Any], code: int = 0) -> dict[str, Any] | None:
    """A finished run's results, with its one-line summary; ``None`` (and why) if it failed."""
    path, name = _results_path(config), run_name(config)
    if code != 0 or not path.exists():
        where = f"see {path.with_suffix('.log')}" if code != 0 else f"it wrote no {path}"
        print(f"snake-flower: error: the {name} run failed (exit {code}); {where}", file=sys.stderr)
        return None
    result = json.loads(path.read_text())
    final = result["final"]
    failed = len(result.get("failures", []))
    print(f"{name}: accuracy {final['accuracy']:.4f}, {final['bytes_total'] / 1e6:.2f} MB moved, "
          f"{final['wall_s']:.0f} s{f', {failed} FAILED rounds' if failed else ''} -> {path}", flush=True)
    return result


def _run_side_by_side(args: argparse.Namespace, configs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``compare --jobs N``: the strategies' runs as child processes, N at a time."""
    from snake_flower.harness.jobs import child_command, run_side_by_side

    out = Path(configs[0]["out-dir"])
    for cfg in configs:
        _results_path(cfg).unlink(missing_ok=True)
    # what the children must share with this process beyond the file and --run-config
    fixed = f"seed={configs[0]['seed']} eval-every={configs[0]['eval-every']}"
    commands = {run_name(cfg): child_command(args.config, f"{args.run_config} {fixed}".strip(), run_name(cfg),
                                             args.num_supernodes, str(out)) for cfg in configs}
    codes = run_side_by_side(commands, out, jobs=args.jobs)
    runs = {run_name(cfg): _load_results(cfg, codes[run_name(cfg)]) for cfg in configs}
    return {name: run for name, run in runs.items() if run is not None}


def _compare(args: argparse.Namespace, configs: list[dict[str, Any]]) -> int:
    """``compare``: every run, seed after seed, then the summary, report and plots."""
    from snake_flower.harness.compare import write_comparison
    from snake_flower.harness.seeds import write_seed_comparison

    out, target = Path(configs[0]["out-dir"]), configs[0]["target-accuracy"]
    seeds = [configs[0]["seed"] + i for i in range(args.seeds)]
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        folder = out if len(seeds) == 1 else out / f"seed-{seed}"
        seeded = [resolve(cfg, {"seed": seed, "out-dir": str(folder)}) for cfg in configs]
        if len(seeds) > 1:
            print(f"seed {seed} ({seeds.index(seed) + 1}/{len(seeds)}) -> {folder}", flush=True)
        if args.jobs > 1:
            try:
                runs = _run_side_by_side(args, seeded)
            except KeyboardInterrupt as why:  # Ctrl-C or SIGTERM: the children were stopped first
                print(f"snake-flower: interrupted ({why or 'Ctrl-C'}); every run was stopped, "
                      f"logs in {folder}", file=sys.stderr)
                return 130
        else:
            runs = {}
            for i, cfg in enumerate(seeded, 1):
                print(f"[{i}/{len(seeded)}] {run_name(cfg)} on {cfg['task']}, {args.num_supernodes} nodes",
                      flush=True)
                result = _run_one(cfg, args.num_supernodes, getattr(args, "parallel", 0))
                if result is not None:
                    runs[run_name(cfg)] = result
        if len(runs) < len(seeded):
            return 1
        by_seed[seed] = runs
        summary = write_comparison(folder, runs, target, side_by_side=args.jobs > 1)
    if len(seeds) > 1:
        summary = write_seed_comparison(out, by_seed, target, side_by_side=args.jobs > 1)
    for name, line in summary["runs"].items():
        print(f"{name}: {_headline(line)}")
    print(f"report: {out / 'report.md'}")
    return 0


def _headline(line: dict[str, Any]) -> str:
    """``final 0.88, 10.2 MB to the sustained target`` (medians over seeds when there are several)."""
    final, to_target = line["final_accuracy"], line["bytes_to_target"]
    if isinstance(final, dict):
        final, to_target = final["median"], to_target["median"]
    reached = f"{to_target / 1e6:.2f} MB to the sustained target" if to_target is not None \
        else "sustained target not reached"
    return f"final {final:.4f}, {reached}"


def _evaluated_alike(configs: list[dict[str, Any]], num_supernodes: int) -> list[dict[str, Any]]:
    """Every run of a comparison is evaluated at the same node visits.

    A FedAvg round is ``num_supernodes`` visits and can only be evaluated at its end, so
    when FedAvg is compared every run's ``eval-every`` becomes the smallest multiple of a
    round at least as large as the largest asked for.
    """
    every = max(cfg["eval-every"] for cfg in configs)
    if any(cfg["strategy"] == "fedavg" for cfg in configs):
        every = -(-every // num_supernodes) * num_supernodes
    if any(cfg["eval-every"] != every for cfg in configs):
        print(f"compare: every run is evaluated every {every} node visits (eval-every), at the same visits",
              flush=True)
    return [resolve(cfg, {"eval-every": every}) for cfg in configs]


def _report(args: argparse.Namespace) -> int:
    """``snake-flower report DIR``: the comparison's outputs again, from its saved runs."""
    from snake_flower.harness.compare import write_comparison

    out = Path(args.out)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))
            if p.name != "summary.json"}
    runs = {name: run for name, run in runs.items() if isinstance(run, dict) and "rounds" in run}
    if not runs:
        print(f"snake-flower: error: no run results (<strategy>.json) in {out}", file=sys.stderr)
        return 2
    known = CHOICES["strategy"]  # snake, relay, fedavg, split: the order of a default comparison
    runs = dict(sorted(runs.items(), key=lambda kv: known.index(kv[0]) if kv[0] in known else len(known)))
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    target = args.target_accuracy if args.target_accuracy is not None else \
        next(iter(runs.values()))["config"]["target-accuracy"]
    write_comparison(out, runs, target, side_by_side=bool(previous.get("side_by_side", False)))
    print(f"report: {out / 'report.md'}")
    return 0


def _plot(args: argparse.Namespace) -> int:
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


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def _memory(args: argparse.Namespace) -> int:
    """``snake-flower memory --model M``: the analytic per-node ledgers (design §5)."""
    from snake_flower.harness.memory_table import format_table
    from snake_flower.tasks.architectures import ArchitectureError
    from snake_flower.training.memory import MemoryOptions, MemoryOptionsError, analyze

    try:
        options = MemoryOptions(window=_int_option("window", args.window), frozen_dtype=args.frozen_dtype,
                                finetune=args.finetune, lora_rank=_int_option("lora-rank", args.lora_rank),
                                lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                                batch=_int_option("batch", args.batch), seq=_int_option("seq", args.seq))
        report = analyze(args.model, options)
    except (ConfigError, ArchitectureError, MemoryOptionsError) as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snake-flower`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "memory":
        return _memory(args)
    try:
        configs = resolve_runs(args, args.strategies.split(",") if args.command == "compare" else None)
        if args.command == "compare":
            configs = _evaluated_alike(configs, args.num_supernodes)
    except (ConfigError, DataError) as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    if args.command == "compare":
        return _compare(args, configs)
    from snake_flower.harness.plots import plot_accuracy

    config = configs[0]
    result = _run_one(config, args.num_supernodes, getattr(args, "parallel", 0))
    if result is None:
        return 1
    plot_accuracy({run_name(config): result}, Path(config["out-dir"]) / f"{run_name(config)}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
