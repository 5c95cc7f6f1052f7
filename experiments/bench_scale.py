"""The server's memory and a hop's time at 10 to 10,000 simulated nodes, in one run.

Each federation size runs ``snake-flower run`` (Snake, the same hops) in a fresh process on
the synthetic task's large set, split IID, with the same work at every size: the same
rank discovery (``--rank-discovery``, ``lazy`` by default, the mode ``auto`` picks above 256
nodes), a chain of every node from the first hop on (``min-nodes``), 10 local steps of full
batches of 8 per hop (the bench refuses a size whose partitions would give a smaller batch),
and enough hops that the strategy lists the Grid's nodes again at least once inside the
measured hops (``strategies.nodes.relist_interval``).
It reports:

- ``server_peak_rss_bytes``: that process's peak RSS (``VmHWM``). It holds the ServerApp
  and Flower's simulation engine (its per-node contexts too); the ClientApps run in Ray's
  worker processes, which are not counted;
- ``server_baseline_rss_bytes``: its RSS once torch, Ray, Flower and the app are imported;
- ``first_hop_s``: from the ServerApp's start (the top of its ``main``) to the first merged
  hop: the model and the evaluation set, rank discovery, Ray's start and the actors' first
  imports included;
- ``rank_discovery_s``: the part of the first hop spent listing the nodes and, with
  ``all``, asking each its rank (the first row's ``list_s``);
- ``median_hop_s`` and ``mean_hop_s``: the time between consecutive hops (the first and the
  last, which carries the final evaluation, left out);
- ``relistings`` and ``list_s``: how many measured hops listed the nodes again, and the
  median time such a hop spent listing them;
- ``strategy_bytes`` and ``strategy_bytes_per_node``: what ``SnakeStrategy`` still holds
  after the same hops against an in-process grid of as many nodes, allocated by the
  ``strategies`` package (``tracemalloc``), divided by the number of nodes.

With ``--repeats R`` every size runs R times, the sizes interleaved and their order reversed
every other repeat (10, 100, ..., 10000, 10000, ..., 100, 10, ...) so that a noisy spell of a
shared machine, or a drift, does not fall on one size alone; each figure is then the median of
its R runs (every run's figures are kept under ``runs``, each with the machine's load average
as it started). The ratios of the largest size to the smallest are given twice: of their
medians (``ratios_...``), and as the median of each repeat's ratio (``paired_ratios_...``:
both sizes of a repeat ran within a few minutes of each other).

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

from strategies.nodes import RANK_DISCOVERIES, relist_interval

TASK, STEPS, BATCH = "synthetic-large", 10, 8
# a short hop (the cost that grows with the federation shows); eval only at the end
# min-nodes: the first hop waits for every node (the ServerApp starts while Flower registers them)
OVERRIDES = (f"strategy=snake task={TASK} partitioner=iid local-steps={STEPS} batch-size={BATCH} "
             "rank-discovery={discovery} min-nodes={nodes} eval-every={hops} num-server-rounds={hops}")
RATIOS = ("server_peak_rss_bytes", "median_hop_s", "first_hop_s")

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


def min_hops(sizes: list[int]) -> int:
    """The fewest hops whose measured ones (the second to the last but one) hold a relisting at every size.

    The first hop lists the nodes; hop ``1 + relist_interval(n)`` lists them again.
    """
    return max(relist_interval(nodes) for nodes in sizes) + 2


def smallest_partition(nodes: int) -> int:
    """Training examples of the smallest IID partition of ``TASK`` over ``nodes`` nodes."""
    from snake_flower.tasks.task import TASKS

    return len(TASKS[TASK].load("")[1]) // nodes


def full_batches(examples: int, batch: int = BATCH, steps: int = STEPS) -> bool:
    """Does every one of ``steps`` batches drawn from ``examples`` hold ``batch`` examples?

    Asks the node's own batching (``training.batches.visit_batches``: reshuffled passes, each
    ending in a short batch unless ``batch`` divides ``examples``); the sizes do not depend on
    the seed.
    """
    from snake_flower.training.batches import visit_batches

    return all(len(idx) == batch for idx in visit_batches(examples, batch, steps, epochs=1, seed=0))


def hop_figures(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """First hop, rank discovery, hop times and relistings from one run's rows."""
    walls = [row["wall_s"] for row in rounds]
    gaps = [b - a for a, b in zip(walls, walls[1:])][:-1]  # rounds 2 .. hops - 1
    relists = [row["list_s"] for row in rounds[1:-1] if row["list_s"] is not None]
    return {"first_hop_s": round(walls[0], 3), "rank_discovery_s": round(rounds[0]["list_s"], 4),
            "median_hop_s": round(statistics.median(gaps), 4), "mean_hop_s": round(statistics.fmean(gaps), 4),
            "relistings": len(relists), "list_s": round(statistics.median(relists), 4) if relists else None}


