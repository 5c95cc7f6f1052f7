"""Where windows pay (issue 33, item 3): Snake's bytes and node memory against relay's and FedAvg's.

x = segments ÷ (nodes × window). The byte model replays a fault-free run hop by hop with the
strategies' own bookkeeping: ``SnakeSchedule`` gives each hop's node and window, ``NodeCopies``
what the node is sent (delta sync: the segments whose version moved since its last visit; window
sync: the window; a first visit: everything), and each merge bumps the window's versions as
``SnakeStrategy.merge`` does. Relay is the same with the whole model as its window; FedAvg sends the
whole model down and up every visit. Sizes are the raw bytes of the task's model, built on the
``meta`` device and cut as a run cuts it; messages add framing (``payload_efficiency``). Memory is
the analytic ledger's (``training.memory.ledger``): 16 B per trainable parameter, frozen ones at the
run's ``frozen-dtype``, no activations, Snake's largest window.

    python experiments/depth_map.py --measured cnn=experiments/results/noniid-seeds3-2026-12-07-summary.json \\
        --out depth-map.md --json depth-map.json --plot depth-map.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median
from typing import Any

import torch
from flwr.app import ArrayRecord

from snake_flower.config import RunConfig, experiment_layers, load_toml, resolve
from snake_flower.segments import segment_model
from snake_flower.tasks.task import build_model, frozen_segments, segment_keys, task_for, transport_state
from snake_flower.training.frozen import resolve_dtype
from snake_flower.training.memory import ledger
from strategies.schedule import SnakeSchedule
from strategies.sync import NodeCopies

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("snake", "relay", "fedavg")
GOAL = 0.35  # the goal: Snake's bytes to target <= 0.35x tuned FedAvg's
X_TICKS, Y_TICKS = (0.2, 0.3, 0.5, 1, 2, 4, 8), (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1, 1.5)
NO_VALUES = ArrayRecord()  # NodeCopies reads segment values only with a sync tolerance


@dataclass(frozen=True)
class Case:
    """One model as its runs cut it: the experiment file, the nodes, and run-config overrides."""

    key: str
    label: str
    config: str
    nodes: int
    overrides: dict[str, Any] = field(default_factory=dict)
    min_segments: int | None = None  # cut by segment_model instead of the task's own segments


CASES = (
    Case("cnn", "Fashion-MNIST CNN", "experiments/fashion-mnist-noniid.toml", 8),
    Case("vgg11", "VGG-11, 6 segments", "experiments/vgg11.toml", 8),
    Case("vgg11-conv", "VGG-11, segment_model: one per conv", "experiments/vgg11.toml", 8, min_segments=9),
    Case("llm", "SmolLM2-135M, 32 segments", "experiments/llm.toml", 4, {"frozen-segments": ""}),
    Case("llm-frozen", "SmolLM2-135M, embed+head frozen (llm.toml)", "experiments/llm.toml", 4),
)


def strategy_config(case: Case, strategy: str, **keys: Any) -> RunConfig:
    """The run-config ``compare`` would give ``strategy`` in the case's experiment file."""
    layers = experiment_layers(load_toml(ROOT / case.config), strategy)
    return resolve(*layers, case.overrides, {k.replace("_", "-"): v for k, v in keys.items()})


def segment_sizes(config: RunConfig, min_segments: int | None = None) -> dict[str, tuple[int, int]]:
    """Each segment's (bytes as sent, elements), in model order: the task's model built on ``meta``."""
    with torch.device("meta"):
        model = build_model(task_for(config), config.seed)
    state = transport_state(model.state_dict())  # what an ArrayRecord carries (bf16 goes as fp32)
    cut = segment_model(model, min_segments=min_segments) if min_segments else segment_keys(model)
    return {name: (sum(state[k].numel() * state[k].element_size() for k in keys),
                   sum(state[k].numel() for k in keys)) for name, keys in cut.items()}


def schedule_of(config: RunConfig, names: Sequence[str], relay: bool = False) -> SnakeSchedule:
    """The schedule ``server_app.run_snake`` builds (relay: every segment is the window, no extras)."""
    return SnakeSchedule(list(names), len(names) if relay else int(config.window), sweep=config.sweep,
                         order=config.order, train_head=config.train_head and not relay,
                         train_stem=config.train_stem and not relay, seed=config.seed)


