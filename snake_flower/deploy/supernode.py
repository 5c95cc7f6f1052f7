"""``snake-flower supernode [flower-supernode args]``: Flower's SuperNode, without the waits.

A launcher for edge nodes (Linux). This process becomes Flower's own SuperNode
(``flower_supernode``, every argument passed through: TLS, SuperNode authentication,
``--node-config``, ...) with ``--isolation process``, and next to it starts a warm
SuperExec (``deploy/warm_executor.py``) that forks each ClientApp task from a forkserver
which already imported torch and the app and read the node's data. Before the SuperNode
starts, its idle poll of the SuperLink (3 s) is capped at ``--poll-interval``, its waits for a
ClientApp's reply (0.5 s, looks at its own memory) at 5 ms, and the object-pull back-off runs
from 0.02 to 0.05 s instead of from 1 to 10 s (``runtime/flower_patches.py``). The SuperExec
asks for a task as soon as the SuperNode has stored a message (the SuperNode writes to a pipe
the SuperExec waits on, ``task_wakeup``), and otherwise every ``--poll-interval``.

The patches hold only for the flwr versions in ``runtime/flower_fingerprints.py``. With any
other (or a changed patched function) the launcher logs one warning line and runs stock
``flower-supernode`` with the same arguments, as ``--stock`` and ``SNAKE_FLOWER_STOCK_FLOWER=1``
do: the warm SuperExec reaches Flower only through a patch (``patch_executor``), so its
forkserver and preloading go with the patches.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from snake_flower.deploy.warm_executor import TASK_WAIT_ENV, WAKEUP_FD_ENV
from snake_flower.runtime.flower_patches import (
    STOCK_ENV,
    STOCK_RUNS,
    patch_object_pulls,
    patch_supernode_sleeps,
    patches_on,
    stock_flower,
)

POLL_RANGE = (0.01, 3.0)  # Flower's own SuperExec poll accepts 0.01-60 s; the SuperNode's idle poll is 3 s
SUPEREXEC_START_TIMEOUT_S = 120.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snake-flower supernode",
        description="Flower's SuperNode for an edge node: forked ClientApps from a warm forkserver, no idle polls.",
        epilog="Every other argument goes to flower-supernode (see flower-supernode --help).")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="longest wait, in seconds, of the SuperNode's idle poll of the SuperLink and "
                             "of its SuperExec's task poll (default 0.1); it waits for a ClientApp's "
                             "reply at most 5 ms at a time")
    parser.add_argument("--warm-config", default="",
                        help="run-config whose data the node preloads, e.g. \"partitioner='iid'\" "
                             "(default: the app's defaults)")
    parser.add_argument("--stock", action="store_true",
                        help="run stock flower-supernode with the other arguments, no patch")
    return parser


def _flower_args(flower_argv: Sequence[str]) -> argparse.Namespace:
    """``flower-supernode``'s own parsing of its arguments (its usage error on bad ones)."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    parser.prog = "snake-flower supernode"
    return parser.parse_args(list(flower_argv))


def runtime_address(flower: argparse.Namespace) -> str:
    """Where the SuperNode serves its Runtime API, as its SuperExec reaches it."""
    from flwr.supercore.address import resolve_bind_address

    host = f"[{flower.host}]" if ":" in flower.host else flower.host
    return resolve_bind_address(f"{host}:{flower.port}")


def superexec_command(flower: argparse.Namespace, parent_pid: int) -> list[str]:
    """The warm SuperExec's command: what Flower's SuperNode gives ``flower-superexec``."""
    from flwr.supercore.tls import get_client_tls_args

    tls = flower.ssl_certfile is not None and flower.ssl_keyfile is not None
    command = [sys.executable, "-m", "snake_flower.deploy.warm_executor",
               *get_client_tls_args(insecure=not tls, root_certificates_path=flower.ssl_ca_certfile if tls
                                    else None),
               "--runtime-api-address", runtime_address(flower), "--parent-pid", str(parent_pid)]
    if flower.superexec_auth_secret_file is not None:
        command += ["--superexec-auth-secret-file", flower.superexec_auth_secret_file]
    if flower.runtime_dependency_install:
        command.append("--allow-runtime-dependency-installation")
    return command


def warm_spec(flower: argparse.Namespace, warm_config: str) -> str | None:
    """``SNAKE_FLOWER_WARM`` for the forkserver: the run-config and this node's partition."""
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([flower.node_config] if flower.node_config else None)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        return None
    spec = {"run-config": warm_config, "partition-id": int(node_config["partition-id"]),
            "num-partitions": int(node_config["num-partitions"])}
    if node_config.get("data-dir"):  # the node's own data, which its tasks read (not the run-config's)
        spec["data-dir"] = str(node_config["data-dir"])
    return json.dumps(spec)


_CHECK_WARM = """
import sys
from snake_flower.config import ConfigError, parse_overrides, resolve
try:
    resolve(parse_overrides(sys.argv[1]))
except ConfigError as err:
    print(err)
    sys.exit(2)
"""


