"""A real Flower deployment on loopback: one SuperLink, N SuperNodes, runs by ``flwr run``.

Nothing here is simulated. ``LoopbackDeployment`` starts the same commands a user
would type (docs/deploy.md), each daemon on its own free loopback port and each
SuperNode with its own partition (``--node-config "partition-id=i num-partitions=N"``),
writes a SuperLink connection into a private ``FLWR_HOME/config.toml``, and submits
the app with ``flwr run . <connection> --stream``. With ``tls=True`` it makes a CA and
a server certificate (``deploy/certs.py``); with ``auth=True`` also one key pair per
SuperNode, registers each public key with ``flwr supernode register`` and turns on
``--enable-supernode-auth``. Nodes run ``snake-flower supernode`` (``deploy/supernode.py``)
unless ``launcher=False`` asks for stock ``flower-supernode``. Every process it starts is stopped by PID
(``processes.ProcessFamily``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from snake_flower.deploy.certs import NodeKeys, TlsFiles, make_node_keys, make_tls
from snake_flower.deploy.processes import ProcessFamily

ROOT = Path(__file__).resolve().parents[2]  # the Flower app: this project's pyproject.toml
BIN = Path(sys.executable).parent
CONNECTION = "loopback"
# Flower's own switches for unattended runs (the Makefile sets the same).
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


# Reading and partitioning Fashion-MNIST, several nodes at once on a busy 2-core machine: up to a minute
WARM_TIMEOUT_S = 300.0


class DeploymentError(RuntimeError):
    """A daemon did not come up, or a run did not finish; the message names the log."""


def free_port() -> int:
    """A loopback TCP port that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config_text(overrides: Mapping[str, Any]) -> str:
    """``--run-config`` text for ``overrides`` (TOML values: strings quoted, booleans lower-case)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f"'{v}'"
        return repr(v)
    return " ".join(f"{key}={value(v)}" for key, v in overrides.items())


class LoopbackDeployment:
    """``flower-superlink`` and ``num_nodes`` ``flower-supernode`` processes on 127.0.0.1.

    Parameters
    ----------
    workdir : Path
        Holds ``flwr-home/`` (``FLWR_HOME``), ``logs/``, ``certs/``, ``keys/``, ``out/``.
    num_nodes : int (default: 3)
        SuperNodes, one per partition.
    tls : bool (default: False)
        Serve the SuperLink over TLS with certificates made here; else ``--insecure``.
    auth : bool (default: False)
        SuperNode authentication: only nodes whose public key was registered may
        connect. Flower refuses it without TLS, and so does this class.
    app_dir : Path (default: this project)
        The Flower app that ``flwr run`` builds and submits.
    capacities : Sequence[Mapping[str, float]] (default: ())
        Per partition, capacities added to its ``--node-config`` (``compute``,
        ``memory-budget-mb``, ``link-mbps``); see ``snake_flower.training.capacity``.
    env : Mapping[str, str] | None (default: None)
        Extra environment variables for every process (e.g. ``OMP_NUM_THREADS``, or
        ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for the SuperExecs' task poll).
    timeout : float (default: 60.0)
        Seconds a daemon or a registration may take to respond.
    launcher : bool (default: True)
        Start each node with ``snake-flower supernode`` (a warm ClientApp launcher, no
        idle polls; ``deploy/supernode.py``); ``False`` starts stock ``flower-supernode``.
    poll_interval : float (default: 0.1)
        The launcher's ``--poll-interval``.
    data_dir : str | Path | None (default: None)
        Added to every node's ``--node-config`` as ``data-dir``: where a deployed node reads
        its training data (it wins over the run-config's ``data-dir``).
    in_memory : bool (default: False)
        Keep the SuperLink's state in memory (``flower-superlink``'s own default) instead of
        in ``<workdir>/superlink.db``: every message and object the hop moves is one SQLite
        transaction less.
    warm_config : Mapping[str, Any] | None (default: None)
        Launcher nodes only: the run-config whose data their forkservers preload
        (``snake-flower supernode --warm-config``); ``None``: the app's defaults.
    """

    def __init__(self, workdir: Path, num_nodes: int = 3, tls: bool = False, auth: bool = False,
                 app_dir: Path = ROOT, capacities: Sequence[Mapping[str, float]] = (),
                 env: Mapping[str, str] | None = None, timeout: float = 60.0, launcher: bool = True,
                 poll_interval: float = 0.1, in_memory: bool = False,
                 data_dir: str | Path | None = None, warm_config: Mapping[str, Any] | None = None) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it over --insecure)")
        # absolute: the daemons and the ServerApp resolve paths from their own working folders
        self.workdir, self.num_nodes, self.tls, self.auth = Path(workdir).resolve(), num_nodes, tls, auth
        self.app_dir, self.timeout = Path(app_dir).resolve(), timeout
        self.capacities = list(capacities)
        self.data_dir = str(Path(data_dir).resolve()) if data_dir is not None else None
        self.launcher, self.poll_interval, self.in_memory = launcher, poll_interval, in_memory
        self.warm_config = dict(warm_config or {})
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.flwr_home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.family = ProcessFamily(self.workdir / "logs", env=self.env)
        self.port = free_port()
        self.node_ports: dict[str, int] = {}
        self.certs: TlsFiles | None = None
        self.keys: dict[int, NodeKeys] = {}
        self.node_ids: dict[int, int] = {}  # partition -> Flower node id, once registered

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink, write the connection, register keys, start the SuperNodes."""
        if self.tls:
            self.certs = make_tls(self.workdir / "certs")
        self.family.start("superlink", self.superlink_command(), cwd=self.workdir)
        self._wait_for_port(self.port, "superlink")
        self.write_connection()
        for partition in range(self.num_nodes):
            if self.auth:
                self.keys[partition] = make_node_keys(self.workdir / "keys", f"node{partition}")
                self.node_ids[partition] = self.register(self.keys[partition].public_key)
            self.start_supernode(partition, self.keys.get(partition))
        if self.launcher:  # a node takes its first task warm, as a long-running one does
            for partition in range(self.num_nodes):
                self.wait_until_warm(f"supernode-{partition}")
        return self

    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line."""
        command = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]  # else every run re-installs torch
        if not self.in_memory:
            command += ["--database", str(self.workdir / "superlink.db")]
        if self.certs is None:
            return command + ["--insecure"]
        command += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                    "--ssl-keyfile", str(self.certs.server_key)]
        return command + (["--enable-supernode-auth"] if self.auth else [])

    def supernode_command(self, partition: int, keys: NodeKeys | None, port: int) -> list[str]:
        """The SuperNode command line of the node holding ``partition``: the launcher's or
        ``flower-supernode``'s (the same arguments)."""
        stated = self.capacities[partition] if partition < len(self.capacities) else {}
        node_config = " ".join([f"partition-id={partition} num-partitions={self.num_nodes}",
                                *(f"{key}={value}" for key, value in stated.items()),
                                *([f'data-dir="{self.data_dir}"'] if self.data_dir else [])])
        command = ([str(BIN / "snake-flower"), "supernode", "--poll-interval", str(self.poll_interval)]
                   if self.launcher else [str(BIN / "flower-supernode")])
        if self.launcher and self.warm_config:
            command += ["--warm-config", run_config_text(self.warm_config)]
        command += ["--superlink", self.address, "--port", str(port), "--node-config", node_config]
        command += ["--root-certificates", str(self.certs.ca_cert)] if self.certs else ["--insecure"]
        if keys is not None:
            command += ["--auth-supernode-private-key", str(keys.private_key)]
        return command

    def start_supernode(self, partition: int, keys: NodeKeys | None = None,
                        name: str | None = None) -> subprocess.Popen:
        """Start one SuperNode with its own Runtime API port; returns its process."""
        name = name or f"supernode-{partition}"
        self.node_ports[name] = port = free_port()
        return self.family.start(name, self.supernode_command(partition, keys, port), cwd=self.workdir)

    def wait_until_warm(self, name: str, timeout: float = WARM_TIMEOUT_S) -> None:
        """Wait until the launcher node ``name``'s forkserver has preloaded torch, the app and
        its data (its SuperExec prints ``warm_executor.READY``), or until the launcher said that
        stock Flower runs (``flower_patches.STOCK_RUNS``: patches off); fail if the node exits."""
        from snake_flower.deploy.warm_executor import READY
        from snake_flower.runtime.flower_patches import STOCK_RUNS

        deadline, proc, log = time.monotonic() + timeout, self.family.popens[name], self.family.log_path(name)
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if READY in text or STOCK_RUNS in text:
                return
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode} before its forkserver "
                                      f"was warm; see {log}")
            time.sleep(0.2)
        raise DeploymentError(f"{name}'s forkserver was not warm within {timeout:.0f} s; see {log}")

    def write_connection(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with this SuperLink as connection ``loopback``."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        if self.certs is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.certs.ca_cert}"')
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def register(self, public_key: Path) -> int:
        """``flwr supernode register <public_key> loopback``: admit the node with this key.

        Returns the node id the SuperLink gave it.
        """
        output = self._flwr("register", ["supernode", "register", str(public_key), CONNECTION])
        found = re.search(r"SuperNode (\d+) registered", output)
        if found is None:
            raise DeploymentError(f"flwr supernode register printed no node id; see "
                                  f"{self.workdir / 'logs'}/flwr-register.log")
        return int(found.group(1))

    def run(self, overrides: Mapping[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """``flwr run`` the app with these run-config overrides; returns its results JSON.

        ``out-dir`` defaults to ``<workdir>/out``; the result is ``<out-dir>/<strategy>.json``.
        """
        out = Path(overrides.get("out-dir", self.workdir / "out")).resolve()  # the ServerApp's cwd differs
        overrides = {**overrides, "out-dir": str(out)}
        result = out / f"{overrides.get('strategy', 'snake')}.json"
        before = result.stat().st_mtime_ns if result.exists() else None
        self._flwr("run", ["run", str(self.app_dir), CONNECTION, "--stream",
                           "--run-config", run_config_text(overrides)], timeout=timeout)
        if not result.exists() or result.stat().st_mtime_ns == before:  # not an earlier run's file
            raise DeploymentError(f"flwr run ended without writing {result}; see "
                                  f"{self.family.log_path('superlink')} and {self.workdir / 'logs'}/flwr-run.log")
        return json.loads(result.read_text())

    def stop(self) -> list[int]:
        """Stop every process started here and their descendants, by PID; returns the PIDs."""
        return [m.pid for m in self.family.stop()]

    def __enter__(self) -> LoopbackDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _flwr(self, name: str, args: list[str], timeout: float | None = None) -> str:
        """Run the ``flwr`` CLI to completion, its output appended to ``logs/flwr-<name>.log``.

        Returns what this call printed.
        """
        log, limit = self.workdir / "logs" / f"flwr-{name}.log", timeout or self.timeout
        with open(log, "ab") as out:
            offset = out.tell()
            proc = subprocess.Popen([str(BIN / "flwr"), *args], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, env=self.env)
        deadline = time.monotonic() + limit
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                self.family.trace()  # note the daemons' children (serverapp, clientapps) while they run
                time.sleep(0.5)
        finally:  # a timeout, Ctrl-C or any error: the CLI we started goes too
            timed_out = proc.poll() is None
            if timed_out:
                proc.kill()
                proc.wait()
        if timed_out:
            raise DeploymentError(f"flwr {args[0]} did not finish in {limit:.0f} s; see {log}")
        code = proc.returncode
        if code != 0:
            raise DeploymentError(f"flwr {' '.join(args[:2])} failed with exit code {code}; see {log}")
        with open(log, "rb") as out:
            out.seek(offset)
            return out.read().decode(errors="replace")

    def _wait_for_port(self, port: int, name: str) -> None:
        """Wait until ``name`` accepts connections on ``port``; fail if it exits or stalls."""
        deadline, proc = time.monotonic() + self.timeout, self.family.popens[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode} before listening on "
                                      f"port {port}; see {self.family.log_path(name)}")
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"{name} did not listen on port {port} within {self.timeout:.0f} s; "
                              f"see {self.family.log_path(name)}")