def hop_bytes(sizes: Mapping[str, int], schedule: SnakeSchedule, nodes: int, hops: int,
              sync: str = "delta") -> list[tuple[int, int]]:
    """(down, up) bytes of each hop of a fault-free run, as ``SnakeStrategy`` sends them.

    Parameters
    ----------
    sizes : Mapping[str, int]
        Bytes of each segment that travels, in model order (the schedule's segments).
    schedule : SnakeSchedule
        Each hop's window and node.
    nodes, hops : int
        Nodes in the chain, hops to replay.
    sync : str (default: "delta")
        What a node is sent besides its window (``strategies.sync``).
    """
    copies = NodeCopies({name: [name] for name in sizes}, sync)  # keys unused without a tolerance
    versions = dict.fromkeys(sizes, 0)
    out = []
    for hop in range(hops):
        node, window = schedule.node_at(hop, range(nodes)), schedule.window_at(hop)
        sent = copies.to_send(node, window, NO_VALUES, versions)
        merged = {name: versions[name] + 1 for name in window}  # a merge bumps the window's versions
        copies.trained(node, {name: versions[name] for name in sent}, merged, NO_VALUES, NO_VALUES)
        versions.update(merged)
        out.append((sum(sizes[name] for name in sent), sum(sizes[name] for name in window)))
    return out


def per_visit(hops: Sequence[tuple[int, int]], nodes: int) -> dict[str, float]:
    """Mean bytes of a first visit (the first ``nodes`` hops: one per node) and of later visits."""
    later = hops[nodes:]
    return {"first_visit": mean(d + u for d, u in hops[:nodes]), "down": mean(d for d, _ in later),
            "up": mean(u for _, u in later), "visit": mean(d + u for d, u in later)}


def memory_ratio(config: RunConfig, params: Mapping[str, int], schedule: SnakeSchedule) -> float:
    """Snake's analytic node ledger at its largest window ÷ FedAvg's (every parameter trained)."""
    total, dtype = sum(params.values()), resolve_dtype(config.frozen_dtype, config.task)
    windows = {sum(params[n] for n in schedule.window_at(hop)) for hop in range(schedule.period)}
    snake = max(ledger(trained, total - trained, dtype)["total_bytes"] for trained in windows)
    return snake / ledger(total, 0, dtype)["total_bytes"]


def model_rows(case: Case, windows: Sequence[int], syncs: Sequence[str], periods: int) -> list[dict[str, Any]]:
    """The byte and memory model of one case, per window and sync (equal visits for every strategy)."""
    sizes = segment_sizes(strategy_config(case, "snake"), case.min_segments)
    relay_config = strategy_config(case, "relay")
    relay_sizes = {n: b for n, (b, _) in sizes.items() if n not in frozen_segments(relay_config)}
    fedavg = 2 * sum(b for b, _ in sizes.values())  # the whole model down and up, every visit
    rows = []
    for window in windows:
        for sync in syncs:
            config = strategy_config(case, "snake", window=window, sync=sync)
            swept = {n: b for n, (b, _) in sizes.items() if n not in frozen_segments(config)}
            schedule = schedule_of(config, list(swept))
            hops = case.nodes + periods * math.lcm(case.nodes, schedule.period)
            snake = per_visit(hop_bytes(swept, schedule, case.nodes, hops, sync), case.nodes)
            relay = per_visit(hop_bytes(relay_sizes, schedule_of(relay_config, list(relay_sizes), relay=True),
                                        case.nodes, hops, relay_config.sync), case.nodes)
            rows.append({"case": case.key, "label": case.label, "segments": len(swept), "nodes": case.nodes,
                         "window": window, "sync": sync, "x": len(swept) / (case.nodes * window), "hops": hops,
                         "snake": snake, "relay": relay, "fedavg": fedavg,
                         "snake_relay": snake["visit"] / relay["visit"], "snake_fedavg": snake["visit"] / fedavg,
                         "memory_snake_fedavg": memory_ratio(config, {n: p for n, (_, p) in sizes.items()}, schedule),
                         "frozen_dtype": resolve_dtype(config.frozen_dtype, config.task)})
    return rows


def _seeds(figure: Any) -> list[Any]:
    """One value per seed of a summary figure (a one-seed summary: its one value)."""
    if isinstance(figure, dict):
        return list(figure["seeds"])
    return list(figure) if isinstance(figure, list) else [figure]


