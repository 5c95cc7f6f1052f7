"""Plots of a run: test accuracy against hops and against cumulative megabytes."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy(runs: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Two panels, one curve per run: accuracy vs round, accuracy vs cumulative MB."""
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, result in runs.items():
        rows = result["rounds"]
        moved = list(accumulate(r["bytes_down"] + r["bytes_up"] + r.get("bytes_control", 0) for r in rows))
        points = [(r["round"], mb / 1e6, r["accuracy"]) for r, mb in zip(rows, moved)
                  if r["accuracy"] is not None]
        rounds, megabytes, accuracy = zip(*points) if points else ((), (), ())
        by_round.plot(rounds, accuracy, label=name)
        by_bytes.plot(megabytes, accuracy, label=name)
    by_round.set(xlabel="round (one hop for Snake)", ylabel="test accuracy", ylim=(0, 1))
    by_bytes.set(xlabel="cumulative MB moved (down + up)")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    task = next(iter(runs.values()))["task"] if runs else ""
    fig.suptitle(f"{task}: centralized test accuracy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
