"""The server's memory and a hop's time at 10 to 10,000 simulated nodes, in one run.

Each federation size runs ``snake-flower run`` (Snake, the same number of hops) in a
fresh process on the synthetic task's large set, split IID, and reports:

- ``server_peak_rss_bytes``: that process's peak RSS (``VmHWM``). It holds the ServerApp
  and Flower's simulation engine (its per-node contexts too); the ClientApps run in Ray's
  worker processes, which are not counted;
- ``server_baseline_rss_bytes``: its RSS once torch, Ray, Flower and the app are imported;
- ``first_hop_s``: from the ServerApp's start to the first merged hop (rank discovery,
  Ray's start and the actors' first imports included);
- ``median_hop_s``: the median time between consecutive hops (the first and the last,
  which carries the final evaluation, left out);
- ``strategy_bytes`` and ``strategy_bytes_per_node``: what ``SnakeStrategy`` still holds
  after the same hops against an in-process grid of as many nodes, allocated by the
  ``strategies`` package (``tracemalloc``), divided by the number of nodes.

With ``--repeats R`` every size runs R times, the sizes interleaved (10, 100, ..., 10, 100,
...) so that a noisy spell of a shared machine does not fall on one size alone; each figure
is then the median of its R runs (every run's figures are kept under ``runs``).

    python experiments/bench_scale.py --json results/bench_scale.json
    python experiments/bench_scale.py --repeats 3 --json results/bench_scale.json
    python experiments/bench_scale.py --nodes 10,100 --hops 6 --json /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

HOPS = 8
# a short hop (the cost that grows with the federation shows); eval only at the end
OVERRIDES = ("strategy=snake task=synthetic-large partitioner=iid local-steps=10 batch-size=8 "
             "eval-every={hops} num-server-rounds={hops}")

CHILD = """
import json, sys
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
import ray, torch, flwr.simulation  # what every run imports before its ServerApp starts
from snake_flower import cli, client_app, server_app
baseline = rss("VmRSS")
code = cli.main(["run", "--run-config", sys.argv[2], "--out", sys.argv[3],
                 "--num-supernodes", sys.argv[1], "--parallel", "2"])
print(json.dumps({"code": code, "baseline": baseline, "peak": rss("VmHWM")}))
"""


def simulated(nodes: int, hops: int, out: Path) -> dict[str, float]:
    """One simulated run of ``hops`` hops over ``nodes`` nodes, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(nodes), OVERRIDES.format(hops=hops), str(out)],
                          check=True, capture_output=True, text=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if measured["code"] != 0:
        sys.exit(f"the {nodes}-node run failed (exit {measured['code']}): {done.stderr[-2000:]}")
    rounds = json.loads((out / "snake.json").read_text())["rounds"]
    walls = [row["wall_s"] for row in rounds]
    if len(walls) != hops or any(row["status"] != "merged" for row in rounds):
        sys.exit(f"the {nodes}-node run merged {sum(r['status'] == 'merged' for r in rounds)} of {hops} hops")
    gaps = [b - a for a, b in zip(walls, walls[1:])][:-1]
    return {"server_peak_rss_bytes": measured["peak"], "server_baseline_rss_bytes": measured["baseline"],
            "first_hop_s": round(walls[0], 3), "median_hop_s": round(statistics.median(gaps), 3)}


class EchoGrid:
    """``nodes`` in-process nodes that send their window back unchanged (and their rank)."""

    def __init__(self, nodes: int) -> None:
        import random

        ids = random.Random(0).sample(range(1, 2**63), nodes)  # random 64-bit ids, as Flower's
        self.ranks = {node: rank for rank, node in enumerate(ids)}

    def get_node_ids(self) -> list[int]:
        return list(self.ranks)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            rank = MetricRecord({"rank": self.ranks[msg.metadata.dst_node_id],
                                 "partition-id": self.ranks[msg.metadata.dst_node_id]})
            if msg.metadata.message_type == MessageType.QUERY:
                content = RecordDict({"info": rank})
            else:
                keys = [k for name in msg.content["config"]["window"] for k in self.segments[name]]
                window = ArrayRecord({k: msg.content["arrays"][k] for k in keys})
                content = RecordDict({"arrays": window, "metrics": rank})
            replies.append(Message(content, reply_to=msg))
        return replies


def strategy_bytes(nodes: int, hops: int) -> int:
    """Bytes the strategy holds after ``hops`` hops over ``nodes`` nodes, allocated in ``strategies``."""
    from flwr.app import ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    from snake_flower.config import resolve
    from snake_flower.tasks.task import TASKS, swept_segment_keys, transport_state
    from strategies import SnakeStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp
    config = resolve({"task": "synthetic-large"})
    model = TASKS["synthetic-large"].build()
    grid = EchoGrid(nodes)
    grid.segments = swept_segment_keys(model, config)
    initial = ArrayRecord(transport_state(model.state_dict()))
    tracemalloc.start()
    strategy = SnakeStrategy(grid.segments, config.window, min_nodes=nodes, seed=config.seed)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=hops, timeout=60.0)
    del result, grid  # the final model is the caller's; the grid is not the strategy's
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/strategies/*")])
    tracemalloc.stop()
    assert len(strategy.hops) == hops and all(hop["status"] == "merged" for hop in strategy.hops)
    return sum(stat.size for stat in snapshot.statistics("filename"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,100,1000,10000", help="federation sizes, comma-separated")
    parser.add_argument("--hops", type=int, default=HOPS, help=f"hops per run (default {HOPS})")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per size, interleaved; figures are their medians (default 1)")
    parser.add_argument("--json", required=True, help="where to write the measurements")
    args = parser.parse_args()
    if args.hops < 4:
        parser.error("--hops must be >= 4 (the first and last hops are left out of the median)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    sizes = [int(n) for n in args.nodes.split(",")]
    runs: dict[str, list[dict[str, float]]] = {str(nodes): [] for nodes in sizes}
    for repeat in range(args.repeats):
        for nodes in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                row = simulated(nodes, args.hops, Path(tmp))
            runs[str(nodes)].append(row)
            print(f"run {repeat + 1}/{args.repeats}, {nodes:>6} nodes: "
                  f"peak RSS {row['server_peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"(baseline {row['server_baseline_rss_bytes'] / 2**20:.0f}), first hop "
                  f"{row['first_hop_s']:.2f} s, median hop {row['median_hop_s']:.3f} s", flush=True)
    results: dict[str, dict[str, float]] = {}
    for nodes in sizes:
        row = {key: statistics.median(run[key] for run in runs[str(nodes)]) for key in runs[str(nodes)][0]}
        held = strategy_bytes(nodes, args.hops)  # deterministic: measured once
        row.update(strategy_bytes=held, strategy_bytes_per_node=round(held / nodes, 1))
        results[str(nodes)] = row
        print(f"{nodes:>6} nodes (median of {args.repeats}): peak RSS {row['server_peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"first hop {row['first_hop_s']:.2f} s, median hop {row['median_hop_s']:.3f} s, "
              f"strategy {row['strategy_bytes_per_node']:.0f} B/node", flush=True)
    base, top = results[str(sizes[0])], results[str(sizes[-1])]
    ratios = {key: round(top[key] / base[key], 3) for key in ("server_peak_rss_bytes", "first_hop_s", "median_hop_s")}
    print(f"{sizes[-1]} against {sizes[0]} nodes: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"hops": args.hops, "repeats": args.repeats, "nodes": results,
                                           f"ratios_{sizes[-1]}_vs_{sizes[0]}": ratios, "runs": runs},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
