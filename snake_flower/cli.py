"""``snake-flower``: run the app in-process in Flower's Ray simulation engine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snake_flower.config import (
    ConfigError,
    RunConfig,
    experiment_layers,
    load_toml,
    parse_overrides,
    resolve,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snake-flower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run Snake Learning in the Ray simulation engine")
    run.add_argument("--config", help="experiment TOML file (run-config keys)")
    run.add_argument("--run-config", default="", help='overrides, e.g. "window=1 lr=0.01"')
    run.add_argument("--num-supernodes", type=int, default=8, help="simulated nodes (default 8)")
    run.add_argument("--out", help="output folder (default: run-config out-dir)")
    run.add_argument("--ray-address", default="", help="attach to this Ray cluster (ray start --head) "
                                                        "instead of starting one on this machine")
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
    compare.add_argument("--ray-address", default="", help="attach every run to this Ray cluster")
    compare.add_argument("--seeds", type=int, default=1,
                         help="seeds per strategy (seed, seed+1, ...), each in <out>/seed-<s>/ (default 1)")
    compare.add_argument("--fresh", action="store_true",
                         help="make every run again; by default a run whose finished results file in --out "
                              "holds its settings is skipped, so that the same command resumes a comparison")
    tune = sub.add_parser("tune", help="pick one strategy's settings on a validation slice (never the test set)")
    tune.add_argument("--config", help="experiment TOML file (must set validation-size)")
    tune.add_argument("--run-config", default="", help="overrides for every point")
    tune.add_argument("--strategy", required=True, help="a strategy or a variant table of the experiment file")
    tune.add_argument("--grid", default="", help='the shared grid, e.g. "local-steps=100,300,600 lr=0.02,0.05"')
    tune.add_argument("--extra", default="",
                      help='own knobs, each value tried on the grid\'s winner, e.g. "kd-weight=0.3,0.9"; '
                           '"optimizer=adamw+lr=5e-5" is one point setting both')
    tune.add_argument("--num-supernodes", type=int, default=8, help="simulated nodes (default 8)")
    tune.add_argument("--out", required=True, help="output folder")
    tune.add_argument("--ray-address", default="", help="attach every point to this Ray cluster")
    tune.add_argument("--write", action="store_true", help="write the winner into --config's table")
    report = sub.add_parser("report", help="rebuild summary.json, report.md and plots from a compare folder")
    report.add_argument("out", help="a folder holding <strategy>.json files of one comparison")
    report.add_argument("--target-accuracy", type=float, help="default: the runs' own target-accuracy")
    report.add_argument("--target-perplexity", type=float,
                        help="task llm: count to this held-out perplexity instead (0: to --target-accuracy; "
                             "default: the runs' own target-perplexity)")
    plot = sub.add_parser("plot", help="overlay the accuracy curves of saved runs in one PNG")
    plot.add_argument("runs", nargs="+", help="LABEL=path/to/<strategy>.json, or just the path")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument("--x", choices=("visits", "megabytes", "network"), default="visits",
                      help="x axis (default visits)")
    plot.add_argument("--metric", choices=("accuracy", "perplexity"),
                      help="y axis (default: perplexity for task llm, else accuracy)")
    memory = sub.add_parser("memory", help="FedAvg and Snake memory per node of an LLM, from its "
                                           "architecture alone (meta device, no weights)")
    memory.add_argument("--model",
                        help="opt-1.3b, llama-3-8b, smollm2-135m, tiny-opt, or a folder with a config.json "
                             "(required but with --measure --config)")
    memory.add_argument("--window", default="1", help="decoder layers Snake trains at once (default 1)")
    memory.add_argument("--frozen-dtype", help="fp16 (default), bf16, fp32 or int8; with --measure "
                                               "auto (default: bf16/fp16 where the CPU has it), fp16, bf16, fp32, int8")
    memory.add_argument("--finetune", default="full", help="full (default) or lora")
    memory.add_argument("--lora-rank", default="8", help="LoRA rank (default 8)")
    memory.add_argument("--lora-targets", default="q_proj,v_proj",
                        help="modules that get LoRA adapters (default q_proj,v_proj)")
    memory.add_argument("--batch", default="0", help="sequences per step, to count activations (default 0: not counted)")
    memory.add_argument("--seq", default="0", help="tokens per sequence, to count activations (default 0)")
    memory.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="print the report as JSON; --json FILE writes it there and prints the table")
    memory.add_argument("--measure", action="store_true",
                        help="run the ClientApp on two hops per arm (first visit, then a delta sync), each "
                             "arm in a fresh process, and measure peak RSS beside the ledger (task llm's "
                             "model and data; batch 8 x seq 96 by default)")
    memory.add_argument("--optimizer", default="sgd", help="--measure: sgd (default, as runs train), adam (the paper's) or adamw (FlowerTune's)")
    memory.add_argument("--steps", default="2", help="--measure: training steps of the hop (default 2)")
    memory.add_argument("--arms", "--strategies", dest="arms",
                        help="--measure: the arms to run (default all four of snake-full, snake-lora, fedavg-full, "
                             "fedavg-lora; snake and fedavg name the full ones); with --config: tables or "
                             "strategies of the experiment file, as compare --strategies names them")
    memory.add_argument("--config", help="--measure: an experiment TOML; each of --arms is measured with its "
                                         "own run-config (its model, batch, optimizer, ...), not the options above")
    memory.add_argument("--run-config", default="", help="--measure --config: overrides for every arm")
    sub.add_parser("supernode", add_help=False, help="Flower's SuperNode for an edge node, with a warm "
                   "ClientApp launcher and no idle polls (snake-flower supernode --help)")
    return parser


def resolve_runs(args: argparse.Namespace, names: list[str] | None = None) -> list[RunConfig]:
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
        # simulation: start once every node is up
        min_nodes = config.min_nodes if any("min-nodes" in layer for layer in layers) else args.num_supernodes
        if min_nodes > args.num_supernodes:
            raise ConfigError(f"min-nodes: {min_nodes} exceeds --num-supernodes {args.num_supernodes}")
        configs.append(config.replace(out_dir=str(Path(config.out_dir).resolve()), min_nodes=min_nodes))
    from snake_flower.tasks.data import partition_from_config
    from snake_flower.tasks.task import task_for

    for config in {c.task: c for c in configs}.values():
        task = task_for(config)
        _, y_train, _, _ = task.load(config.data_dir)  # fail now, not inside a Ray actor
        labels = task.partition_by(config.data_dir) if task.partition_by else y_train
        partition_from_config(labels, config, args.num_supernodes, 0)  # e.g. fewer topics than nodes
    return configs


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def _measure(args: argparse.Namespace) -> int:
    """``snake-flower memory --measure``: two hops of the ClientApp per arm, peak RSS and ledger;
    the arms are ``--model`` with the options, or with ``--config`` the experiment's runs."""
    from snake_flower.harness.measure import ARMS, MeasureError, MeasureOptions, arms_of, measure
    from snake_flower.harness.memory_table import format_measured
    from snake_flower.tasks.data import DataError

    try:
        if args.config:
            report = _measure_experiment(args)
        else:
            if args.run_config:
                raise ConfigError("run-config: --run-config sets the arms of an experiment file (--config)")
            if not args.model:
                raise ConfigError("model: --measure needs --model, or --config and --arms")
            batch, seq = _int_option("batch", args.batch) or 8, _int_option("seq", args.seq) or 96
            options = MeasureOptions(model=args.model, batch=batch, seq=seq, steps=_int_option("steps", args.steps),
                                     optimizer=args.optimizer, frozen_dtype=args.frozen_dtype or "auto",
                                     window=_int_option("window", args.window),
                                     lora_rank=_int_option("lora-rank", args.lora_rank))
            report = measure(options, arms_of(",".join(ARMS) if args.arms is None else args.arms))
    except (ConfigError, DataError, MeasureError) as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    _print_report(args, report, format_measured)
    return 0


