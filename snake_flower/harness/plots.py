"""Plots of runs: test accuracy (or an LLM's perplexity) against node visits or megabytes; memory per node."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from snake_flower.harness.targets import score_of  # noqa: E402
from snake_flower.runtime.results import cumulative_bytes, cumulative_network_time, cumulative_visits  # noqa: E402

XLABELS = {"visits": "node visits (Snake: one per hop; FedAvg: one per node per round)",
           "megabytes": "cumulative MB moved (CS: down + up; Snake in P2P: each transfer once), log scale",
           "network": "network-time model: cumulative seconds (compute / speed + bytes / link), log scale"}
LEDGER_PARTS = ("trainable_param_bytes", "frozen_param_bytes", "grad_bytes", "optimizer_bytes",
                "activation_bytes")


def _curve(result: dict[str, Any], x: str, metric: str = "accuracy") -> tuple[list[float], list[float]]:
    rows = result["rounds"]
    if x == "visits":
        axis: list[float] = list(cumulative_visits(rows))
    elif x == "network":
        axis = cumulative_network_time(rows)
    else:
        axis = [b / 1e6 for b in cumulative_bytes(rows, result.get("mode", "cs"))]
    points = [(a, score_of(r, metric)) for a, r in zip(axis, rows) if score_of(r, metric) is not None]
    if metric != "accuracy" and metric in result.get("initial", {}):
        # an LLM starts pretrained: its curve starts from that model's figure (0 visits, 0 MB)
        points.insert(0, (0.0, result["initial"][metric]))
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_accuracy(runs: dict[str, dict[str, Any]], path: str | Path, x: str = "visits",
                  metric: str | None = None) -> Path:
    """One curve per run: centralized ``metric`` against ``x`` (visits, megabytes or network seconds).

    ``metric`` defaults to held-out perplexity for task ``llm`` and to test accuracy otherwise.
    """
    task = next(iter(runs.values()))["task"] if runs else ""
    metric = metric or ("perplexity" if task == "llm" else "accuracy")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lowest = float("inf")
    for name, result in runs.items():
        xs, ys = _curve(result, x, metric)
        lowest = min([lowest, *xs])
        ax.plot(xs, ys, label=name, marker="." if len(result["rounds"]) < 40 else None)
    _axes(ax, metric, x, lowest, title=f"{task}: {metric}")
    return _save(fig, path)


def _axes(ax: plt.Axes, metric: str, x: str, lowest: float, title: str) -> None:
    """Labels, scales and legend of a plot of ``metric`` against ``x`` (``lowest``: its smallest x)."""
    if metric == "accuracy":
        ax.set(ylabel="test accuracy", ylim=(0, 1))
    else:
        ax.set(ylabel=f"held-out {metric}")
    ax.set(xlabel=XLABELS[x], title=title)
    if x == "megabytes":  # split learning moves ~100x what Snake and FedAvg move
        # an LLM's curve starts from its pretrained model at 0 MB, which a log scale cannot show
        ax.set_xscale("symlog" if metric != "accuracy" else "log")
    elif x == "network" and lowest > 0:  # results written before the model have 0 s everywhere
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if metric == "accuracy" else "upper right")


def plot_memory(runs: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Stacked bars: each strategy's peak per-node ledger, split by component."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(runs)
    bottom = [0.0] * len(names)
    for part in LEDGER_PARTS:
        heights = [runs[n]["memory"].get(part, 0) / 1e6 for n in names]
        ax.bar(names, heights, bottom=bottom, label=part.removesuffix("_bytes").replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(ylabel="MB at the node's peak hop", title="memory per node (peak ledger)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bands(runs: dict[str, list[dict[str, Any]]], path: str | Path, x: str = "visits",
               metric: str = "accuracy") -> Path:
    """Each run's median ``metric`` (test accuracy, or an LLM's held-out perplexity) over its seeds,
    with a band from the lowest to the highest seed.

    The seeds of a run are evaluated at the same node visits; against megabytes (or network
    seconds), each evaluation's x is the median of the seeds' cumulative figure there.
    """
    task = next(iter(runs.values()))[0]["task"] if runs else ""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lowest = float("inf")
    for name, seeds in runs.items():
        curves = [_curve(run, x, metric) for run in seeds]
        n = min(len(c[0]) for c in curves)  # equal unless a seed's run was cut short
        xs = [statistics.median(c[0][i] for c in curves) for i in range(n)]
        lowest = min([lowest, *xs])
        ys = [[c[1][i] for c in curves] for i in range(n)]
        line, = ax.plot(xs, [statistics.median(v) for v in ys], label=f"{name} (median of {len(seeds)})")
        ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)
    _axes(ax, metric, x, lowest, title=f"{task}: {metric}, median and range over seeds")
    return _save(fig, path)
