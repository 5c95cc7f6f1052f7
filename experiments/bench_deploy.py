"""Per-hop latency of Snake in a real deployment: stock Flower, the fast-poll ServerApp, the node launcher.

Each run is a fresh ``LoopbackDeployment`` (one ``flower-superlink``, three SuperNodes on
loopback, ``flwr run .``; docs/deploy.md) of the default app: Fashion-MNIST CNN, 100
local steps per hop, real payloads. A hop is the server's ``hop_s``: from sending the hop
to the reply it accepts. Three arms, each changing one part, run alternately (their order
reversed from one repeat to the next, so that a noisy machine weighs on all alike):

- ``stock``: ``flower-supernode`` as Flower ships it, ``fast-poll=false`` and
  ``SNAKE_FLOWER_STOCK_FLOWER=1``: every patch off, the ServerApp's included;
- ``fast-poll``: the same stock nodes (``flower-supernode``, its ``flower-superexec``, a fresh
  ``flwr-clientapp`` per message: nothing of the app patches Flower there), and the ServerApp
  with ``fast-poll=true``: replies polled every 0.05 s at most, their objects pulled with the
  0.02-0.05 s back-off (the one patch, in the ServerApp's process);
- ``launcher``: ``snake-flower supernode`` (warm forked ClientApps, SuperNode sleeps capped
  at 0.1 s, object pulls from 0.02 s) and the same fast-poll ServerApp.

Every process gets ``OMP_NUM_THREADS=1`` (the launcher trains on one torch thread; so
does stock Flower here, and so does the Ray simulation). The SuperLink keeps its state in
memory, ``flower-superlink``'s default (``--superlink-state file``: in a SQLite file, as the
commands of docs/deploy.md and the deployment tests run it). Launcher nodes are warm (their
forkservers have preloaded everything) before a run is submitted, as long-running nodes are.

Prints, per arm, the median and mean hop, the median of the nodes' own training time
(``train_s``: ``train_window``'s loop, and its CPU seconds ``train_cpu_s``), of the rest
(``hop_s - train_s``) and the overhead (median hop minus median ``train_s``), and checks
that every run ends with the same model, and (unless ``--no-in-process``) that it is the
model the same run gives in the Ray simulation (``snake-flower run``). The load average is
recorded before and after each run. ``--json OUT`` writes ``{"arms": {"stock":
{"median_hop_s": ..., "median_train_s": ..., "overhead_s": ..., "hops": N, ...},
"fast-poll": {...}, "launcher": {...}}, "runs": [...], ...}``. ``--timeline`` also times the
calls that cut a hop into stages (``STAGES``: the server's push, the message at the node, the
ClientApp's pull, the node's work before and after training, the reply's way back) in every
process of a run, and adds each arm's median stages.

    python experiments/bench_deploy.py --hops 8 --repeats 2 --json experiments/bench_deploy.json
    python experiments/bench_deploy.py --arms launcher --repeats 1 --no-in-process --timeline
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
from snake_flower.runtime.results import cpu

ARMS = {"stock": {"launcher": False, "fast-poll": False, "env": {STOCK_ENV: "1"}},
        "fast-poll": {"launcher": False, "fast-poll": True, "env": {STOCK_ENV: "0"}},
        "launcher": {"launcher": True, "fast-poll": True, "env": {STOCK_ENV: "0"}}}
"""Each arm's nodes (launcher or stock ``flower-supernode``), ServerApp polling and environment
(``SNAKE_FLOWER_STOCK_FLOWER=0``: patches allowed, whatever the bench's own environment says)."""


TIMELINE_ENV = "BENCH_DEPLOY_TIMELINE"
"""With ``--timeline``: the file every process of a run appends its timed calls to."""
TIMED = {  # module: functions ("Class.method"), timed in every process that imports the module
    "strategies.snake": ["SnakeStrategy.configure_train", "SnakeStrategy.merge"],  # a hop's hop_s: inside
    "snake_flower.runtime.metering": ["MeteredGrid.send_and_receive"],  # ServerApp: a hop, push to reply
    "flwr.superlink.grid.http_grid": ["HttpGrid.push_messages"],
    "flwr.supernode.start_client_internal": ["_pull_and_store_message", "push_object_contents_from_iterable"],
    "flwr.supernode.runtime.run_clientapp": ["run_clientapp", "pull_task_input", "push_message"],
    "flwr.clientapp.client_app": ["ClientApp.__call__"],
    "snake_flower.node": ["train_window"],
}
TIMELINE_SITE = '''"""bench_deploy.py --timeline: time some calls of every process of a run (its sitecustomize)."""
import functools, importlib.abc, importlib.util, os, sys, time

TIMED = {timed!r}
PATH = os.environ.get({env!r})


def _wrap(fn, name):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        began, cpu, result = time.time(), time.process_time(), None
        try:
            result = fn(*args, **kwargs)
            return result
        finally:
            if result is not None or name != "_pull_and_store_message":  # an idle poll: nothing pulled
                line = f"{{began:.4f}} {{time.time():.4f}} {{time.process_time() - cpu:.4f}} {{os.getpid()}} {{name}}\\n"
                fd = os.open(PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, line.encode())
                os.close(fd)
    return timed


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TIMED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                for ref in TIMED[name]:
                    owner, _, method = ref.partition(".")
                    holder = getattr(module, owner) if method else module
                    attr = method or owner
                    setattr(holder, attr, _wrap(getattr(holder, attr), ref))
            spec.loader.exec_module = exec_module
        return spec


if PATH:
    sys.meta_path.insert(0, _Finder())
'''
"""The ``sitecustomize`` a ``--timeline`` run puts first on every process's ``PYTHONPATH``: the
functions in ``TIMED`` (``inspect`` sees through the wrappers, so the patches' fingerprints hold)."""
HOP = "MeteredGrid.send_and_receive"
STAGES = (  # (name, from, to): the milestones of a hop, each the start (0) or end (1) of a timed call
    ("ServerApp before the push", ("SnakeStrategy.configure_train", 1), (HOP, 0)),
    ("server push", (HOP, 0), ("HttpGrid.push_messages", 1)),
    ("message at the node", ("HttpGrid.push_messages", 1), ("_pull_and_store_message", 1)),
    ("ClientApp has its message", ("_pull_and_store_message", 1), ("pull_task_input", 1)),
    ("FAB, app, node before training", ("pull_task_input", 1), ("train_window", 0)),
    ("training (train_window)", ("train_window", 0), ("train_window", 1)),
    ("node after training", ("train_window", 1), ("ClientApp.__call__", 1)),
    ("reply pushed to the SuperNode", ("ClientApp.__call__", 1), ("push_message", 1)),
    ("reply at the SuperLink", ("push_message", 1), ("push_object_contents_from_iterable", 1)),
    ("reply at the ServerApp", ("push_object_contents_from_iterable", 1), (HOP, 1)),
    ("ServerApp to the merge", (HOP, 1), ("SnakeStrategy.merge", 0)),
)
"""A hop cut at its milestones; on a warm node the ClientApp may start before the node has
all the message's objects (its own pull then waits), so a stage can be negative."""


def timeline_env(workdir: Path) -> dict[str, str]:
    """Environment that times ``TIMED`` in every process of a run, into ``<workdir>/timeline.log``."""
    site = workdir / "timeline-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(TIMELINE_SITE.format(timed=TIMED, env=TIMELINE_ENV))
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, TIMELINE_ENV: str(workdir / "timeline.log")}