def _measure_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """``memory --measure --config FILE --arms A,B``: each arm resolved as ``compare`` resolves its
    strategies (on the measurement's 8 nodes), then measured with its own settings."""
    from snake_flower.harness.measure import NODES
    from snake_flower.harness.measure_runs import measure_runs

    shared = {"model", "batch", "seq", "steps", "optimizer", "window", "frozen_dtype", "lora_rank", "finetune",
              "lora_targets"}
    defaults = vars(_parser().parse_args(["memory"]))
    given = [f"--{key.replace('_', '-')}" for key in sorted(shared) if getattr(args, key) != defaults[key]]
    if given:
        raise ConfigError(f"{', '.join(given)}: with --config each arm's settings are the experiment's "
                          "(set them with --run-config key=value)")
    names = [name.strip() for name in (args.arms or "").split(",") if name.strip()]
    if not names:
        raise ConfigError("arms: --config needs --arms, the experiment's tables or strategies to measure")
    runs = argparse.Namespace(config=args.config, run_config=args.run_config, num_supernodes=NODES, out=None)
    return measure_runs(resolve_runs(runs, names))


def _print_report(args: argparse.Namespace, report: dict[str, Any], table: Callable[[dict[str, Any]], str]) -> None:
    """``--json``: the report as JSON; ``--json FILE``: written there, and the table printed."""
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json == "-" else table(report))