def warm_config_error(text: str) -> str | None:
    """What is wrong with a ``--warm-config`` (one line), or ``None``.

    Checked in a child process: the check reads the task's segments (torch, and transformers
    for an LLM), which this process, Flower's SuperNode for the node's whole life, never needs.
    """
    if not text.strip():
        return None  # the app's defaults
    done = subprocess.run([sys.executable, "-c", _CHECK_WARM, text], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return done.stdout.strip() or (done.stderr.strip().splitlines() or ["the check failed"])[-1]


def _node_config_error(text: str | None) -> str | None:
    """What is wrong with a ``--node-config`` (one line, naming the key), or ``None``."""
    import click
    from flwr.common.config import parse_config_args

    try:
        from snake_flower.node_settings import node_settings  # torch: not in the SuperNode's own process

        settings = node_settings(parse_config_args([text] if text else None))
        settings.data_dir_or("")  # a node's own data-dir must exist when the node starts
    except (ValueError, OSError, click.ClickException) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        message = " ".join(message.split())
        return f"--{message}" if message.startswith("node-config:") else f"--node-config: {message}"
    return None


def task_wakeup() -> tuple[int, Callable[[], None]]:
    """A pipe from the SuperNode to its SuperExec: its read end, and what wakes the SuperExec.

    The SuperNode calls the second once it stored a message and made its task
    (``flower_patches.CappedTime``); the SuperExec, which inherits the read end, then asks for
    the task at once instead of at its next poll. A full pipe or a gone SuperExec is ignored:
    the SuperExec still polls every ``--poll-interval``.
    """
    read, write = os.pipe()
    os.set_blocking(write, False)

    def wake() -> None:
        try:
            os.write(write, b"!")
        except OSError:  # full (it is woken already) or closed (the SuperExec is gone)
            pass
    return read, wake


def _start_superexec_when_listening(command: list[str], env: dict[str, str], address: str,
                                    pass_fds: Sequence[int] = ()) -> None:
    """Start the SuperExec once the SuperNode's Runtime API accepts connections (as Flower does);
    it inherits ``pass_fds``."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + SUPEREXEC_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                break
        except OSError:
            time.sleep(0.05)
    subprocess.Popen(command, env=env, pass_fds=tuple(pass_fds))  # noqa: S603 - our own interpreter and module


def main(argv: Sequence[str]) -> int:
    """Run the launcher; returns an exit code (2: bad arguments).

    With ``--stock``, ``SNAKE_FLOWER_STOCK_FLOWER=1`` or a flwr the patches were not checked
    against (after one warning line), Flower's own SuperNode runs with the other arguments.
    """
    args, flower_argv = _parser().parse_known_args(list(argv))
    if args.stock:  # Flower's own SuperNode, SuperExec and flwr-clientapp: nothing of ours runs in them
        return _run_stock(flower_argv, "--stock")
    if any(arg == "--isolation" or arg.startswith("--isolation=") for arg in flower_argv):
        print("snake-flower supernode: error: --isolation: the launcher runs its own SuperExec "
              "(isolation process); drop it, or add --stock", file=sys.stderr)
        return 2
    if not POLL_RANGE[0] <= args.poll_interval <= POLL_RANGE[1]:
        print(f"snake-flower supernode: error: --poll-interval: {args.poll_interval:g} is outside "
              f"{POLL_RANGE[0]:g}-{POLL_RANGE[1]:g} s", file=sys.stderr)
        return 2
    if (error := warm_config_error(args.warm_config)) is not None:
        print(f"snake-flower supernode: error: --warm-config: {error}", file=sys.stderr)
        return 2
    if stock_flower():
        return _run_stock(flower_argv, f"{STOCK_ENV}=1")
    if not patches_on("supernode-sleeps", "object-pulls", "executor"):  # it warned, in one line
        return _run_flower_supernode(flower_argv)  # (its argument parser is a patched function too)
    flower = _flower_args(flower_argv)
    if (error := _node_config_error(flower.node_config)) is not None:  # it would fail every hop
        print(f"snake-flower supernode: error: {error}", file=sys.stderr)
        return 2
    wake_read, wake = task_wakeup()
    # Flower's own task poll at its shortest: the SuperExec waits in its executor instead, until
    # woken (a message stored) or for at most --poll-interval (deploy/warm_executor.py)
    env = {**os.environ, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(POLL_RANGE[0]),
           WAKEUP_FD_ENV: str(wake_read), TASK_WAIT_ENV: str(args.poll_interval)}
    if (spec := warm_spec(flower, args.warm_config)) is not None:
        env["SNAKE_FLOWER_WARM"] = spec
    command = superexec_command(flower, os.getpid())
    threading.Thread(target=_start_superexec_when_listening,
                     args=(command, env, runtime_address(flower), (wake_read,)),
                     name="start-warm-superexec", daemon=True).start()
    patch_supernode_sleeps(args.poll_interval, wake=wake)
    patch_object_pulls()
    return _run_flower_supernode([*flower_argv, "--isolation", "process"])


def _run_stock(flower_argv: Sequence[str], why: str) -> int:
    """Flower's own SuperNode, after one line that says so (``why``: who asked)."""
    print(f"snake-flower supernode: {why}: {STOCK_RUNS} (flower-supernode, no patch)", file=sys.stderr, flush=True)
    return _run_flower_supernode(flower_argv)


def _run_flower_supernode(flower_argv: Sequence[str]) -> int:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_argv]
    flower_supernode()
    return 0
