"""The examples run from their folders: (a) with ``flwr run .``, (c) with ``snake-flower compare``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
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


def _superlinks(home: Path) -> set[int]:
    """PIDs of the flower-superlink that ``flwr run`` left running for FLWR_HOME ``home``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "flower-superlink" in cmd and str(home) in cmd:
                found.add(int(entry.name))
    return found


@pytest.mark.skipif(not (BIN / "flwr").exists(), reason="flwr CLI not installed")
def test_own_model_example_runs_snake_and_fedavg_with_flwr_run(tmp_path):
    home = tmp_path / "flwr-home"
    env = {**ENV, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    out = tmp_path / "curves.json"
    cmd = [str(BIN / "flwr"), "run", ".", "--stream",
           "--federation-config", "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0",
           "--run-config", f"dataset='synthetic' num-server-rounds=6 local-steps=10 out-file='{out}'"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=EXAMPLES / "own-model", env=env)
    finally:
        for pid in _superlinks(home):  # flwr run leaves its local SuperLink running: stop ours, by PID
            os.kill(pid, signal.SIGTERM)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    curves = json.loads(out.read_text())
    assert curves["snake"]["status"] == ["merged"] * 6  # every hop merged
    for name in ("snake", "fedavg"):
        assert curves[name]["visits"][-1] == 6  # the same node visits each
        assert curves[name]["loss"][-1] < curves[name]["loss"][0], (name, curves[name]["loss"])


def test_task_plugin_example_runs_through_compare(tmp_path):
    cmd = [str(BIN / "snake-flower"), "compare", "--config", "compare.toml", "--strategies", "snake,fedavg",
           "--num-supernodes", "2", "--out", str(tmp_path),
           "--run-config", "task=task_plugin.task:make_synthetic_task num-server-rounds=4 local-steps=10 "
                           "eval-every=2 eval-samples=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=EXAMPLES / "task-plugin", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"snake", "fedavg"}
    snake = json.loads((tmp_path / "snake.json").read_text())
    assert snake["task"] == "task_plugin.task:make_synthetic_task"
    assert [row["status"] for row in snake["rounds"]] == ["merged"] * 4
    assert any("." in name for row in snake["rounds"] for name in row["window"])  # nested segments