def _memory(args: argparse.Namespace) -> int:
    """``snake-flower memory --model M``: the analytic per-node ledgers (design §5)."""
    from snake_flower.harness.memory_table import format_table
    from snake_flower.tasks.architectures import ArchitectureError
    from snake_flower.training.memory import MemoryOptions, MemoryOptionsError, analyze

    if args.measure:
        return _measure(args)
    try:
        if args.config:
            raise ConfigError("config: memory --config measures an experiment's runs, with --measure")
        if not args.model:
            raise ConfigError("model: memory needs --model (--measure --config measures an experiment's runs)")
        options = MemoryOptions(window=_int_option("window", args.window), frozen_dtype=args.frozen_dtype or "fp16",
                                finetune=args.finetune, lora_rank=_int_option("lora-rank", args.lora_rank),
                                lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                                batch=_int_option("batch", args.batch), seq=_int_option("seq", args.seq))
        report = analyze(args.model, options)
    except (ConfigError, ArchitectureError, MemoryOptionsError) as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    _print_report(args, report, format_table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snake-flower`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:  # every other argument is flower-supernode's
        from snake_flower.deploy.supernode import main as supernode

        return supernode(argv[1:])
    from snake_flower.tasks.data import DataError  # (torch: not for the SuperNode above)

    args = _parser().parse_args(argv)
    if args.command in ("report", "plot"):
        from snake_flower.harness.saved_runs import plot_command, report_command

        return report_command(args) if args.command == "report" else plot_command(args)
    if args.command == "memory":
        return _memory(args)
    try:
        names = {"compare": lambda: args.strategies.split(","), "tune": lambda: [args.strategy]}
        configs = resolve_runs(args, names[args.command]() if args.command in names else None)
        if args.command == "tune":
            from snake_flower.harness.tune import parse_extras, parse_grid, run_tuning

            parse_grid(args.grid), parse_extras(args.extra)  # a malformed grid fails before any run
            if args.write and not args.config:
                raise ConfigError("write: tune --write needs --config (the file it writes the winner into)")
            return run_tuning(args, configs[0])
        if args.command == "compare":
            from snake_flower.harness.comparison import evaluated_alike

            configs = evaluated_alike(configs, args.num_supernodes)
    except (ConfigError, DataError) as err:
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a tuning run failed
        print(f"snake-flower: error: {err}", file=sys.stderr)
        return 1
    if args.command == "compare":
        from snake_flower.harness.comparison import compare

        return compare(args, configs)
    from snake_flower.harness.plots import plot_accuracy

    config = configs[0]
    from snake_flower.simulation import run_one

    result = run_one(config, args.num_supernodes, getattr(args, "parallel", 0), args.ray_address)
    if result is None:
        return 1
    plot_accuracy({config.name: result}, Path(config.out_dir) / f"{config.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
