"""Run a comparison's strategies side by side, each in its own process and Ray simulation.

Split learning makes one round trip per mini-batch, and Flower's simulation engine
picks up messages every 0.1 s, so a split run waits far more than it computes. Run
beside Snake and FedAvg it finishes in about the time it takes alone. Each child is
the same ``snake-flower run`` a user would type for that strategy (same config file,
same overrides plus ``strategy=...``), so a parallel comparison is the sequential one
with the waiting overlapped. Each child's output goes to ``<out>/<strategy>.log``.

Split learning is bound by latency (each batch waits for its round trip), Snake and
FedAvg by throughput. So the throughput-bound runs are started with a ``nice``
increment (``LATENCY_BOUND`` keeps normal priority): when the two cores are
contended, the split run gets them first and the others take what it leaves.
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
PROGRESS = re.compile(r"\[(\w+) (\d+)/(\d+)\]\s*(acc [0-9.]+)?")


def child_command(config_file: str | None, overrides: str, strategy: str, num_supernodes: int,
                  out: str) -> list[str]:
    """The ``snake-flower run`` command line of one strategy of a comparison."""
    command = [sys.executable, "-m", "snake_flower.cli", "run", "--num-supernodes", str(num_supernodes),
               "--out", out, "--run-config", f"{overrides} strategy={strategy}".strip()]
    return command + (["--config", config_file] if config_file else [])


def latest_progress(log: Path) -> str:
    """The last progress mark (``name r/N acc x``) in a child's log, or ``starting``."""
    try:
        text = log.read_text(errors="replace")[-20000:]
    except FileNotFoundError:
        return "starting"
    marks = PROGRESS.findall(text)
    if not marks:
        return "starting"
    _, done, total, acc = marks[-1]
    return f"{done}/{total}" + (f" {acc}" if acc else "")


def run_side_by_side(commands: dict[str, Sequence[str]], out: Path, every: float = 30.0) -> dict[str, int]:
    """Start every command, show one progress line per ``every`` seconds, wait for all.

    Returns each strategy's exit code. On Ctrl-C or SIGTERM the children get SIGINT
    (so that each shuts its Ray cluster down) and are waited for; only processes
    started here are signalled, by PID. Children get SIGINT's default handling back
    even when this process was started with it ignored (``nohup ... &``).
    """
    out.mkdir(parents=True, exist_ok=True)
    logs = {name: out / f"{name}.log" for name in commands}
    children: dict[str, subprocess.Popen] = {}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name, command in commands.items():
            with logs[name].open("w") as fh:
                nice = 0 if name in LATENCY_BOUND else NICE
                children[name] = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT,
                                                  preexec_fn=lambda nice=nice: _prepare_child(nice))
            print(f"started {name} (pid {children[name].pid}{f', nice +{nice}' if nice else ''}), "
                  f"log {logs[name]}", flush=True)
        t0 = last = time.time()
        finished: set[str] = set()
        while len(finished) < len(children):
            time.sleep(1.0)
            ended = {name for name, child in children.items() if child.poll() is not None}
            if ended - finished or time.time() - last >= every:  # a child ended, or it is time
                line = "  ".join(f"{name} {_state(child, logs[name])}" for name, child in children.items())
                print(f"[{time.time() - t0:5.0f} s] {line}", flush=True)
                finished, last = ended, time.time()
    except KeyboardInterrupt:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children.values():
            child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {name: child.returncode for name, child in children.items()}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _prepare_child(nice: int) -> None:
    """In the child, before exec: let SIGINT interrupt Python again; lower its priority."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if nice:
        os.nice(nice)


def _state(child: subprocess.Popen, log: Path) -> str:
    code = child.poll()
    if code is None:
        return latest_progress(log)
    return "done" if code == 0 else f"failed (exit {code})"
