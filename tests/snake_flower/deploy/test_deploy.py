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
from pathlib import Path

import pytest

from snake_flower.config import resolve
from snake_flower.deploy.certs import make_node_keys
from snake_flower.deploy.loopback import CONNECTION, LoopbackDeployment
from snake_flower.deploy.processes import ProcessFamily, alive
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


def _check_run(result: dict, rounds: int) -> None:
    rows = result["rounds"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert [r["status"] for r in rows] == ["merged"] * rounds and result["failures"] == []
    assert sorted(p for r in rows for p in r["partitions"]) == [0, 1, 2]  # each node once per cycle
    model_bytes = result["final"]["model_bytes"]
    assert all(r["bytes_down"] > 0 and 0 < r["bytes_up"] < model_bytes for r in rows)
    assert result["final"]["bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] + r["bytes_control"]
                                                 for r in rows)
    assert len(result["final"]["model_sha256"]) == 64
    assert result["config"]["min-nodes"] == 3  # the run-config override reached the ServerApp


def _in_process_sha(loopback, nodes, out: Path) -> str:
    """The same run with the ServerApp and ClientApps in this process."""
    config = resolve({**OVERRIDES, "out-dir": str(out)})
    three = nodes(3)
    run(loopback(list(three.contexts), three), config)
    return json.loads((out / "snake.json").read_text())["final"]["model_sha256"]


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


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