def simulated(nodes: int, hops: int, discovery: str, out: Path) -> dict[str, float]:
    """One simulated run of ``hops`` hops over ``nodes`` nodes, in a fresh process."""
    overrides = OVERRIDES.format(hops=hops, discovery=discovery, nodes=nodes)
    load = float(Path("/proc/loadavg").read_text().split()[0])
    done = subprocess.run([sys.executable, "-c", CHILD, str(nodes), overrides, str(out)],
                          check=True, capture_output=True, text=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if measured["code"] != 0:
        sys.exit(f"the {nodes}-node run failed (exit {measured['code']}): {done.stderr[-2000:]}")
    result = json.loads((out / "snake.json").read_text())
    rounds = result["rounds"]
    if len(rounds) != hops or any(row["status"] != "merged" for row in rounds):
        sys.exit(f"the {nodes}-node run merged {sum(r['status'] == 'merged' for r in rounds)} of {hops} hops")
    if result["membership"]:  # the chain held every node from the first hop on
        sys.exit(f"the {nodes}-node run's chain changed: {result['membership'][0]}")
    figures = hop_figures(rounds)
    if not figures["relistings"]:
        sys.exit(f"the {nodes}-node run listed its nodes again in none of its measured hops")
    return {"server_peak_rss_bytes": measured["peak"], "server_baseline_rss_bytes": measured["baseline"],
            **figures, "load_1m": load}


class EchoGrid:
    """``nodes`` in-process nodes that send their window back unchanged (and their rank).

    Each node keeps the arrays it was sent: a node visited again is sent only what it lacks.
    """

    def __init__(self, nodes: int) -> None:
        import random

        ids = random.Random(0).sample(range(1, 2**63), nodes)  # random 64-bit ids, as Flower's
        self.ranks = {node: rank for rank, node in enumerate(ids)}
        self.copies: dict[int, dict[str, Any]] = {}

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
                copy = self.copies.setdefault(msg.metadata.dst_node_id, {})
                copy.update(msg.content["arrays"].items())
                keys = [k for name in msg.content["config"]["window"] for k in self.segments[name]]
                window = ArrayRecord({k: copy[k] for k in keys})
                content = RecordDict({"arrays": window, "metrics": rank})
            replies.append(Message(content, reply_to=msg))
        return replies


def strategy_bytes(nodes: int, hops: int, discovery: str) -> int:
    """Bytes the strategy holds after ``hops`` hops over ``nodes`` nodes, allocated in ``strategies``."""
    from flwr.app import ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    from snake_flower.config import resolve
    from snake_flower.tasks.task import TASKS, swept_segment_keys, transport_state
    from strategies import SnakeStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp
    config = resolve({"task": TASK})
    model = TASKS[TASK].build()
    grid = EchoGrid(nodes)
    grid.segments = swept_segment_keys(model, config)
    initial = ArrayRecord(transport_state(model.state_dict()))
    tracemalloc.start()
    strategy = SnakeStrategy(grid.segments, config.window, min_nodes=nodes, seed=config.seed,
                             rank_discovery=discovery)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=hops, timeout=60.0)
    del result, grid  # the final model is the caller's; the grid is not the strategy's
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/strategies/*")])
    tracemalloc.stop()
    assert len(strategy.hops) == hops and all(hop["status"] == "merged" for hop in strategy.hops)
    return sum(stat.size for stat in snapshot.statistics("filename"))


def paired_ratios(base: list[dict[str, Any]], top: list[dict[str, Any]]) -> dict[str, float]:
    """The median over repeats of each repeat's ``top`` figure over its ``base`` figure, per ``RATIOS`` key."""
    return {key: round(statistics.median(t[key] / b[key] for b, t in zip(base, top)), 3) for key in RATIOS}


def describe(row: dict[str, Any]) -> str:
    """One size's figures on one line."""
    relist = f"{row['list_s']:.4f} s" if row["list_s"] is not None else "none"
    return (f"peak RSS {row['server_peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(baseline {row['server_baseline_rss_bytes'] / 2**20:.0f}), first hop {row['first_hop_s']:.2f} s "
            f"(rank discovery {row['rank_discovery_s']:.4f} s), median hop {row['median_hop_s']:.4f} s "
            f"(mean {row['mean_hop_s']:.4f}), {row['relistings']:.0f} relisting(s) of {relist}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,100,1000,10000", help="federation sizes, comma-separated")
    parser.add_argument("--hops", type=int, default=0,
                        help="hops per run (default: the fewest with a relisting measured at every size, at least 8)")
    parser.add_argument("--rank-discovery", default="lazy", choices=RANK_DISCOVERIES,
                        help="the same at every size (default lazy: auto's mode above 256 nodes)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per size, interleaved; figures are their medians (default 1)")
    parser.add_argument("--json", required=True, help="where to write the measurements")
    args = parser.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    hops = args.hops or max(8, min_hops(sizes))
    if hops < min_hops(sizes):
        parser.error(f"--hops must be >= {min_hops(sizes)}: at {max(sizes)} nodes the nodes are listed again "
                     f"every {relist_interval(max(sizes))} hops, and the first and last hops are not measured")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    examples = {nodes: smallest_partition(nodes) for nodes in sizes}
    if short := [nodes for nodes in sizes if not full_batches(examples[nodes])]:
        parser.error(f"at {short[0]} nodes a partition holds {examples[short[0]]} examples: "
                     f"{STEPS} steps would not all be full batches of {BATCH}")
    runs: dict[str, list[dict[str, float]]] = {str(nodes): [] for nodes in sizes}
    for repeat in range(args.repeats):
        for nodes in sizes if repeat % 2 == 0 else sizes[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                row = simulated(nodes, hops, args.rank_discovery, Path(tmp))
            runs[str(nodes)].append(row)
            print(f"run {repeat + 1}/{args.repeats}, {nodes:>6} nodes: {describe(row)}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for nodes in sizes:
        done = runs[str(nodes)]
        row = {key: statistics.median(run[key] for run in done) if all(run[key] is not None for run in done)
               else None for key in done[0]}
        held = strategy_bytes(nodes, hops, args.rank_discovery)  # deterministic: measured once
        row.update(examples_per_node=examples[nodes], strategy_bytes=held,
                   strategy_bytes_per_node=round(held / nodes, 1))
        results[str(nodes)] = row
        print(f"{nodes:>6} nodes (median of {args.repeats}): {describe(row)}, "
              f"strategy {row['strategy_bytes_per_node']:.0f} B/node", flush=True)
    base, top = results[str(sizes[0])], results[str(sizes[-1])]
    ratios = {key: round(top[key] / base[key], 3) for key in RATIOS}
    paired = paired_ratios(runs[str(sizes[0])], runs[str(sizes[-1])])
    print(f"{sizes[-1]} against {sizes[0]} nodes: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + "; paired: " + ", ".join(f"{k} {v:.2f}x" for k, v in paired.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    work = {"task": TASK, "local_steps": STEPS, "batch_size": BATCH, "rank_discovery": args.rank_discovery}
    Path(args.json).write_text(json.dumps({"hops": hops, "repeats": args.repeats, "work": work, "nodes": results,
                                           f"ratios_{sizes[-1]}_vs_{sizes[0]}": ratios,
                                           f"paired_ratios_{sizes[-1]}_vs_{sizes[0]}": paired, "runs": runs},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
