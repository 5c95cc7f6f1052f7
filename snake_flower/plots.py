"""Plots of runs: test accuracy against node visits or megabytes; memory per node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .results import cumulative_bytes, cumulative_visits  # noqa: E402

XLABELS = {"visits": "node visits (Snake: one per hop; FedAvg: one per node per round)",
           "megabytes": "cumulative MB moved (down + up), log scale"}
LEDGER_PARTS = ("trainable_param_bytes", "frozen_param_bytes", "grad_bytes", "optimizer_bytes",
                "activation_bytes")


def _curve(result: dict[str, Any], x: str) -> tuple[list[float], list[float]]:
    rows = result["rounds"]
    if x == "visits":
        axis: list[float] = list(cumulative_visits(rows))
    else:
        axis = [b / 1e6 for b in cumulative_bytes(rows)]
    points = [(a, r["accuracy"]) for a, r in zip(axis, rows) if r["accuracy"] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_accuracy(runs: dict[str, dict[str, Any]], path: str | Path, x: str = "visits") -> Path:
    """One curve per run: centralized test accuracy against ``x`` (visits or megabytes)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, result in runs.items():
        ax.plot(*_curve(result, x), label=name, marker="." if len(result["rounds"]) < 40 else None)
    task = next(iter(runs.values()))["task"] if runs else ""
    ax.set(xlabel=XLABELS[x], ylabel="test accuracy", ylim=(0, 1), title=f"{task}: test accuracy")
    if x == "megabytes":  # split learning moves ~100x what Snake and FedAvg move
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


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
