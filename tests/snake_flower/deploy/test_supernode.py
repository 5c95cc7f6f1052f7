"""``snake-flower supernode``: arguments pass through to Flower, bad ones stop it in one line.

The launcher running for real (a forked ClientApp training hops, TLS and SuperNode
authentication) is in ``test_deploy.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from snake_flower import cli
from snake_flower.deploy import supernode
from snake_flower.deploy.loopback import DeploymentError, LoopbackDeployment
from snake_flower.deploy.processes import alive
from snake_flower.deploy.warm_executor import READY, TASK_WAIT_ENV, WAKEUP_FD_ENV, ForkExecutor, clientapp_argv
from snake_flower.runtime import flower_patches
from snake_flower.runtime.flower_patches import FAKE_VERSION_ENV, STOCK_ENV, STOCK_RUNS

flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module, not its function
NODE = ["--superlink", "10.0.0.1:9200", "--port", "9301", "--node-config", "partition-id=1 num-partitions=3"]


@pytest.fixture
def no_supernode(monkeypatch):
    """Record what Flower's SuperNode would have been started with, instead of starting it."""
    calls = []
    monkeypatch.delenv(STOCK_ENV, raising=False)
    monkeypatch.delenv(FAKE_VERSION_ENV, raising=False)
    flower_patches.reset_checks()
    for patch in ("supernode-sleeps", "object-pulls", "executor"):  # checked before the stand-ins go in
        flower_patches.check(patch)
    monkeypatch.setattr(flower_supernode, "flower_supernode", lambda: calls.append(list(sys.argv)))
    monkeypatch.setattr(supernode, "patch_supernode_sleeps",
                        lambda cap, wake: calls.append(["sleeps", cap]) or calls.append(["wake", wake]))
    monkeypatch.setattr(supernode, "patch_object_pulls", lambda: calls.append(["pulls"]))
    monkeypatch.setattr(supernode.threading, "Thread", lambda **kw: calls.append(["superexec", *kw["args"]])
                        or type("T", (), {"start": lambda self: None})())
    yield calls
    flower_patches.reset_checks()


def test_every_flower_argument_passes_through_with_process_isolation(no_supernode):
    args = [*NODE, "--insecure", "--max-retries", "3"]
    assert cli.main(["supernode", "--poll-interval", "0.05", *args]) == 0
    superexec, sleeps, (_, wake), pulls, flower = no_supernode
    assert flower == ["flower-supernode", *args, "--isolation", "process"]
    assert sleeps == ["sleeps", 0.05] and pulls == ["pulls"]
    command, env, address, pass_fds = superexec[1:]
    assert address == "127.0.0.1:9301"  # Flower's default host binds every address; the SuperExec dials loopback
    assert command[1:4] == ["-m", "snake_flower.deploy.warm_executor", "--insecure"]
    assert command[command.index("--runtime-api-address") + 1] == address
    # Flower's loop at its shortest; the executor waits for the SuperNode's wake-up, or --poll-interval
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.01" and env[TASK_WAIT_ENV] == "0.05"
    assert pass_fds == (int(env[WAKEUP_FD_ENV]),)
    wake()  # what the SuperNode does once it stored a message: the SuperExec's end can read it
    assert os.read(pass_fds[0], 16) == b"!"
    assert json.loads(env["SNAKE_FLOWER_WARM"]) == {"run-config": "", "partition-id": 1, "num-partitions": 3}


def test_a_tls_runtime_api_and_superexec_auth_reach_the_superexec(no_supernode):
    tls = ["--ssl-certfile", "/c/node.pem", "--ssl-keyfile", "/c/node.key", "--ssl-ca-certfile", "/c/ca.crt",
           "--superexec-auth-secret-file", "/c/secret", "--root-certificates", "/c/link-ca.crt",
           "--auth-supernode-private-key", "/k/node0"]
    flower = supernode._flower_args([*NODE, *tls])
    command = supernode.superexec_command(flower, parent_pid=4321)
    assert "--insecure" not in command
    assert command[command.index("--root-certificates") + 1] == "/c/ca.crt"
    assert command[command.index("--superexec-auth-secret-file") + 1] == "/c/secret"
    assert command[command.index("--parent-pid") + 1] == "4321"