def hop_stages(log: Path) -> list[dict[str, float]]:
    """Each hop's stages (``STAGES``, seconds) from a ``--timeline`` log, with ``clientapp_cpu_s``:
    the CPU seconds of the ClientApp's whole task (``run_clientapp``)."""
    calls = []
    for line in log.read_text().splitlines():
        began, ended, cpu, _, name = line.split()
        calls.append((float(began), float(ended), float(cpu), name))
    hops, calls = [], sorted(calls)
    for began, ended, _, name in calls:
        if name != HOP:
            continue
        configured = [c for c in calls if c[3] == "SnakeStrategy.configure_train" and c[1] <= began]
        merged = [c for c in calls if c[3] == "SnakeStrategy.merge" and c[0] >= ended]
        # a call that ends inside the hop: the SuperNode's poll may start just before the push
        inside = [c for c in calls if c[0] <= ended and began <= c[1] and c[3] != HOP]
        marks = {"SnakeStrategy.configure_train": configured[-1] if configured else None,
                 "SnakeStrategy.merge": merged[0] if merged else None}
        for start, end, cpu, call in inside:
            marks.setdefault(call, (start, end, cpu))  # the hop's first: its message, not a late retry
        marks[HOP] = (began, ended, 0.0)
        if not all(marks.get(call) for stage in STAGES for call, _ in stage[1:]):
            continue  # not a training hop (a query, evaluation)
        hop = {name: round(marks[to[0]][to[1]] - marks[since[0]][since[1]], 4) for name, since, to in STAGES}
        hop["clientapp_cpu_s"] = marks["run_clientapp"][2] if "run_clientapp" in marks else None
        hops.append(hop)
    return hops


