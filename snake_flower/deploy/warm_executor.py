"""A warm SuperExec: each ClientApp task is forked from a forkserver that already holds the app.

Flower's SuperExec starts a fresh ``flwr-clientapp`` interpreter for every message, which
spends about 3 s importing torch and the app before it trains. ``ForkExecutor`` follows
Flower's ``Executor`` protocol (``flwr.supercore.superexec.executor.types``) and, for a
ClientApp task, forks a process from a ``multiprocessing`` forkserver that imported
``deploy/warm_node.py`` once; the process runs Flower's own ``flwr-clientapp`` entry with
the arguments Flower's ``SubprocessExecutor`` would have given it. One process per task
stays, as in Flower: the task's state dies with it. Other task types go to Flower's own
executor.

``python -m snake_flower.deploy.warm_executor [flower-superexec args]`` is Flower's
``flower-superexec`` with this executor installed (``runtime/flower_patches.patch_executor``);
``snake-flower supernode`` starts it next to the SuperNode.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import time
from collections.abc import Mapping
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from typing import Any

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

PRELOAD = "snake_flower.deploy.warm_node"
WAKEUP_FD_ENV = "SNAKE_FLOWER_TASK_WAKEUP_FD"
"""The read end of the pipe the SuperNode writes to once it stored a message (``deploy/supernode.py``)."""
TASK_WAIT_ENV = "SNAKE_FLOWER_TASK_WAIT"
"""The longest the SuperExec waits for that pipe between two asks for a task (``--poll-interval``)."""
READY = "snake_flower warm SuperExec: forkserver ready"
"""What the SuperExec prints (to the SuperNode's log) once its forkserver has preloaded everything."""


def clientapp_argv(spec: ExecutionSpec) -> list[str]:
    """The ``flwr-clientapp`` command line Flower's ``SubprocessExecutor.launch`` builds."""
    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def _nothing() -> None:
    """A forked process's whole work when it only proves that the forkserver is warm."""


def run_clientapp_task(argv: list[str]) -> None:
    """In the forked process: Flower's ``flwr-clientapp`` entry, as if started with ``argv``."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = argv
    flwr_clientapp()


class ForkExecutor:
    """Flower ``Executor`` that forks ClientApp tasks from a warm forkserver.

    Flower's SuperExec loop asks its SuperNode for a task, launches it, sleeps its task poll
    interval and calls ``reconcile``; with ``wakeup_fd`` that loop runs at Flower's shortest
    interval (10 ms) and ``reconcile`` waits instead, until the SuperNode writes to the pipe
    (it stored a message) or for at most ``wait`` seconds: a task is asked for as soon as it
    exists, and an idle node asks no more often than every ``wait`` seconds.

    Parameters
    ----------
    preload : str (default: ``snake_flower.deploy.warm_node``)
        The module the forkserver imports once, before it forks anything.
    wakeup_fd : int | None (default: None)
        The read end of the SuperNode's wake-up pipe (``supernode.task_wakeup``); ``None``:
        ``reconcile`` never waits.
    wait : float (default: 0.1)
        The longest ``reconcile`` waits for the pipe, in seconds.
    """

    def __init__(self, preload: str = PRELOAD, wakeup_fd: int | None = None, wait: float = 0.1) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([preload])
        self._stock = SubprocessExecutor()
        self._tasks: list[BaseProcess] = []
        self._wakeup_fd, self._wait = wakeup_fd, wait

    def start(self) -> int:
        """Start the forkserver and wait until it has preloaded everything; its PID.

        One empty process is forked and joined: the forkserver forks nothing before its
        preload is done, so when it is back the node is warm (``READY`` is printed), and
        the first task's fork waits for nothing.
        """
        started = time.monotonic()
        forkserver.ensure_running()
        pid = forkserver._forkserver._forkserver_pid  # noqa: SLF001 - for logs and tests only
        probe = self._context.Process(target=_nothing, name="warm-up")
        probe.start()
        probe.join()
        print(f"{READY} (pid {pid}, {time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
        return pid

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        """Every task type can launch at once, as with Flower's subprocess executor."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """No capacity gate: return at once."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a ClientApp task from the forkserver; hand any other task type to Flower."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self._stock.launch(spec)
        try:
            task = self._context.Process(target=run_clientapp_task, args=(clientapp_argv(spec),),
                                         name=f"flwr-clientapp-{spec.task_id}")
            task.start()
        except OSError as err:  # the forkserver is gone: say so, Flower expires the task
            return LaunchResult.failed(f"forkserver could not fork task {spec.task_id}: {err}")
        self._tasks.append(task)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Collect the exit status of finished tasks (between task polls); then wait until the
        SuperNode stored a message, or for at most ``wait`` seconds (with ``wakeup_fd``)."""
        self._tasks = [task for task in self._tasks if task.is_alive()]
        if self._wakeup_fd is not None and select.select([self._wakeup_fd], [], [], self._wait)[0]:
            try:
                os.read(self._wakeup_fd, 4096)  # every wake-up so far: one ask serves them all
            except BlockingIOError:
                pass

    def close(self) -> None:
        """Nothing to release: running tasks watch the SuperExec's PID, as Flower's do."""


def wakeup_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``ForkExecutor``'s ``wakeup_fd`` and ``wait`` from the launcher's environment (none: no wait)."""
    if not env.get(WAKEUP_FD_ENV):
        return {}
    fd = int(env[WAKEUP_FD_ENV])
    os.set_blocking(fd, False)
    return {"wakeup_fd": fd, "wait": float(env.get(TASK_WAIT_ENV, "0.1"))}


def main(argv: list[str] | None = None) -> None:
    """``flower-superexec`` with ``ForkExecutor``; its forkserver warms up first.

    If the executor may not be patched in (stock Flower asked for, or an unchecked flwr:
    ``runtime/flower_patches.py``), this is Flower's own ``flower-superexec`` and no forkserver starts.
    """
    from flwr.supercore.cli.flower_superexec import flower_superexec

    from snake_flower.runtime.flower_patches import patch_executor

    executor = ForkExecutor(**wakeup_from_env(os.environ))
    if patch_executor(executor):
        executor.start()
    elif TASK_WAIT_ENV in os.environ:  # Flower's own loop polls: at --poll-interval, not at 10 ms
        os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = os.environ[TASK_WAIT_ENV]
    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":
    main()
