"""Overhead of a Snake hop in the Ray simulation against the same training in a bare loop.

Both sides train the whole model (window 4 + head = every segment) for ``--steps`` SGD steps
on the same data (one node, so its partition is the whole training set), IID so that no
distillation runs. The hop time is what the server sees, from sending the hop to its reply:
it includes Flower's messaging, the ClientApp's state handling and the training. Prints the
median of each and their ratio.

    python experiments/bench_overhead.py --hops 12 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from snake_flower.config import node_message, resolve
from snake_flower.tasks.data import partition_indices
from snake_flower.tasks.task import TASKS, build_model, segment_keys
from snake_flower.training.loop import LocalWork, train_window


def bare_loop(steps: int, runs: int) -> list[float]:
    """Seconds per run of ``train_window`` on the whole model, one thread like a Ray actor."""
    torch.set_num_threads(1)
    config = resolve({"partitioner": "iid", "local-steps": steps})
    task = TASKS[config.task]
    x, y, _, _ = task.load("")
    idx = partition_indices(y, "iid", 1, 0)
    times = []
    for run in range(runs):
        model = build_model(task, config.seed)
        start = time.perf_counter()
        train_window(model, task.segment_names, (x[idx], y[idx]), segments=segment_keys(model),
                     work=LocalWork.from_config(node_message(config), kd=False), seed=run)
        times.append(time.perf_counter() - start)
    return times


def simulated_hops(steps: int, hops: int) -> list[float]:
    """Server-side seconds per hop of a one-node Snake run training every segment."""
    with tempfile.TemporaryDirectory() as out:
        overrides = (f"partitioner=iid window=4 train-head=true local-steps={steps} "
                     f"num-server-rounds={hops} eval-every={hops}")
        subprocess.run([sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", "1",
                        "--run-config", overrides, "--out", out], check=True, capture_output=True)
        rows = json.loads((Path(out) / "snake.json").read_text())["rounds"]
    return [r["hop_s"] for r in rows[1:]]  # the first hop pays for Ray's and torch's start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=12)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    hops = simulated_hops(args.steps, args.hops)
    bare = bare_loop(args.steps, len(hops))
    ratio = statistics.median(hops) / statistics.median(bare)
    print(f"simulated hop: median {statistics.median(hops):.3f} s over {len(hops)} hops "
          f"(min {min(hops):.3f}, max {max(hops):.3f})")
    print(f"bare loop:     median {statistics.median(bare):.3f} s over {len(bare)} runs "
          f"(min {min(bare):.3f}, max {max(bare):.3f})")
    print(f"ratio (simulation hop / bare loop), medians: {ratio:.3f}")


if __name__ == "__main__":
    main()