def stage_medians(hops: list[dict[str, float]]) -> dict[str, float]:
    """The median of each stage over ``hops``."""
    return {name: round(statistics.median(h[name] for h in hops if h[name] is not None), 3)
            for name in hops[0]} if hops else {}


def overrides(hops: int) -> dict:
    """The run-config of every run: the default app, ``hops`` hops, evaluated once at the end."""
    return {"num-server-rounds": hops, "eval-every": hops, "min-nodes": 3}


def run_arm(workdir: Path, arm: str, hops: int, in_memory: bool, timeline: bool = False
            ) -> tuple[list[dict], str]:
    """The rows of one deployed run of the default app, and its final model hash.

    With ``timeline`` every process times ``TIMED`` into ``<workdir>/timeline.log``.
    """
    spec = ARMS[arm]
    env = {"OMP_NUM_THREADS": "1", **spec["env"], **(timeline_env(workdir) if timeline else {})}
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
    """Median and mean hop, the nodes' training time, its CPU, the rest and the overhead, over ``rows``.

    The rest is the median of each hop's ``hop_s - train_s``; the overhead is the median hop
    minus the median ``train_s`` (issue 35's measure of what the plumbing costs a hop).
    """
    hops = [row["hop_s"] for row in rows]
    train = [row["train_s"] for row in rows]
    train_cpu = [row["train_cpu_s"] for row in rows]
    return {"median_hop_s": round(statistics.median(hops), 3), "hops": len(hops),
            "mean_hop_s": round(statistics.mean(hops), 3), "min_hop_s": round(min(hops), 3),
            "max_hop_s": round(max(hops), 3), "median_train_s": round(statistics.median(train), 3),
            "median_train_cpu_s": round(statistics.median(train_cpu), 3),
            "median_rest_s": round(statistics.median(h - t for h, t in zip(hops, train)), 3),
            "overhead_s": round(statistics.median(hops) - statistics.median(train), 3)}


def arm_order(arms: list[str], repeat: int) -> list[str]:
    """The order the arms run in at ``repeat`` (from 0): as given, then reversed, alternately."""
    return list(arms) if repeat % 2 == 0 else list(reversed(arms))


def train_cpu_ratios(arms: dict[str, dict], reference: str = "launcher") -> dict[str, float]:
    """Each arm's median training CPU over the ``reference`` arm's (the same steps on every node)."""
    if reference not in arms or not arms[reference]["median_train_cpu_s"]:
        return {}
    base = arms[reference]["median_train_cpu_s"]
    return {arm: round(line["median_train_cpu_s"] / base, 3) for arm, line in arms.items()}


