"""Integration: the real Ray simulation engine, through the CLI and through ``flwr run``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from snake_flower.runtime.flower_patches import FAKE_VERSION_ENV, STOCK_ENV, STOCK_RUNS, stock_reason

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
       "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
       "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
       # our own Ray instance, never the newest `ray start` cluster on the machine
       "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_matching(*needles: str) -> set[int]:
    """PIDs whose command line contains every needle (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(n in cmd for n in needles):
                found.add(int(entry.name))
    return found


# A flwr version nobody checked (runtime/flower_patches.py): every patch off, stock Flower, one warning
UNCHECKED = {FAKE_VERSION_ENV: "1.99.0", STOCK_ENV: ""}
RUN_TAG = "SNAKE_FLOWER_TEST_RUN"  # read by nothing: marks the environment of one test run
WARNED = "snake_flower: flwr 1.99.0 is not a version snake_flower's Flower patches were checked against"
STOCK_FAULT = (f"stock Flower here ({stock_reason('ray-actors')}): the test needs patch_ray_actors; without it "
               "a dead ClientApp actor goes back into Ray's pool and every later hop it is given fails")


def _simulate(out: Path, overrides: str) -> dict:
    return _simulate_watched(out, overrides)[0]


@dataclass
class Seen:
    """A process of a run: every command line it showed (Ray's renames itself), its start time,
    and the ``extra_env`` variables in its environment while it was readable (else ``None``)."""

    commands: str
    started: int
    env: dict[str, str] | None


def _simulate_watched(out: Path, overrides: str, extra_env: dict[str, str] | None = None
                      ) -> tuple[dict, str, dict[int, Seen]]:
    """``snake-flower run`` with ``extra_env``: its results, its output, and every process it
    started (Ray's included), watched while they live."""
    # RUN_TAG first: a process that renames itself (setproctitle) overwrites its environment from
    # the front, so a reading that still holds the tag holds everything after it
    env = {RUN_TAG: str(out), **ENV, **(extra_env or {})}
    cmd = [sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", "3", "--run-config", overrides,
           "--out", str(out)]
    processes: dict[int, Seen] = {}
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        while not done.done():
            for cli in _pids_matching("snake_flower.cli", str(out)):
                for pid in {cli} | _descendants(cli):
                    _watch(processes, pid, env, extra_env or {})
            time.sleep(0.2)
        proc = done.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snake: accuracy" in proc.stdout
    assert (out / "snake.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "snake.json").read_text()), proc.stdout + proc.stderr, processes


def _watch(processes: dict[int, Seen], pid: int, env: dict[str, str], names: dict[str, str]) -> None:
    """Note ``pid``'s command line, start time and, while its environment is intact, its ``names``."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        started = _started(pid)
    except (OSError, ValueError):
        return
    if not cmd or started is None:  # a zombie, or a process on its way out
        return
    seen = processes.get(pid)
    if seen is None or seen.started != started:  # (a PID reused meanwhile: another process)
        seen = processes[pid] = Seen("", started, None)
    if cmd not in seen.commands:
        seen.commands = f"{seen.commands} | {cmd}"
    found = dict(item.partition("=")[::2] for item in raw if item)
    if seen.env is None and found.get(RUN_TAG) == env[RUN_TAG]:
        seen.env = {name: found[name] for name in names if name in found}


def _started(pid: int) -> int | None:
    """``pid``'s start time (clock ticks after boot), or None if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _plugin_style_sha(loopback, nodes, out: Path, overrides: dict) -> str:
    """The same run in-process, its nodes built as a plugin user builds theirs: ``make_client_app``
    with the built-in task's model and this node's tensors handed in."""
    from snake_flower import make_client_app
    from snake_flower.config import resolve
    from snake_flower.server_app import run
    from snake_flower.tasks.data import partition_indices
    from snake_flower.tasks.task import TASKS, segment_keys

    config = resolve({**overrides, "out-dir": str(out)})
    task = TASKS[config["task"]]
    x, y, _, _ = task.load("")

    def train_data(context):
        part = partition_indices(y, config["partitioner"], context.node_config["num-partitions"],
                                 context.node_config["partition-id"], alpha=config["dirichlet-alpha"],
                                 seed=config["seed"])
        return x[part], y[part]

    app = make_client_app(task.build, train_data, segments=segment_keys(task.build()))
    three = nodes(3, app=app)
    run(loopback(list(three.contexts), three), config)
    return json.loads((out / "snake.json").read_text())["final"]["model_sha256"]


def test_ray_simulation_runs_hops_the_same_patched_or_stock_and_leaves_nothing_behind(tmp_path, loopback, nodes):
    overrides = "task=synthetic num-server-rounds=5 window=1 local-epochs=2"
    first, printed, patched = _simulate_watched(tmp_path / "a", overrides)  # patched (unless the suite is stock)
    # flwr's version faked to an unchecked one, in every process of the run: stock Flower, one warning
    second, warned, processes = _simulate_watched(tmp_path / "b", overrides, UNCHECKED)
    time.sleep(2)
    # nothing of either run is left (only their own processes: other sessions may run Ray meanwhile)
    left = {pid: seen.commands for pid, seen in [*patched.items(), *processes.items()]
            if _started(pid) == seen.started}
    assert left == {} and len(patched) > 5 and len(processes) > 5  # (the CLI, Ray's daemons and workers)
    if stock_reason("pickup", "ray-actors") is None:  # (unless the whole suite runs stock)
        assert STOCK_RUNS not in printed  # patched: no warning
    lines = [line for line in warned.splitlines() if "snake_flower:" in line]
    assert len(lines) == 1 and WARNED in lines[0] and STOCK_RUNS in lines[0], lines  # one line, once
    read = {seen.commands: seen.env for seen in processes.values() if seen.env is not None}
    assert {cmd: env for cmd, env in read.items() if env != UNCHECKED} == {}  # every process read had it ...
    assert [cmd for cmd in read if "ClientAppActor" in cmd]  # ... Ray's workers too

    rows = first["rounds"]
    assert [r["status"] for r in rows] == ["merged"] * 5
    assert len({n for r in rows for n in r["nodes"]}) == 3
    assert sorted({p for r in rows for p in r["partitions"]}) == [0, 1, 2]
    assert all(r["bytes_up"] < first["final"]["model_bytes"] / 2 for r in rows)
    assert first["final"]["model_sha256"] == second["final"]["model_sha256"]  # stock Flower: the same model
    # one node implementation: a plugin-style make_client_app trains the same model bit for bit
    plugin = {"task": "synthetic", "num-server-rounds": 5, "window": 1, "local-epochs": 2}
    assert _plugin_style_sha(loopback, nodes, tmp_path / "plugin", plugin) == first["final"]["model_sha256"]


@pytest.mark.skipif(not (BIN / "flwr").exists(), reason="flwr CLI not installed")
def test_flwr_run_uses_pyproject_config(tmp_path):
    env = {**ENV, "FLWR_HOME": str(tmp_path / "flwr-home"),  # own SuperLink, own ports
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    cmd = [str(BIN / "flwr"), "run", ".", "--stream",
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0",
           "--run-config", f"task='synthetic' num-server-rounds=3 out-dir='{tmp_path / 'out'}'"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    finally:
        # flwr run leaves its local SuperLink running: stop the one it started for us, by PID
        for pid in _pids_matching("flower-superlink", str(tmp_path / "flwr-home")):
            os.kill(pid, signal.SIGTERM)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "out" / "snake.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    assert result["config"]["window"] == 2  # the pyproject default reached the ServerApp


def _rounds_done(checkpoint: Path) -> int:
    """Hops a checkpoint holds (0 while there is none yet)."""
    import torch

    try:
        return json.loads(torch.load(checkpoint, weights_only=True)["state"])["strategy"]["rounds-done"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    for row in rows.splitlines():
        child, parent = map(int, row.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_run_killed_half_way_resumes_to_the_same_model(tmp_path):
    overrides = "task=synthetic num-server-rounds=12 window=1 local-epochs=2"
    whole = _simulate(tmp_path / "whole", overrides)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", "3",
           "--run-config", overrides, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _rounds_done(out / "snake.ckpt") < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, Ray included, with no chance to tidy up
    proc.wait()
    for pid in family:  # anything that left the session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = _rounds_done(out / "snake.ckpt")
    assert 5 <= killed_at < 12, f"the run was not stopped half-way (checkpoint at {killed_at})"
    assert not (out / "snake.json").exists()

    resumed = _simulate(out, overrides + " resume=true")
    assert resumed["resumed_at_round"] == killed_at
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 13))
    assert resumed["final"]["model_sha256"] == whole["final"]["model_sha256"]
    assert resumed["failures"] == []


@pytest.mark.skipif(stock_reason("ray-actors") is not None, reason=STOCK_FAULT)
def test_chaos_run_in_ray_records_failed_hops_and_the_node_that_left(tmp_path):
    result = _simulate(tmp_path, "task=synthetic num-server-rounds=10 window=1 fail-rate=0.3 "
                                 "leave-round=5 leave-partition=1 crash-round=3 hop-timeout=60")
    rows = result["rounds"]
    assert len(rows) == 10 and result["failures"]
    assert {f["round"] for f in result["failures"]} == {r["round"] for r in rows if r["status"] == "failed"}
    assert any("injected failure" in f["reason"] for f in result["failures"])
    # the process that died at hop 3 (crash-round) costs that hop alone: its actor is replaced,
    # and no later hop meets a dead one (runtime/flower_patches.py, patch_ray_actors)
    died = [f for f in result["failures"] if "injected failure" not in f["reason"]]
    assert [f["round"] for f in died] == [3] and "actor is dead" in died[0]["reason"], died
    assert [m["left"] != [] for m in result["membership"]] == [True]
    assert all(1 not in r["partitions"] for r in rows[5:])  # partition 1 is gone from hop 6 on
    assert result["final"]["accuracy"] > result["initial"]["accuracy"]
