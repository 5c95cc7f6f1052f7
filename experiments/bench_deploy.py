"""Per-hop latency of Snake in a real deployment: stock Flower against the warm node launcher.

Each run is a fresh ``LoopbackDeployment`` (one ``flower-superlink``, three SuperNodes on
loopback, ``flwr run .``; docs/deploy.md) of the default app: Fashion-MNIST CNN, 100
local steps per hop, real payloads. A hop is the server's ``hop_s``: from sending the hop
to the reply it accepts. Two arms, run alternately (their order swapped from one repeat
to the next, so that a noisy machine weighs on both alike):

- ``stock``: ``flower-supernode`` as Flower ships it, ``fast-poll=false`` and
  ``SNAKE_FLOWER_STOCK_FLOWER=1``: every patch off, the ServerApp's included;
- ``launcher``: ``snake-flower supernode`` (warm forked ClientApps, SuperNode sleeps capped
  at 0.1 s, object pulls from 0.02 s), ``fast-poll=true``.

Every process gets ``OMP_NUM_THREADS=1`` (the launcher trains on one torch thread; so
does stock Flower here, and so does the Ray simulation). The SuperLink keeps its state in
memory, ``flower-superlink``'s default (``--superlink-state file``: in a SQLite file, as the
commands of docs/deploy.md and the deployment tests run it). Launcher nodes are warm (their
forkservers have preloaded everything) before a run is submitted, as long-running nodes are.

Prints, per arm, the median and mean hop, the median of the nodes' own training time
(``train_s``, and its CPU seconds ``train_cpu_s``) and of the rest (``hop_s - train_s``),
and checks that every run ends with the same model, and (unless ``--no-in-process``) that
it is the model the same run gives in the Ray simulation (``snake-flower run``). The load
average is recorded before and after each run. ``--json OUT`` writes
``{"arms": {"stock": {"median_hop_s": ..., "hops": N, ...}, "launcher": {...}}, "runs": [...], ...}``.

    python experiments/bench_deploy.py --hops 8 --repeats 2 --json results/bench_deploy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from snake_flower.deploy.loopback import BIN, QUIET_ENV, LoopbackDeployment, run_config_text
from snake_flower.runtime.flower_patches import STOCK_ENV

ARMS = {"stock": {"launcher": False, "fast-poll": False, "env": {STOCK_ENV: "1"}},
        "launcher": {"launcher": True, "fast-poll": True, "env": {}}}


def overrides(hops: int) -> dict:
    """The run-config of every run: the default app, ``hops`` hops, evaluated once at the end."""
    return {"num-server-rounds": hops, "eval-every": hops, "min-nodes": 3}


def run_arm(workdir: Path, arm: str, hops: int, in_memory: bool) -> tuple[list[dict], str]:
    """The rows of one deployed run of the default app, and its final model hash."""
    spec = ARMS[arm]
    env = {"OMP_NUM_THREADS": "1", **spec["env"]}
    with LoopbackDeployment(workdir, num_nodes=3, env=env, launcher=spec["launcher"],
                            in_memory=in_memory) as deployment:
        result = deployment.run({**overrides(hops), "fast-poll": spec["fast-poll"]}, timeout=120.0 * hops + 600)
    if result["failures"]:
        sys.exit(f"a hop failed in {workdir}: {result['failures'][0]}")
    return result["rounds"], result["final"]["model_sha256"]


def in_process_sha(workdir: Path, hops: int) -> str:
    """The final model hash of the same run in Flower's Ray simulation (``snake-flower run``)."""
    env = {**os.environ, **QUIET_ENV, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(BIN / "snake-flower"), "run", "--run-config", run_config_text(overrides(hops)),
                    "--num-supernodes", "3", "--out", str(workdir)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return json.loads((workdir / "snake.json").read_text())["final"]["model_sha256"]


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def summary(rows: list[dict]) -> dict[str, float | int]:
    """Median and mean hop, the nodes' training time and the rest, over ``rows``."""
    hops = [row["hop_s"] for row in rows]
    train = [row["train_s"] for row in rows]
    train_cpu = [row["train_cpu_s"] for row in rows]
    return {"median_hop_s": round(statistics.median(hops), 3), "hops": len(hops),
            "mean_hop_s": round(statistics.mean(hops), 3), "min_hop_s": round(min(hops), 3),
            "max_hop_s": round(max(hops), 3), "median_train_s": round(statistics.median(train), 3),
            "median_train_cpu_s": round(statistics.median(train_cpu), 3),
            "median_rest_s": round(statistics.median(h - t for h, t in zip(hops, train)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=8, help="hops per run (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm (default 2)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--superlink-state", choices=("memory", "file"), default="memory",
                        help="the SuperLink's state: in memory (Flower's default) or in a SQLite file")
    parser.add_argument("--no-in-process", action="store_true",
                        help="skip the Ray simulation run whose model every deployed run must equal")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    hashes: dict[str, set[str]] = {arm: set() for arm in ARMS}
    runs: list[dict] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(ARMS) if repeat % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                load_before = load_average()
                arm_rows, sha = run_arm(Path(tmp) / f"{arm}-{repeat}", arm, args.hops,
                                        args.superlink_state == "memory")
                rows[arm].extend(arm_rows)
                hashes[arm].add(sha)
                runs.append({"arm": arm, "repeat": repeat + 1, "hop_s": [r["hop_s"] for r in arm_rows],
                             "train_s": [r["train_s"] for r in arm_rows], "model_sha256": sha,
                             "load_before": load_before, "load_after": load_average()})
                print(f"repeat {repeat + 1}/{args.repeats} {arm:8s} hop_s {runs[-1]['hop_s']} "
                      f"train_s {runs[-1]['train_s']} load {load_before} -> {runs[-1]['load_after']}", flush=True)
        reference = None if args.no_in_process else in_process_sha(Path(tmp) / "in-process", args.hops)
    deployed = hashes["stock"] | hashes["launcher"]
    same_model = len(deployed) == 1
    report = {"arms": {arm: summary(arm_rows) for arm, arm_rows in rows.items()},
              "hops_per_run": args.hops, "repeats": args.repeats, "nodes": 3,
              "superlink_state": args.superlink_state, "same_model": same_model,
              "model_sha256": sorted(deployed), "in_process_sha256": reference,
              "same_as_in_process": None if reference is None else deployed == {reference},
              "runs": runs, "wall_s": round(time.time() - started)}
    stock, launcher = report["arms"]["stock"], report["arms"]["launcher"]
    simulated = "" if reference is None else f"; the Ray simulation's too: {report['same_as_in_process']}"
    print(f"\n{args.hops} hops x {args.repeats} repeats per arm, 3 SuperNodes on loopback, SuperLink state "
          f"in {args.superlink_state}, {report['wall_s']} s in all; same final model in every run: "
          f"{same_model}{simulated}")
    print("| arm | hops | median hop s | mean hop s | min-max | median train s | median train CPU s | "
          "median rest s |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, line in report["arms"].items():
        print(f"| {arm} | {line['hops']} | {line['median_hop_s']:.2f} | {line['mean_hop_s']:.2f} | "
              f"{line['min_hop_s']:.2f}-{line['max_hop_s']:.2f} | {line['median_train_s']:.2f} | "
              f"{line['median_train_cpu_s']:.2f} | {line['median_rest_s']:.2f} |")
    print(f"launcher / stock (median hop): {launcher['median_hop_s'] / stock['median_hop_s']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not same_model or report["same_as_in_process"] is False:
        sys.exit(f"the runs ended with different models: {report['model_sha256']} "
                 f"(Ray simulation: {reference})")


if __name__ == "__main__":
    main()