def print_table(report: dict) -> None:
    """The arms as a Markdown table, and how each compares with the launcher."""
    print("| arm | hops | median hop s | mean hop s | min-max | median train s | median train CPU s | "
          "median rest s | overhead s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, line in report["arms"].items():
        print(f"| {arm} | {line['hops']} | {line['median_hop_s']:.2f} | {line['mean_hop_s']:.2f} | "
              f"{line['min_hop_s']:.2f}-{line['max_hop_s']:.2f} | {line['median_train_s']:.2f} | "
              f"{line['median_train_cpu_s']:.2f} | {line['median_rest_s']:.2f} | {line['overhead_s']:.2f} |")
    if "launcher" in report["arms"]:
        launcher = report["arms"]["launcher"]["median_hop_s"]
        for arm, line in report["arms"].items():
            if arm != "launcher":
                print(f"launcher / {arm} (median hop): {launcher / line['median_hop_s']:.2f}")
    for arm, ratio in report["train_cpu_vs_launcher"].items():
        if arm != "launcher":
            print(f"{arm} / launcher (median training CPU): {ratio:.2f}")


def print_stages(report: dict) -> None:
    """Each arm's median hop stages (``--timeline``) as a Markdown table."""
    arms = [arm for arm, line in report["arms"].items() if line.get("stages")]
    if not arms:
        return
    print("\n| stage (median s) | " + " | ".join(arms) + " |")
    print("|---|" + "---|" * len(arms))
    for name in report["arms"][arms[0]]["stages"]:
        print(f"| {name} | " + " | ".join(f"{report['arms'][arm]['stages'].get(name, float('nan')):.3f}"
                                         for arm in arms) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=8, help="hops per run (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm (default 2)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms to run, in this order (default {','.join(ARMS)})")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--superlink-state", choices=("memory", "file"), default="memory",
                        help="the SuperLink's state: in memory (Flower's default) or in a SQLite file")
    parser.add_argument("--no-in-process", action="store_true",
                        help="skip the Ray simulation run whose model every deployed run must equal")
    parser.add_argument("--timeline", action="store_true",
                        help="time each hop's stages in every process (a sitecustomize on PYTHONPATH); "
                             "adds each arm's median stages to the report")
    args = parser.parse_args()
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if unknown := sorted(set(arms) - set(ARMS)):
        parser.error(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    stages: dict[str, list[dict]] = {arm: [] for arm in arms}
    hashes: dict[str, set[str]] = {arm: set() for arm in arms}
    runs: list[dict] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for arm in arm_order(arms, repeat):
                load_before = load_average()
                workdir = Path(tmp) / f"{arm}-{repeat}"
                arm_rows, sha = run_arm(workdir, arm, args.hops, args.superlink_state == "memory", args.timeline)
                rows[arm].extend(arm_rows)
                if args.timeline:
                    stages[arm].extend(hop_stages(workdir / "timeline.log"))
                hashes[arm].add(sha)
                runs.append({"arm": arm, "repeat": repeat + 1, "hop_s": [r["hop_s"] for r in arm_rows],
                             "train_s": [r["train_s"] for r in arm_rows],
                             "train_cpu_s": [r["train_cpu_s"] for r in arm_rows], "model_sha256": sha,
                             "load_before": load_before, "load_after": load_average()})
                print(f"repeat {repeat + 1}/{args.repeats} {arm:9s} hop_s {runs[-1]['hop_s']} "
                      f"train_s {runs[-1]['train_s']} load {load_before} -> {runs[-1]['load_after']}", flush=True)
        reference = None if args.no_in_process else in_process_sha(Path(tmp) / "in-process", args.hops)
    deployed = set().union(*hashes.values())
    same_model = len(deployed) == 1
    report = {"arms": {arm: summary(arm_rows) for arm, arm_rows in rows.items()},
              "hops_per_run": args.hops, "repeats": args.repeats, "nodes": 3,
              "superlink_state": args.superlink_state, "same_model": same_model,
              "model_sha256": sorted(deployed), "in_process_sha256": reference,
              "same_as_in_process": None if reference is None else deployed == {reference},
              "cpu": cpu()["cpu"], "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
              "runs": runs, "wall_s": round(time.time() - started)}
    report["train_cpu_vs_launcher"] = train_cpu_ratios(report["arms"])
    if args.timeline:
        report["timeline"] = True
        for arm, hops in stages.items():
            report["arms"][arm]["stages"] = stage_medians(hops)
            report["arms"][arm]["timed_hops"] = len(hops)
    simulated = "" if reference is None else f"; the Ray simulation's too: {report['same_as_in_process']}"
    print(f"\n{args.hops} hops x {args.repeats} repeats per arm, 3 SuperNodes on loopback, SuperLink state "
          f"in {args.superlink_state}, {report['wall_s']} s in all; same final model in every run: "
          f"{same_model}{simulated}")
    print_table(report)
    if args.timeline:
        print_stages(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not same_model or report["same_as_in_process"] is False:
        sys.exit(f"the runs ended with different models: {report['model_sha256']} "
                 f"(Ray simulation: {reference})")


if __name__ == "__main__":
    main()
