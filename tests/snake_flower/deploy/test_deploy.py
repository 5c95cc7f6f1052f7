"""A real deployment on loopback: flower-superlink, three SuperNodes, ``flwr run .``.

The commands are those of docs/deploy.md. The SuperNodes run the launcher,
``snake-flower supernode``: every hop is trained by a ClientApp forked from a warm
forkserver. Each test checks the results the ServerApp wrote and that every process the
deployment started, and every child of those it traced (SuperExecs, forkservers and their
forked ClientApps included), is gone afterwards.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from snake_flower.config import resolve
from snake_flower.deploy.certs import make_node_keys
from snake_flower.deploy.loopback import CONNECTION, LoopbackDeployment
from snake_flower.deploy.processes import ProcessFamily, alive
from snake_flower.runtime.flower_patches import FAKE_VERSION_ENV, STOCK_ENV, STOCK_RUNS, stock_reason
from snake_flower.server_app import run

pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(not (Path(sys.executable).parent / "flower-superlink").exists(),
                                 reason="Flower's CLI is not installed in this environment")]

# A small run: three hops of a few steps each, so the test measures the deployment, not training.
OVERRIDES = {"task": "synthetic", "num-server-rounds": 3, "window": 1, "local-steps": 5,
             "eval-samples": 200, "min-nodes": 3, "hop-timeout": 120.0}
# One torch thread in every ClientApp, as in this test process (tests/conftest.py), so that
# the deployed run and the in-process one compute bit for bit the same.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# A flwr version nobody checked (runtime/flower_patches.py): every patch off, stock Flower, one warning
UNCHECKED = {FAKE_VERSION_ENV: "1.99.0", STOCK_ENV: ""}
WARNED = "snake_flower: flwr 1.99.0 is not a version snake_flower's Flower patches were checked against"


def _check_run(result: dict, rounds: int, num_nodes: int = 3) -> None:
    rows = result["rounds"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert [r["status"] for r in rows] == ["merged"] * rounds and result["failures"] == []
    assert sorted(p for r in rows for p in r["partitions"]) == list(range(num_nodes))  # each node once per cycle
    model_bytes = result["final"]["model_bytes"]
    assert all(r["bytes_down"] > 0 and 0 < r["bytes_up"] < model_bytes for r in rows)
    assert result["final"]["bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] + r["bytes_control"]
                                                 for r in rows)
    assert len(result["final"]["model_sha256"]) == 64
    assert result["config"]["min-nodes"] == num_nodes  # the run-config override reached the ServerApp


def _in_process_sha(loopback, nodes, out: Path, overrides: dict = OVERRIDES, num_nodes: int = 3) -> str:
    """The same run with the ServerApp and ClientApps in this process."""
    config = resolve({**overrides, "out-dir": str(out)})
    in_process = nodes(num_nodes)
    run(loopback(list(in_process.contexts), in_process), config)
    return json.loads((out / "snake.json").read_text())["final"]["model_sha256"]


def _environment(pid: int) -> dict[str, str] | None:
    """``pid``'s environment (None if it is gone or not ours)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return dict(item.partition("=")[::2] for item in raw if item)