@pytest.mark.parametrize("args, why", [
    (["--isolation", "subprocess"], "--isolation"),
    (["--poll-interval", "5"], "--poll-interval: 5 is outside"),
    (["--warm-config", "window=="], "--warm-config: window"),
])
def test_bad_launcher_arguments_are_one_line_errors(no_supernode, capsys, args, why):
    assert supernode.main([*args, *NODE, "--insecure"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("snake-flower supernode: error:") and why in printed and "\n" not in printed
    assert no_supernode == []  # nothing started, nothing patched


@pytest.mark.parametrize("node_config, why", [
    ("partition-id=3 num-partitions=3", "partition-id 3 must be below num-partitions 3"),
    ("partition-id=0 num-partitions=3 data-dir='/no/such/dir'", "data-dir '/no/such/dir' is not a directory"),
    ("partition-id=0 num-partitions=3 compute=0", "compute must be > 0"),
    ("partition-id=x", "--node-config:"),  # not TOML: Flower's own parser says why
    ("/no/such/node.toml", "--node-config:"),
])
def test_a_bad_node_config_stops_the_launcher_in_one_line(no_supernode, capsys, node_config, why):
    assert supernode.main(["--node-config", node_config, "--insecure"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("snake-flower supernode: error: --node-config:") and why in printed
    assert "\n" not in printed and no_supernode == []


LIGHT = """
import sys
from snake_flower import cli  # the console script's module, as `snake-flower supernode` starts
from snake_flower.deploy import supernode
assert supernode._node_config_error("partition-id=1 num-partitions=3 compute=0.5 memory-budget-mb=900") is None
assert supernode._node_config_error("partition-id=1 num-partitions=3 compute=0").startswith("--node-config: compute")
assert supernode.warm_config_error("task='llm' model='tiny-opt' window=1") is None  # checked in a child
assert supernode.warm_config_error("window=99").startswith("window")
print(sorted(m for m in ("torch", "datasets", "transformers") if m in sys.modules))
"""


def test_the_supernode_process_itself_checks_its_node_config_without_torch():
    # the launcher's own process runs Flower's SuperNode: it holds Flower, not the training stack
    done = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_an_unchecked_flwr_version_runs_stock_flower_supernode_after_one_warning(no_supernode, monkeypatch,
                                                                                 caplog):
    monkeypatch.setenv(FAKE_VERSION_ENV, "1.43.0")
    assert cli.main(["supernode", *NODE, "--insecure"]) == 0  # it starts: Flower's own node, no patch
    assert no_supernode == [["flower-supernode", *NODE, "--insecure"]]  # no sleeps, pulls or warm SuperExec
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [flower_patches.degraded("flwr 1.43.0 is not a version snake_flower's Flower patches "
                                                "were checked against (1.41.0, 1.42.0)")]


def test_asking_for_stock_flower_runs_flower_supernode_with_a_note(no_supernode, monkeypatch, caplog, capsys):
    monkeypatch.setenv(STOCK_ENV, "1")
    monkeypatch.setenv(FAKE_VERSION_ENV, "1.43.0")  # any version
    assert supernode.main([*NODE, "--insecure"]) == 0
    assert no_supernode == [["flower-supernode", *NODE, "--insecure"]]
    assert capsys.readouterr().err == (f"snake-flower supernode: {STOCK_ENV}=1: {STOCK_RUNS} "
                                       "(flower-supernode, no patch)\n")  # what wait_until_warm waits for
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_stock_runs_flower_supernode_unpatched(no_supernode, monkeypatch):
    monkeypatch.setattr(flower_patches, "flwr_version", lambda: "1.43.0")  # any version
    assert supernode.main(["--stock", *NODE, "--insecure"]) == 0
    assert no_supernode == [["flower-supernode", *NODE, "--insecure"]]
    assert STOCK_ENV not in os.environ  # stock Flower's processes import none of our patches


@pytest.mark.parametrize("insecure, certificates, parent", [(True, None, 77), (False, "/c/ca.crt", None),
                                                            (False, None, 5)])
def test_a_forked_clientapp_gets_the_arguments_flowers_executor_gives_it(monkeypatch, insecure,
                                                                        certificates, parent):
    started = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **kw: started.append(args))
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9301", token="t0k",
                         insecure=insecure, root_certificates_path=certificates,
                         runtime_dependency_install=False, parent_pid=parent, suppress_output=False, task_id=3)
    subprocess_executor.SubprocessExecutor().launch(spec)
    assert clientapp_argv(spec) == started[0]


def test_a_loopback_deployment_waits_for_a_warm_node_and_fails_on_one_that_exits(tmp_path):
    deployment = LoopbackDeployment(tmp_path)
    with deployment.family:
        deployment.family.start("supernode-0", [sys.executable, "-c", "import sys, time; "
                                                f"print({READY!r}, file=sys.stderr, flush=True); time.sleep(30)"])
        deployment.wait_until_warm("supernode-0", timeout=60)
        deployment.family.start("supernode-1", [sys.executable, "-c", "raise SystemExit(3)"])
        with pytest.raises(DeploymentError, match="supernode-1 exited with code 3 before its forkserver"):
            deployment.wait_until_warm("supernode-1", timeout=60)
    assert not [m for m in deployment.family.seen.values() if alive(m)]


def test_a_loopback_superlink_keeps_its_state_in_a_file_or_in_memory(tmp_path):
    assert "--database" in LoopbackDeployment(tmp_path).superlink_command()
    assert "--database" not in LoopbackDeployment(tmp_path, in_memory=True).superlink_command()  # Flower's default


def test_the_superexec_asks_for_a_task_as_soon_as_the_supernode_wakes_it():
    """Between two asks ``reconcile`` waits for the pipe, at most ``wait`` seconds: no poll delay
    when the SuperNode stored a message, and an idle node asks every ``wait`` seconds."""
    read, wake = supernode.task_wakeup()
    executor = ForkExecutor(wakeup_fd=read, wait=2.0)
    os.set_blocking(read, False)
    wake()
    wake()  # two wake-ups before one ask: one ask serves both
    started = time.monotonic()
    executor.reconcile()
    assert time.monotonic() - started < 1.0
    idle = ForkExecutor(wakeup_fd=read, wait=0.05)
    started = time.monotonic()
    idle.reconcile()  # nothing written since: it waits its longest, and no more
    assert 0.04 <= time.monotonic() - started < 1.0