def _median(figure: Any) -> Any:
    return figure["median"] if isinstance(figure, dict) else figure


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measured(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Per strategy of a comparison's summary: median bytes to target, visits to target per seed,
    raw bytes per visit (bytes counted ÷ visits ÷ payload efficiency, median over seeds) and median
    node peak ledger; and Snake's ratios to relay and FedAvg."""
    figures = {}
    for name in STRATEGIES:
        line = summary["runs"][name]
        raw = [b / v / e for b, v, e in zip(_seeds(line["bytes_total"]), _seeds(line["node_visits"]),
                                             _seeds(line["payload_efficiency"]))]
        figures[name] = {"bytes_to_target": _median(line["bytes_to_target"]),
                         "visits_to_target": _seeds(line["visits_to_target"]), "visits": _seeds(line["node_visits"]),
                         "seeds": _seeds(line.get("seed", summary.get("seeds", [None]))),
                         "bytes_per_visit": median(raw), "memory": _median(line["node_peak_memory_bytes"])}
    snake = figures["snake"]
    return {"strategies": figures,
            **{f"snake_{other}": _ratio(snake["bytes_to_target"], figures[other]["bytes_to_target"])
               for other in ("relay", "fedavg")},
            **{f"per_visit_snake_{other}": snake["bytes_per_visit"] / figures[other]["bytes_per_visit"]
               for other in ("relay", "fedavg")},
            "memory_snake_fedavg": _ratio(snake["memory"], figures["fedavg"]["memory"])}


def _run_bytes(case: Case, name: str, sizes: Mapping[str, int], seed: int | None, visits: int) -> int:
    """The byte model's bytes of strategy ``name``'s first ``visits`` visits in a run with ``seed``."""
    if name == "fedavg":
        return 2 * sum(sizes.values()) * visits
    config = strategy_config(case, name, **({"seed": seed} if seed is not None else {}))
    schedule = schedule_of(config, list(sizes), relay=name == "relay")
    return sum(d + u for d, u in hop_bytes(sizes, schedule, case.nodes, visits, config.sync))


def model_of_runs(case: Case, point: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The byte model of the measured runs, seed by seed (medians): per strategy, its bytes to the
    measured visits to target, and its bytes per visit over the run's visits."""
    out, built = {}, segment_sizes(strategy_config(case, "snake"), case.min_segments)
    for name in STRATEGIES:
        config, figures = strategy_config(case, name), point["strategies"][name]
        sizes = {n: b for n, (b, _) in built.items() if n not in frozen_segments(config)}
        to_target = [_run_bytes(case, name, sizes, seed, int(visits))
                     for seed, visits in zip(figures["seeds"], figures["visits_to_target"]) if visits is not None]
        per_visit = [_run_bytes(case, name, sizes, seed, int(visits)) / visits
                     for seed, visits in zip(figures["seeds"], figures["visits"])]
        out[name] = {"bytes_to_target": median(to_target) if to_target else None,
                     "bytes_per_visit": median(per_visit)}
    return out


def measured_point(case: Case, path: str, periods: int) -> dict[str, Any]:
    """A summary's measured point on ``case`` (at its experiment file's window and sync), with the
    model at that window and the model of the same runs."""
    config = strategy_config(case, "snake")
    model = model_rows(case, [int(config.window)], [config.sync], periods)[0]
    point = measured(json.loads(Path(path).read_text()))
    return {"case": case.key, "label": case.label, "source": Path(path).stem.removesuffix("-summary"),
            **{k: model[k] for k in ("segments", "nodes", "window", "sync", "x")},
            "measured": point, "model": model, "model_of_runs": model_of_runs(case, point)}


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _mb(value: float | None) -> str:
    """Megabytes to three significant digits (whole MB from 100 on)."""
    if value is None:
        return "–"
    mb = value / 1e6
    return f"{mb:,.0f}" if mb >= 100 else f"{mb:.3g}"


def markdown(rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> str:
    """The depth map as one table (model rows, then measured points), and each point against the model."""
    lines = ["| model | segments | nodes | window | sync | x | Snake MB/visit (first visit) | relay MB/visit | "
             "FedAvg MB/visit | Snake ÷ relay | Snake ÷ FedAvg | memory Snake ÷ FedAvg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['segments']} | {r['nodes']} | {r['window']} | {r['sync']} | {r['x']:.3g} | "
                     f"{_mb(r['snake']['visit'])} ({_mb(r['snake']['first_visit'])}) | {_mb(r['relay']['visit'])} | "
                     f"{_mb(r['fedavg'])} | {_f(r['snake_relay'])} | {_f(r['snake_fedavg'])} | "
                     f"{_f(r['memory_snake_fedavg'])} |")
    for p in points:
        m = p["measured"]
        lines.append(f"| **measured**: {p['label']}, to target ({p['source']}) | {p['segments']} | {p['nodes']} | "
                     f"{p['window']} | {p['sync']} | {p['x']:.3g} | "
                     + " | ".join(_mb(m["strategies"][s]["bytes_per_visit"]) for s in STRATEGIES)
                     + f" | **{_f(m['snake_relay'])}** | **{_f(m['snake_fedavg'])}** | "
                       f"**{_f(m['memory_snake_fedavg'])}** |")
    for p in points:
        m, model = p["measured"], p["model_of_runs"]
        lines += ["", f"{p['label']}, {p['source']}: measured against the byte model of the same runs "
                  "(seeds, visits)", "",
                  "| strategy | visits to target (seeds) | MB to target: measured | model | "
                  "raw MB per visit: measured | model |", "|---|---|---|---|---|---|"]
        for s in STRATEGIES:
            f = m["strategies"][s]
            lines.append(f"| {s} | {', '.join(str(v) for v in f['visits_to_target'])} | {_mb(f['bytes_to_target'])} "
                         f"| {_mb(model[s]['bytes_to_target'])} | {_mb(f['bytes_per_visit'])} | "
                         f"{_mb(model[s]['bytes_per_visit'])} |")
        for other in ("relay", "fedavg"):
            lines.append(f"| Snake ÷ {other} | | {_f(m['snake_' + other])} | "
                         f"{_f(_ratio(model['snake']['bytes_to_target'], model[other]['bytes_to_target']))} | "
                         f"{_f(m['per_visit_snake_' + other])} | "
                         f"{_f(model['snake']['bytes_per_visit'] / model[other]['bytes_per_visit'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], points: list[dict[str, Any]], path: str) -> None:
    """Three panels against x (log): Snake ÷ relay bytes, Snake ÷ FedAvg bytes, Snake ÷ FedAvg memory."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    panels = (("snake_relay", "bytes: Snake ÷ relay"), ("snake_fedavg", "bytes: Snake ÷ FedAvg"),
              ("memory_snake_fedavg", "node memory: Snake ÷ FedAvg"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 6), sharex=True, sharey=True)
    colours = dict(zip(dict.fromkeys(r["case"] for r in rows), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (key, title) in zip(axes, panels):
        for case, sync in ((c, s) for c in colours for s in ("delta", "window")):
            line = sorted((r for r in rows if r["case"] == case and r["sync"] == sync), key=lambda r: r["x"])
            if line and (key != "memory_snake_fedavg" or sync == "delta"):  # memory does not depend on sync
                style = "-o" if sync == "delta" else "--s"
                ax.plot([r["x"] for r in line], [r[key] for r in line], style, color=colours[case], mfc="none",
                        label=f"{line[0]['label']} (model, {sync} sync)")
        for i, (p, marker) in enumerate(zip(points, "*PXDp")):  # later points smaller: all stay visible
            if p["measured"][key] is not None:
                ax.plot(p["x"], p["measured"][key], marker, ms=16 - 3 * i, color=colours.get(p["case"], "k"),
                        mec="k", label=f"{p['label']}: measured, {p['source']}")
        ax.axhline(1.0, color="grey", lw=1)
        if key == "snake_fedavg":
            ax.axhline(GOAL, color="red", lw=1, ls=":", label=f"goal: {GOAL}× FedAvg")
        ax.set(xscale="log", yscale="log", title=title, xlabel="segments ÷ (nodes × window)")
        ax.set_xticks(X_TICKS, labels=[f"{t:g}" for t in X_TICKS], minor=False)
        ax.set_yticks(Y_TICKS, labels=[f"{t:g}" for t in Y_TICKS], minor=False)
        ax.minorticks_off()
    axes[0].set_ylabel("Snake ÷ baseline")
    fig.suptitle("Model (lines): per visit, equal visits, steady state. Measured (filled markers): bytes to the "
                 "sustained target, median node peak ledger", fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(c.key for c in CASES), help="comma-separated case keys")
    parser.add_argument("--windows", default="1,2,3", help="comma-separated windows (segments)")
    parser.add_argument("--syncs", default="delta,window", help="comma-separated syncs")
    parser.add_argument("--periods", type=int, default=100,
                        help="steady state: this many lcm(nodes, sweep period) hops after the first visits")
    parser.add_argument("--measured", action="append", default=[], metavar="CASE=SUMMARY",
                        help="a comparison's summary.json measured on CASE, at CASE's own window (repeatable)")
    parser.add_argument("--out", help="write the markdown here too")
    parser.add_argument("--json", help="write every figure as JSON here")
    parser.add_argument("--plot", help="write the plot (PNG) here")
    args = parser.parse_args(argv)
    cases = {c.key: c for c in CASES}
    windows, syncs = [int(w) for w in args.windows.split(",")], args.syncs.split(",")
    keys = args.cases.split(",")
    rows = [row for key in keys for row in model_rows(cases[key], windows, syncs, args.periods)]
    points = [measured_point(cases[key], path, args.periods)
              for key, _, path in (spec.partition("=") for spec in args.measured)]
    text = markdown(rows, points)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        about = {key: {"label": cases[key].label, "config": cases[key].config, "nodes": cases[key].nodes,
                       "segment_bytes": {n: b for n, (b, _) in segment_sizes(
                           strategy_config(cases[key], "snake"), cases[key].min_segments).items()}} for key in keys}
        Path(args.json).write_text(json.dumps({"periods": args.periods, "cases": about, "model": rows,
                                               "measured": points}, indent=1))
    if args.plot:
        plot(rows, points, args.plot)


if __name__ == "__main__":
    main()
