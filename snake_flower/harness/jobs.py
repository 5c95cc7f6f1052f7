"""Run a comparison's strategies side by side, each in its own process and Ray simulation.

Split learning makes one round trip per mini-batch, so it spends most of its time
waiting on messages, not computing; Snake and FedAvg are bound by compute. Running
them at once overlaps that waiting with their work. Each child is the same
``snake-flower run`` a user would type for that strategy (same config file, same
overrides plus ``strategy=...``), so a parallel comparison is the sequential one with
the waiting overlapped. Each child's output goes to ``<out>/<strategy>.log``.

Scheduling: at most ``jobs`` children run at once, latency-bound strategies
(``LATENCY_BOUND``) start first and keep normal priority; the others get a ``nice``
increment, so that when the cores are contended the split run gets them first.
Wall times of runs made side by side include waiting for the CPU; the report says so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LATENCY_BOUND = ("split",)
NICE = 10
GRACE_S = 30.0  # after SIGINT, before SIGTERM (Flower's ServerApp thread may outlive SIGINT)
PROGRESS = re.compile(r"\[(\w+) (\d+)/(\d+)\]\s*(acc [0-9.]+)?")


def child_command(config_file: str | None, overrides: str, name: str, num_supernodes: int,
                  out: str, ray_address: str = "") -> list[str]:
    """The ``snake-flower run`` command line of one run (a strategy or a variant table) of a comparison."""
    command = [sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", str(num_supernodes),
               "--out", out, "--run-config", f"{overrides} run-name={name}".strip()]
    return (command + (["--config", config_file] if config_file else [])
            + (["--ray-address", ray_address] if ray_address else []))


def latest_progress(log: Path) -> str:
    """The last progress mark (``name r/N acc x``) in a child's log, or ``starting``."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return "starting"
    marks = PROGRESS.findall(text)
    if not marks:
        return "starting"
    _, done, total, acc = marks[-1]
    return f"{done}/{total}" + (f" {acc}" if acc else "")


def run_side_by_side(commands: dict[str, Sequence[str]], out: Path, jobs: int | None = None,
                     every: float = 30.0) -> dict[str, int]:
    """Run the commands, at most ``jobs`` at once; show a progress line every ``every`` s.

    Returns each strategy's exit code. On Ctrl-C or SIGTERM every running child gets
    SIGINT (so that it can shut its Ray cluster down), then SIGTERM for its whole
    process group after ``GRACE_S`` seconds, then SIGKILL; further signals are held
    off meanwhile, and the interrupt is raised again once every child has ended.
    Each child runs in its own session, so a terminal's Ctrl-C reaches it only
    through this process. Only processes started here are signalled.
    """
    out.mkdir(parents=True, exist_ok=True)
    logs = {name: out / f"{name}.log" for name in commands}
    waiting = sorted(commands, key=lambda name: name not in LATENCY_BOUND)  # stable: split first
    slots = len(commands) if jobs is None else max(1, jobs)
    children: dict[str, subprocess.Popen] = {}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        t0 = last = time.time()
        finished: set[str] = set()
        while waiting or len(finished) < len(children):
            while waiting and len(children) - len(finished) < slots:
                _start(waiting.pop(0), commands, logs, children)
            time.sleep(1.0)
            ended = {name for name, child in children.items() if child.poll() is not None}
            if ended - finished or time.time() - last >= every:  # a child ended, or it is time
                line = "  ".join(f"{name} {_state(children.get(name), logs[name])}" for name in commands)
                print(f"[{time.time() - t0:5.0f} s] {line}", flush=True)
                finished, last = ended, time.time()
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not abandon children
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(children)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {name: children[name].returncode for name in commands}


def _start(name: str, commands: dict[str, Sequence[str]], logs: dict[str, Path],
           children: dict[str, subprocess.Popen]) -> None:
    nice = 0 if name in LATENCY_BOUND else NICE
    with logs[name].open("w") as fh:
        children[name] = subprocess.Popen(commands[name], stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True,
                                          preexec_fn=lambda: _prepare_child(nice))
    print(f"started {name} (pid {children[name].pid}{f', nice +{nice}' if nice else ''}), "
          f"log {logs[name]}", flush=True)


def _stop(children: dict[str, subprocess.Popen]) -> None:
    """SIGINT, then SIGTERM to the process group after a grace period, then SIGKILL."""
    running = [child for child in children.values() if child.poll() is None]
    for child in running:
        child.send_signal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.time() + GRACE_S
        while any(child.poll() is None for child in running) and time.time() < deadline:
            time.sleep(0.5)
        for child in running:
            if child.poll() is None:
                try:  # the child's own session: its Ray processes go with it
                    os.killpg(child.pid, sig)
                except ProcessLookupError:
                    pass
    for child in running:
        child.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _prepare_child(nice: int) -> None:
    """In the child, before exec: let SIGINT interrupt Python again; lower its priority."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if nice:
        os.nice(nice)


def _state(child: subprocess.Popen | None, log: Path) -> str:
    if child is None:
        return "waiting"
    code = child.poll()
    if code is None:
        return latest_progress(log)
    return "done" if code == 0 else f"failed (exit {code})"