class WatchEnvironments:
    """While it runs, every process of ``flwr_home``'s deployment (its environment names that
    ``FLWR_HOME``), however short-lived: its command line and the ``UNCHECKED`` variables it got."""

    def __init__(self, flwr_home: Path) -> None:
        self.flwr_home = str(flwr_home)
        self.seen: dict[int, tuple[str, dict[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> WatchEnvironments:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                env = _environment(pid)
                if env is not None and env.get("FLWR_HOME") == self.flwr_home and (cmd := _command_line(pid)):
                    self.seen[pid] = (cmd, {name: env[name] for name in UNCHECKED if name in env})


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(stock_reason("supernode-sleeps", "object-pulls", "executor") is not None,
                    reason=f"stock Flower here ({stock_reason('executor')}): the launcher then runs "
                           "flower-supernode, with no warm SuperExec or forkserver to check")
def test_plain_deployment_trains_in_forked_clientapps_and_stops_every_process(tmp_path, loopback, nodes):
    # each node's own data-dir in its --node-config (checked by the node: it must exist)
    deployment = LoopbackDeployment(tmp_path / "deploy", num_nodes=3, env=ONE_THREAD, data_dir=tmp_path)
    with deployment:
        result = deployment.run(OVERRIDES, timeout=420)  # a hung ClientApp would fail the hop, then this
        running = deployment.family.members()
        commands = {m.pid: (m.root, _command_line(m.pid)) for m in running}
    roots = {m.root for m in running}
    assert roots == {"superlink", "supernode-0", "supernode-1", "supernode-2"}
    assert len(running) >= 10  # each daemon and its SuperExec, and each node's forkserver
    launchers = [cmd for _, cmd in commands.values() if "snake-flower supernode" in cmd]
    superexecs = [cmd for _, cmd in commands.values() if "snake_flower.deploy.warm_executor" in cmd]
    forkservers = [cmd for _, cmd in commands.values() if "multiprocessing.forkserver" in cmd]
    assert len(launchers) == len(superexecs) == 3 and len(forkservers) >= 3  # (a late task looks alike)
    # the SuperNodes' only SuperExecs are the warm ones, which fork every ClientApp task
    assert not [cmd for root, cmd in commands.values() if root != "superlink" and "flower-superexec" in cmd]
    assert not [m for m in running if alive(m)]
    assert not [m for m in deployment.family.seen.values() if alive(m)]

    _check_run(result, 3)
    assert result["final"]["model_sha256"] == _in_process_sha(loopback, nodes, tmp_path / "ref")
    assert all(0 < row["train_s"] < row["hop_s"] for row in result["rounds"])  # each hop trained on a node
    config_toml = (deployment.flwr_home / "config.toml").read_text()
    assert f"[superlink.{CONNECTION}]" in config_toml and "insecure = true" in config_toml


def test_an_unchecked_flwr_runs_a_stock_deployment_to_the_same_model_after_one_warning(tmp_path, loopback,
                                                                                      nodes):
    overrides = {**OVERRIDES, "num-server-rounds": 2, "min-nodes": 2}  # two hops, one on each node
    deployment = LoopbackDeployment(tmp_path / "deploy", num_nodes=2, in_memory=True,  # Flower's own knob below
                                    env={**ONE_THREAD, **UNCHECKED, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"})
    with WatchEnvironments(deployment.flwr_home) as watch, deployment:  # the launcher still starts each node:
        result = deployment.run(overrides, timeout=420)  # Flower's own SuperNode; the ServerApp does not raise
        running = deployment.family.members()
    assert not [m for m in running if alive(m)]

    _check_run(result, 2, num_nodes=2)
    assert result["config"]["fast-poll"] is True
    assert result["final"]["model_sha256"] == _in_process_sha(loopback, nodes, tmp_path / "ref", overrides, 2)
    # the fake version reached every process the deployment started, the short-lived ones too
    commands = [cmd for cmd, _ in watch.seen.values()]
    assert [cmd for cmd, got in watch.seen.values() if got != UNCHECKED] == []
    for name in ("flower-superlink", "snake-flower supernode", "flwr-serverapp", "flwr-clientapp"):
        assert any(name in cmd for cmd in commands), name
    assert len({m.pid for m in running} & set(watch.seen)) == len(running)  # the watch saw every member
    assert len([m for m in running if "flower-superexec" in watch.seen[m.pid][0]]) == 3  # Flower's own, each
    assert not [cmd for cmd in commands if "warm_executor" in cmd or "multiprocessing.forkserver" in cmd]
    for log in ["supernode-0.log", "supernode-1.log", "flwr-run.log"]:  # each launcher, and the ServerApp
        lines = [line for line in (deployment.workdir / "logs" / log).read_text().splitlines()
                 if "snake_flower:" in line]
        assert len(lines) == 1 and WARNED in lines[0] and STOCK_RUNS in lines[0], (log, lines)


def test_tls_deployment_with_supernode_auth_refuses_an_unregistered_node(tmp_path):
    # each node states its capacities in its --node-config; order=capacity visits the fastest first
    stated = [{"compute": 0.5, "link-mbps": 40.0}, {"compute": 1.0, "link-mbps": 20.0},
              {"compute": 2.0, "link-mbps": 10.0}]
    deployment = LoopbackDeployment(tmp_path / "deploy", num_nodes=3, tls=True, auth=True, env=ONE_THREAD,
                                    capacities=stated)
    with deployment:
        stranger = deployment.start_supernode(0, make_node_keys(deployment.workdir / "keys", "stranger"),
                                              name="stranger")
        result = deployment.run({**OVERRIDES, "order": "capacity"}, timeout=420)
        stranger.wait(timeout=120)
        running = deployment.family.members()
    assert not [m for m in running if alive(m)]

    _check_run(result, 3)
    assert [r["partitions"][0] for r in result["rounds"]] == [2, 1, 0]
    for row in result["rounds"]:
        assert {k: row["capacity"][k] for k in ("compute", "link-mbps")} == stated[row["partitions"][0]]
    assert {n for r in result["rounds"] for n in r["nodes"]} == set(deployment.node_ids.values())
    assert stranger.returncode == 1
    assert "Exit Code: 305" in deployment.family.log_path("stranger").read_text()  # failed to activate
    superlink = deployment.superlink_command()
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    config_toml = (deployment.flwr_home / "config.toml").read_text()
    assert "root-certificates" in config_toml and "insecure" not in config_toml


def test_supernode_auth_without_tls_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs TLS"):
        LoopbackDeployment(tmp_path, auth=True)
    # ... and by Flower itself: the SuperLink will not start
    deployment = LoopbackDeployment(tmp_path)
    with ProcessFamily(tmp_path / "logs", env=deployment.env) as family:
        superlink = family.start("superlink", [*deployment.superlink_command(), "--enable-supernode-auth"])
        assert superlink.wait(timeout=60) == 1
    assert "Exit Code: 104" in family.log_path("superlink").read_text()
