"""Overhead of a hop in the Ray simulation against the same training in a bare loop.

For each strategy, a one-node run (``snake-flower run --num-supernodes 1``, the experiment
file's settings, evaluation only at the end) records every hop's wall time as the server
sees it: Snake's ``hop_s``, from sending the hop to its reply (Flower's messaging, the
ClientApp building the model, its copy on disk, the training, the reply); FedAvg's round,
the time between two rounds' records (the first hop pays for Ray's and torch's start-up
and the last for the evaluation: both are left out). Then, in this process, the same
training runs in a bare loop: the model built once, and per hop ``train_window`` on the
hop's window with the same config, data and seed, no node code, no disk, one torch thread
as in a Ray actor. Prints per hop both times and, per strategy, their medians and ratio.

    python experiments/bench_overhead.py --config experiments/llm.toml --strategies snake,fedavg \\
        --hops 8 --json results/bench_overhead_llm.json
    python experiments/bench_overhead.py --hops 12 --run-config \\
        "partitioner=iid window=4 train-head=true local-steps=100"   # Fashion-MNIST, whole model
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
from typing import Any

import torch

from snake_flower.client_app import task_data, task_model
from snake_flower.config import experiment_layers, kd_enabled, load_toml, node_message, parse_overrides, resolve
from snake_flower.runtime.results import cpu
from snake_flower.tasks.task import swept_segment_keys
from snake_flower.training.batches import visit_seed
from snake_flower.training.loop import LocalWork, train_window


def one_node_config(path: str | None, strategy: str, overrides: str, hops: int) -> dict[str, Any]:
    """The run-config of the one-node run: the file's layers for ``strategy``, the overrides,
    ``hops`` + 2 rounds (start-up and evaluation hops dropped), evaluation at the end only."""
    layers = experiment_layers(load_toml(path), strategy) if path else [{"strategy": strategy}]
    rounds = hops + 2
    return {key: value for layer in [*layers, parse_overrides(overrides),
                                     {"num-server-rounds": rounds, "eval-every": rounds}]
            for key, value in layer.items()}


def simulated_hops(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's rows between the first and the last (which evaluates)."""
    flat = {key: value for key, value in config.items() if key != "run-name"}
    text = " ".join(f"{key}={json.dumps(value) if isinstance(value, str) else _toml(value)}"
                    for key, value in flat.items())
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", "1",
                        "--run-config", text, "--out", out], check=True, capture_output=True)
        rows = json.loads((Path(out) / f"{config['strategy']}.json").read_text())["rounds"]
    for before, row in zip(rows, rows[1:]):
        row["round_s"] = row["wall_s"] - before["wall_s"]
    return rows[1:-1]


def _toml(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class _Node:
    """What the bare loop needs of a node's context: its partition (one node: all of it)."""
    node_config = {"partition-id": 0, "num-partitions": 1}


def bare_loop(config: dict[str, Any], rows: list[dict[str, Any]]) -> list[float]:
    """Seconds of ``train_window`` per hop, on the hop's window, in this process."""
    torch.set_num_threads(1)
    cfg = node_message(resolve(config))
    model = task_model(cfg)
    segments = swept_segment_keys(model, cfg)
    data = task_data(_Node(), cfg)
    times = []
    for row in [rows[0], *rows]:  # the first, untimed, warms torch up as the simulation's dropped first hop does
        hop = {**cfg, "server-round": row["round"]}
        work = LocalWork.from_config(hop, kd=cfg["strategy"] == "snake" and kd_enabled(hop))
        window = row["window"] if cfg["strategy"] == "snake" else list(segments)
        start = time.perf_counter()
        train_window(model, window, data, segments=segments, work=work,
                     seed=visit_seed(cfg["seed"], row["round"]), align=getattr(model, "snake_align", None))
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment TOML file (default: the run-config defaults)")
    parser.add_argument("--strategies", default="snake", help="comma-separated (default snake)")
    parser.add_argument("--run-config", default="", help="overrides for every strategy")
    parser.add_argument("--hops", type=int, default=8, help="hops measured per strategy")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                              "cpu": cpu()["cpu"], "strategies": {}}
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        config = one_node_config(args.config, strategy, args.run_config, args.hops)
        rows = simulated_hops(config)
        hop_s = [row["hop_s"] if "hop_s" in row else row["round_s"] for row in rows]
        bare_s = bare_loop(config, rows)
        for row, hop, bare in zip(rows, hop_s, bare_s):
            print(f"{strategy} hop {row['round']:>3}: {hop:7.3f} s simulated, {bare:7.3f} s bare loop "
                  f"(node's training {row.get('train_s', float('nan')):.3f} s)")
        ratio = statistics.median(hop_s) / statistics.median(bare_s)
        print(f"{strategy}: median {statistics.median(hop_s):.3f} s simulated, "
              f"{statistics.median(bare_s):.3f} s bare loop over {len(rows)} hops: ratio {ratio:.2f}")
        report["strategies"][strategy] = {"hop_s": hop_s, "bare_s": bare_s, "rounds": [r["round"] for r in rows],
                                          "median_hop_s": statistics.median(hop_s),
                                          "median_bare_s": statistics.median(bare_s), "ratio": ratio}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
