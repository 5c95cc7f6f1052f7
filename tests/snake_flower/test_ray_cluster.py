"""A real two-node Ray cluster on this machine: ``snake-flower run --ray-address`` attaches to it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_simulation import ENV, ROOT

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")


def _start_cluster():
    """A head and a worker node, one CPU each, on this machine; stopped through its handle
    (never ``ray stop``, which ends every Ray process on the machine by name).

    Ray's own choice of this machine's address, as every local simulation here uses: a driver
    does not attach to a cluster bound to 127.0.0.1 with Ray 2.55 (it waits on the GCS forever).
    """
    cluster = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cluster.add_node(num_cpus=1, num_gpus=0)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _run(out, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", "3",
                           "--run-config", "task=synthetic num-server-rounds=4 window=1 local-steps=5",
                           "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "snake.json").read_text())


def test_a_run_on_a_two_node_ray_cluster_gives_the_in_process_model(tmp_path):
    import ray

    alone = _run(tmp_path / "alone")
    cluster = _start_cluster()
    try:
        assert len(cluster.list_all_nodes()) == 2
        logs = Path(cluster.head_node.get_logs_dir_path())
        assert not list(logs.glob("python-core-driver-*"))  # no driver has attached yet
        on_cluster = _run(tmp_path / "cluster", "--ray-address", cluster.address)
        assert list(logs.glob("python-core-driver-*")), "the run never attached to the cluster"
        assert list(logs.glob("python-core-worker-*")), "no ClientApp ran on the cluster"
    finally:
        cluster.shutdown()
    assert not ray.is_initialized()  # the run attached in its own process and let go
    assert [r["status"] for r in on_cluster["rounds"]] == ["merged"] * 4
    assert on_cluster["final"]["model_sha256"] == alone["final"]["model_sha256"]
