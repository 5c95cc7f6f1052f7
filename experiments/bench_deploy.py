"""Per-hop latency of Snake in a real deployment, with Flower's 3 s Grid poll and with ours.

Each run is a fresh ``LoopbackDeployment`` (one ``flower-superlink``, three
``flower-supernode``s on loopback, ``flwr run .``; README, "Deploy") of a short Snake
run whose hops do almost no training (``task=synthetic``, 5 local steps), so a hop's
time is the deployment's latency: from the server sending the hop to the reply it
accepts (``hop_s`` in the results). The arms run alternately, their order rotated from
one repeat to the next, so that a noisy machine weighs on all of them alike:

- ``flower``: ``fast-poll=false``, the ServerApp pulls replies at Flower's fixed 3 s;
- ``fast``: ``fast-poll=true`` (the default), pulls back off from 2 ms to 0.1 s;
- ``fast+superexec`` (with ``--superexec-poll S``): also every SuperExec polls for new
  tasks every S seconds instead of 1 s, through Flower's own environment variable
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (on the SuperNodes this is the wait before a
  ClientApp process is started for a message that arrived).

Prints the median and mean seconds per hop of each arm over every hop of every
repeat, and the ratios to ``flower``. The final model is the same in every run
(checked): the poll changes when a reply is seen, not what it holds.

    python experiments/bench_deploy.py --hops 8 --repeats 4 --superexec-poll 0.05
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from snake_flower.deploy.loopback import LoopbackDeployment

OVERRIDES = {"task": "synthetic", "window": 1, "local-steps": 5, "eval-samples": 200, "min-nodes": 3}


def hop_times(workdir: Path, hops: int, fast_poll: bool, superexec_poll: float | None
              ) -> tuple[list[float], str]:
    """Seconds per hop of one deployed run, and its final model hash."""
    env = {"OMP_NUM_THREADS": "1"}  # as in the tests; the hops hardly compute anyway
    if superexec_poll is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll)
    with LoopbackDeployment(workdir, num_nodes=3, env=env) as deployment:
        result = deployment.run({**OVERRIDES, "num-server-rounds": hops, "eval-every": hops,
                                 "fast-poll": fast_poll}, timeout=60.0 * hops + 300)
    if result["failures"]:
        sys.exit(f"a hop failed in {workdir}: {result['failures'][0]}")
    return [row["hop_s"] for row in result["rounds"]], result["final"]["model_sha256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--superexec-poll", type=float, default=None,
                        help="add an arm with FLWR_SUPEREXEC_TASK_POLL_INTERVAL set to this (0.01-60 s)")
    args = parser.parse_args()
    arms = {"flower": (False, None), "fast": (True, None)}
    if args.superexec_poll is not None:
        arms["fast+superexec"] = (True, args.superexec_poll)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    hashes: set[str] = set()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(arms)[repeat % len(arms):] + list(arms)[:repeat % len(arms)]
            for arm in order:
                hops, sha = hop_times(Path(tmp) / f"{arm}-{repeat}", args.hops, *arms[arm])
                times[arm].extend(hops)
                hashes.add(sha)
                print(f"repeat {repeat + 1}/{args.repeats} {arm:15s} {[round(t, 2) for t in hops]}",
                      flush=True)
    if len(hashes) != 1:
        sys.exit(f"the runs ended with different models: {sorted(h[:12] for h in hashes)}")
    base = statistics.median(times["flower"]), statistics.mean(times["flower"])
    print(f"\n{args.hops} hops x {args.repeats} repeats per arm, 3 SuperNodes on loopback, "
          f"{time.time() - started:.0f} s in all; same final model ({hashes.pop()[:12]})")
    print("| arm | hops | median s/hop | mean s/hop | median / flower | mean / flower |")
    print("|---|---|---|---|---|---|")
    for arm, hops in times.items():
        median, mean = statistics.median(hops), statistics.mean(hops)
        print(f"| {arm} | {len(hops)} | {median:.2f} | {mean:.2f} | {median / base[0]:.2f} | {mean / base[1]:.2f} |")


if __name__ == "__main__":
    main()
