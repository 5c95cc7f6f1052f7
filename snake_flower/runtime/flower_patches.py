"""Every patch of Flower's internals, in one place, tied to the flwr versions it was checked on.

Flower's deployment runtime waits, and holds more than it needs, in places no flag reaches (flwr
1.41.0 and 1.42.0 alike):

- the SuperNode sleeps a literal 3 s when the SuperLink has no message for it, and 0.5 s
  between checks for its ClientApp's reply (``flwr.supernode.start_client_internal``);
- pulling a message's objects backs off from 1 s, doubling up to 10 s
  (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP`` in ``flwr.supercore.constant``), and the
  SuperLink hands out a message before its objects are pushed, so a quick puller always
  meets the back-off: on the SuperNode, in the ClientApp and in the ServerApp;
- the SuperExec starts a fresh ``flwr-clientapp`` interpreter per message (``get_executor``
  in ``flwr.supercore.superexec.run_superexec``), about 3 s of importing torch and the app;
- the simulation engine sweeps for new messages every 0.1 s
  (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``);
- a ClientApp inflates a received message with ``inflate_object_from_contents``, which keeps
  every chunk of every array until the whole message is built: the message twice in memory;
- a ClientApp extracts and checks its whole FAB again for every message
  (``install_from_fab`` in ``flwr.supernode.runtime.run_clientapp``), though the app is
  installed already (about 40 ms of CPU a task for this app);
- and one fault, not a wait: a ClientApp actor that dies in the Ray simulation (killed by
  Ray's memory monitor, a crash) is put back into the actor pool
  (``BasicActorPool.fetch_result_and_return_actor_to_pool``), and every message it is given
  afterwards fails at once: one lost process costs every later hop, not one.

Each ``patch_*`` function below changes exactly one of these in the calling process, after
checking that the installed flwr is a version in ``CHECKED`` whose patched functions still
have the recorded signature and source (``flower_fingerprints``); a patch in ``OPTIONAL``,
recorded for some checked versions only, is left out quietly on the others. Patches degrade, they never
break: on any other flwr, or if one target changed, the process logs one warning line
(``degraded``: the version, the reason, what is lost) and from then on every patch in it is
a no-op and stock Flower runs, slower and with the dead-actor fault. ``SNAKE_FLOWER_STOCK_FLOWER=1``
(or ``snake-flower supernode --stock``) asks for stock Flower outright, without the warning.
``SNAKE_FLOWER_FAKE_FLWR_VERSION`` makes ``flwr_version`` report another version, for tests;
like any environment variable it reaches every process a run starts.
``tests/snake_flower/runtime/test_flower_patches.py`` fails as soon as one changes.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from hashlib import sha256
from importlib.metadata import version
from logging import DEBUG, WARNING
from queue import Queue
from typing import Any

from snake_flower.config import ConfigError
from snake_flower.runtime.flower_fingerprints import CHECKED

STOCK_ENV = "SNAKE_FLOWER_STOCK_FLOWER"
"""Set to ``1`` to run stock Flower: every patch here becomes a no-op."""
FAKE_VERSION_ENV = "SNAKE_FLOWER_FAKE_FLWR_VERSION"
"""For tests: the flwr version ``flwr_version`` reports instead of the installed one."""
STOCK_RUNS = "stock Flower runs"
"""What a process that runs stock Flower says, in its warning or its note (``deploy/loopback.py`` waits for it)."""
LOST = ("slower hops (Flower's 0.1 s simulation pickup, 3 s SuperNode polls, 1-10 s object-pull back-off "
        "and a fresh flwr-clientapp per message), a received message held twice while a ClientApp "
        "inflates it, and, in the Ray simulation, the replacement of a dead ClientApp actor (Flower "
        "gives it every later message, and those hops fail)")
"""What stock Flower costs: the latency the patches buy, and the fault ``patch_ray_actors`` fixes."""
PICKUP_FIRST_WAIT, PICKUP_MAX_WAIT = 0.001, 0.02
# Flower's: 1 s doubling to 10 s, 500 tries an object (about 80 min). A cap of 50 ms overshoots
# an object's arrival by 50 ms at most; without a limit on tries, Flower's max_time (2 h) bounds it.
PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP, PULL_MAX_TRIES = 0.02, 0.05, None
LOCAL_WAIT = 0.005
"""How long the SuperNode sleeps between looks at its own state (a ClientApp's reply, its objects)."""

# What each patch replaces or relies on: "module:qualname" of functions, "module:NAME" of constants.
PICKUP = ("flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue",
          "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.__init__",
          "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.get_message_ins",
          "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState._check_stored_messages")
SUPERNODE_SLEEPS = ("flwr.supernode.start_client_internal:start_client_internal",
                    "flwr.supernode.start_client_internal:_push_messages",
                    "flwr.supernode.cli.flower_supernode:flower_supernode",
                    "flwr.supernode.cli.flower_supernode:_parse_args_run_supernode")
OBJECT_PULLS = ("flwr.supercore.inflatable.inflatable_utils:pull_objects",
                "flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree",
                "flwr.supercore.constant:PULL_INITIAL_BACKOFF",
                "flwr.supercore.constant:PULL_BACKOFF_CAP")
EXECUTOR = ("flwr.supercore.superexec.run_superexec:run_superexec",
            "flwr.supercore.superexec.executor.factory:get_executor",
            "flwr.supercore.superexec.executor.subprocess_executor:SubprocessExecutor.launch",
            "flwr.supercore.superexec.executor.types:ExecutionSpec",
            "flwr.supercore.cli.flower_superexec:flower_superexec",
            "flwr.supernode.cli.flwr_clientapp:flwr_clientapp",
            "flwr.supernode.runtime.run_clientapp:run_clientapp")
# (pull_and_inflate_object_from_tree calls it through its module: tested, not fingerprinted, since
# patch_object_pulls changes that function's defaults and so its signature)
MESSAGE_INFLATE = ("flwr.supercore.inflatable.inflatable_utils:inflate_object_from_contents",
                   "flwr.supercore.inflatable.inflatable_object:get_object_head_values_from_object_content",
                   "flwr.app.message.array:Array.inflate",
                   "flwr.app.message.arraychunk:ArrayChunk.inflate")
FAB_INSTALL = ("flwr.cli.install:install_from_fab", "flwr.cli.install:validate_and_install",
               "flwr.supercore.utils:get_flwr_home", "flwr.common.constant:APP_DIR",
               "flwr.supernode.runtime.run_clientapp:run_clientapp")
RAY_ACTORS = ("flwr.simulation.ray_transport.ray_actor:BasicActorPool.fetch_result_and_return_actor_to_pool",
              "flwr.simulation.ray_transport.ray_actor:BasicActorPool.add_actor_back_to_pool",
              "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.process_message")
PATCHES = {"pickup": PICKUP, "supernode-sleeps": SUPERNODE_SLEEPS, "object-pulls": OBJECT_PULLS,
           "message-inflate": MESSAGE_INFLATE, "executor": EXECUTOR, "ray-actors": RAY_ACTORS,
           "fab-install": FAB_INSTALL}
OPTIONAL = ("fab-install",)
"""Patches recorded for some checked versions only: on the others they are left out, quietly
(the version was checked; only these patches were not read on it), and the rest apply."""


class UncheckedFlower(ConfigError):
    """The installed flwr is not one these patches were checked against (a one-line message)."""


_stock_since: list[str] = []  # why this process runs stock Flower, once a check failed (warned once)


def stock_flower() -> bool:
    """Does the environment ask for stock Flower (``SNAKE_FLOWER_STOCK_FLOWER=1``)?"""
    return os.environ.get(STOCK_ENV, "") not in ("", "0")


def flwr_version() -> str:
    """The installed flwr's version, or ``SNAKE_FLOWER_FAKE_FLWR_VERSION`` if set (tests)."""
    return os.environ.get(FAKE_VERSION_ENV) or version("flwr")


def degraded(reason: str) -> str:
    """The one warning line of a process whose patches are off because of ``reason``."""
    return (f"snake_flower: {reason}, so every Flower patch is off and {STOCK_RUNS}; lost: {LOST} "
            f"(set {STOCK_ENV}=1 to run stock Flower without this warning)")


def patches_on(*patches: str) -> bool:
    """May this process apply ``patches``? ``False``: stock Flower runs, and every patch is a no-op.

    ``False`` if stock Flower was asked for (``SNAKE_FLOWER_STOCK_FLOWER=1``), and, after one
    warning line (``degraded``), if the installed flwr or a target of one of ``patches`` is not
    as recorded; from then on every patch of this process is off, not only those. Never raises.

    Parameters
    ----------
    patches : str
        Keys of ``PATCHES`` the caller is about to apply; check them all before applying any,
        so that none is applied when one would be refused.

    Returns
    -------
    bool
        Whether the patches may be applied.
    """
    if stock_flower() or _stock_since:
        return False
    if (reason := stock_reason(*patches)) is None:
        return True
    _stock_since.append(reason)
    # Flower's own logger by its name, not through an import of a module that may have moved
    logging.getLogger("flwr").log(WARNING, "%s", degraded(reason))
    return False


def stock_reason(*patches: str) -> str | None:
    """Why stock Flower would run instead of ``patches`` in this process (one line), or ``None``.

    Only looks: no warning, nothing applied (tests skip with it what needs a patch).

    Parameters
    ----------
    patches : str
        Keys of ``PATCHES``.

    Returns
    -------
    str | None
        ``SNAKE_FLOWER_STOCK_FLOWER=1``, the unchecked version or the changed target; ``None``
        if every one of ``patches`` may be applied.
    """
    if stock_flower():
        return f"{STOCK_ENV}=1"
    if _stock_since:
        return _stock_since[0]
    try:
        for patch in patches:
            check(patch)
    except Exception as err:  # noqa: BLE001 - UncheckedFlower, or an flwr nobody read: stock Flower runs
        return str(err) if isinstance(err, UncheckedFlower) else f"checking flwr failed ({type(err).__name__})"
    return None


def recorded(patch: str) -> bool:
    """Were all of ``patch``'s targets recorded for the installed flwr (``flower_fingerprints``)?

    Every patch is, on every checked version, except some of ``OPTIONAL``.
    """
    found = CHECKED.get(flwr_version(), {})
    return all(ref in found for ref in PATCHES[patch])


def reset_checks() -> None:
    """Forget every check of this process and its verdict (for tests)."""
    _check.cache_clear()
    _stock_since.clear()


def resolve_ref(ref: str) -> Any:
    """The object named ``module:qualname`` (a dotted qualname reaches into classes)."""
    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def fingerprint(ref: str) -> str:
    """What a patch assumes of ``ref``: a function's or class's signature and source hash,
    a constant's value."""
    obj = resolve_ref(ref)
    if not callable(obj):
        return repr(obj)
    return f"{inspect.signature(obj)} sha256:{sha256(inspect.getsource(obj).encode()).hexdigest()[:16]}"


def check(patch: str) -> None:
    """Raise ``UncheckedFlower`` (one line: the version, what differs) unless ``patch``'s targets
    are exactly as recorded (or stock Flower was asked for); ``patches_on`` turns it into a warning."""
    if not stock_flower():
        _check(patch, flwr_version())


@lru_cache(maxsize=None)
def _check(patch: str, installed: str) -> None:
    if installed not in CHECKED:
        raise UncheckedFlower(f"flwr {installed} is not a version snake_flower's Flower patches were "
                              f"checked against ({', '.join(sorted(CHECKED))})")
    for ref in PATCHES[patch]:
        try:
            found = fingerprint(ref)
        except Exception as err:  # noqa: BLE001 - gone, moved, or unreadable: not what was checked
            found = f"unreadable ({type(err).__name__})"
        if found != CHECKED[installed][ref]:
            raise UncheckedFlower(f"flwr {installed}: {ref} is not the one patch {patch!r} was checked "
                                  f"against ({_difference(found, CHECKED[installed][ref])})")


def _difference(found: str, recorded: str) -> str:
    """Which part of a fingerprint changed, briefly."""
    if found.startswith("unreadable"):
        return f"it is {found}"
    (signature, _, source), (was_signature, _, was_source) = found.rpartition(" "), recorded.rpartition(" ")
    if signature != was_signature:
        return "its signature or value changed"
    return f"its source changed: {was_source} is now {source}"


def _apply(patch: str, apply: Callable[[], None], what: str) -> bool:
    if not patches_on(patch):
        return False
    apply()
    from flwr.supercore import log

    log(DEBUG, "snake_flower patch %s: %s", patch, what)
    return True


# -- the simulation engine's message pickup -------------------------------------------------

def add_messages_to_queue_quickly(state: Any, queue: Queue, nodes_mapping: dict[int, Any],
                                  f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue``, sleeping 1 to 20 ms (adaptively) instead of 0.1 s.

    Like Flower's loop, a sweep hands out at most one message per node, each node's oldest
    first. Flower's sweep asks the state once per node, and each ask scans every stored
    message, so one sweep costs nodes x messages (10,000 nodes answering a rank query: 10^8
    checks per sweep); with Flower's in-memory state one pass over the stored messages does
    it here, so a sweep's cost does not depend on the number of nodes.
    """
    take = _undelivered if _in_memory(state) else _per_node
    wait = PICKUP_FIRST_WAIT
    while not f_stop.is_set():
        found = take(state, nodes_mapping)
        for msg in found:
            queue.put(msg)
        wait = PICKUP_FIRST_WAIT if found else min(2 * wait, PICKUP_MAX_WAIT)
        f_stop.wait(wait)


def _in_memory(state: Any) -> bool:
    """Is ``state`` Flower's in-memory LinkState (the one the simulation engine uses)?"""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    return isinstance(state, InMemoryLinkState)


def _per_node(state: Any, nodes_mapping: dict[int, Any]) -> list[Any]:
    """One undelivered message per node, asked node by node (any LinkState)."""
    return [msg for node_id in nodes_mapping for msg in state.get_message_ins(node_id=node_id, limit=1)]


def _undelivered(state: Any, nodes_mapping: dict[int, Any]) -> list[Any]:
    """What ``get_message_ins(node_id, limit=1)`` gives for every node, in one pass.

    The oldest undelivered message of each node in ``nodes_mapping``, checked as Flower
    checks it (``_check_stored_messages`` drops an expired or misaddressed one) and marked
    delivered; the cost is that of the stored messages, not of the nodes.
    """
    from flwr.supercore.date import now

    taken: dict[int, Any] = {}
    with state.lock:
        if not state.message_ins_store:
            return []
        for msg_id, msg in list(state.message_ins_store.items()):
            node_id = msg.metadata.dst_node_id
            if node_id in taken or node_id not in nodes_mapping or msg.metadata.delivered_at != "":
                continue
            state._check_stored_messages({msg_id})  # pylint: disable=protected-access
            if msg_id in state.message_ins_store:
                taken[node_id] = msg
        delivered_at = now().isoformat()
        for msg in taken.values():
            msg.metadata.delivered_at = delivered_at
    return list(taken.values())


def patch_pickup() -> bool:
    """Quicker message pickup in this process's simulation engine; ``True`` if patched.

    Only wall time changes: the same messages reach the same ClientApps in the same
    order (``experiments/bench_pickup.py``).
    """
    def apply() -> None:
        importlib.import_module("flwr.server.superlink.fleet.vce.vce_api").add_messages_to_queue = \
            add_messages_to_queue_quickly
    return _apply("pickup", apply, "simulation pickup every 1-20 ms instead of 0.1 s")


def fetch_result_replacing_dead_actors(pool: Any, future: Any) -> tuple[Any, Any]:
    """``BasicActorPool.fetch_result_and_return_actor_to_pool``, but an actor that died is replaced.

    On any error ``RayBackend.process_message`` hands the future's actor back to the pool
    (``add_actor_back_to_pool``); when the actor is dead, a new one now stands behind the
    future instead, so that the hop that lost its process fails and the next one runs.
    """
    import ray

    try:
        _, message, context = ray.get(future)
    except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.WorkerCrashedError) as err:
        ray.kill(pool._future_to_actor[future])  # pylint: disable=protected-access; gone already, or now
        pool._future_to_actor[future] = pool.create_actor_fn()  # pylint: disable=protected-access
        from flwr.supercore import log

        log(WARNING, "a ClientApp actor died (%s): a new one takes its place", type(err).__name__)
        raise
    pool.add_actor_back_to_pool(future)
    return message, context


def patch_ray_actors() -> bool:
    """Replace a dead ClientApp actor in this process's simulation engine; ``True`` if patched."""
    def apply() -> None:
        pool = importlib.import_module("flwr.simulation.ray_transport.ray_actor").BasicActorPool
        pool.fetch_result_and_return_actor_to_pool = fetch_result_replacing_dead_actors
    return _apply("ray-actors", apply, "a dead ClientApp actor is replaced, not put back")


# -- the SuperNode's idle poll and reply wait ----------------------------------------------

class CappedTime:
    """The ``time`` module, except that ``sleep`` is capped.

    ``start_client_internal`` sleeps in two ways: 3 s when the SuperLink had no message
    (the idle poll, a request to the SuperLink), and 0.5 s between looks at the node's own
    in-memory state while a ClientApp works (its reply, then its reply's objects). The
    first is capped at ``cap``; the second, which costs no request, at ``local_cap``.

    The first look after an idle poll (or the node's first look ever) means that a message
    and its objects were just stored, and a task made for it: ``wake`` (if given) is called
    then, once, so that the SuperExec need not wait for its next task poll.
    """

    def __init__(self, cap: float, local_cap: float = LOCAL_WAIT,
                 wake: Callable[[], None] | None = None) -> None:
        self.cap, self.local_cap, self.wake = cap, min(local_cap, cap), wake
        self._idle = True

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` for at most ``cap`` (idle poll) or ``local_cap`` seconds (under 1 s)."""
        local = seconds < 1.0
        if local and self._idle and self.wake is not None:
            self.wake()
        self._idle = not local
        time.sleep(min(seconds, self.local_cap if local else self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_supernode_sleeps(cap: float, local_cap: float = LOCAL_WAIT,
                           wake: Callable[[], None] | None = None) -> bool:
    """Cap the SuperNode's idle poll (3 s) at ``cap`` and its waits for a ClientApp's reply
    (0.5 s) at ``local_cap`` seconds; call ``wake`` once a message is stored.

    ``start_client_internal`` imports ``time`` at module level; it gets its own ``time``
    whose ``sleep`` is capped (``CappedTime``), and nothing else in the process changes.
    """
    def apply() -> None:
        importlib.import_module("flwr.supernode.start_client_internal").time = CappedTime(cap, local_cap, wake)
    return _apply("supernode-sleeps", apply, f"SuperNode idle poll capped at {cap:g} s, "
                  f"reply waits at {min(cap, local_cap):g} s")


# -- the object-pull back-off --------------------------------------------------------------

def patch_object_pulls(initial: float = PULL_INITIAL_BACKOFF, cap: float = PULL_BACKOFF_CAP,
                       max_tries: int | None = PULL_MAX_TRIES) -> bool:
    """Start the object-pull back-off at ``initial`` s, doubling to ``cap``, in this process.

    Flower's callers (the SuperNode, the ClientApp, the ServerApp's grid) call
    ``pull_objects`` with its keyword defaults, so changing the defaults of the one
    function object changes every call; ``pull_and_inflate_object_from_tree`` passes its
    own defaults on, so it gets the same. ``max_tries`` an object (``None``: no limit but
    Flower's ``max_time``) keeps a slow object's wait as long as Flower's back-off allows.
    """
    def apply() -> None:
        module = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
        for function in (module.pull_objects, module.pull_and_inflate_object_from_tree):
            function.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap,
                                           max_tries_per_object=max_tries)
    return _apply("object-pulls", apply, f"object pulls back off from {initial:g} s to {cap:g} s")


# -- the inflation of a received message ---------------------------------------------------

def patch_message_inflate() -> bool:
    """Let Flower's message inflation free each chunk once its array is built, in this process.

    Flower's ``inflate_object_from_contents`` holds every inflated object until the whole
    message is built, so a ClientApp holds a received message twice at the end of its pull
    (``runtime/message_inflate.py`` says why); ``pull_and_inflate_object_from_tree``, which a
    deployed ClientApp pulls its message with, looks the function up in its module, and finds
    the one that lets go. The objects built are the same.
    """
    def apply() -> None:
        from snake_flower.runtime.message_inflate import releasing_children

        module = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
        if not getattr(module.inflate_object_from_contents, "releases_children", False):
            module.inflate_object_from_contents = releasing_children(module.inflate_object_from_contents)
    return _apply("message-inflate", apply, "a received message's chunks freed as its arrays are built")


# -- the FAB, installed again by every ClientApp -------------------------------------------

INSTALLED = ".snake_flower-installed"
"""Under Flower's apps folder: one file per FAB installed (named by its whole sha256), holding the
folder Flower installed it in."""


def installing_once(install: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``install_from_fab``, skipped for a FAB this node installed before.

    Flower's ClientApp process calls ``install_from_fab(fab bytes, skip_prompt=True)`` for every
    message: it hashes the FAB, extracts every file into a temporary folder, checks each file's
    hash, reads the project's ``pyproject.toml`` and, finding the app folder installed already,
    returns it (about 40 ms of CPU and 60 file writes for this app). The first install of a FAB
    writes a marker named by the FAB's whole sha256 (``INSTALLED``) after Flower's own checks
    passed; a later task whose FAB has the same sha256, and whose app folder is still there,
    returns that folder at once. Any other call is Flower's.
    """
    def install_from_fab(fab_file: Any, install_dir: Any = None, skip_prompt: bool = False) -> Any:
        if not isinstance(fab_file, bytes) or install_dir is not None or not skip_prompt:
            return install(fab_file, install_dir, skip_prompt)
        from pathlib import Path

        from flwr.common.constant import APP_DIR
        from flwr.supercore.utils import get_flwr_home

        marker = get_flwr_home() / APP_DIR / INSTALLED / sha256(fab_file).hexdigest()
        if marker.is_file() and (installed := Path(marker.read_text())).is_dir():
            return installed
        installed = install(fab_file, install_dir, skip_prompt)
        marker.parent.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f"{marker.name}.{os.getpid()}")
        partial.write_text(str(installed))
        partial.replace(marker)  # whole or absent, for a task reading it at the same time
        return installed

    install_from_fab.installs_once = True
    return install_from_fab


def patch_fab_install() -> bool:
    """Let this process's ClientApp runtime skip installing a FAB it installed before."""
    def apply() -> None:
        module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
        if not getattr(module.install_from_fab, "installs_once", False):
            module.install_from_fab = installing_once(module.install_from_fab)
    return _apply("fab-install", apply, "a FAB installed before is not extracted and checked again")


CLIENTAPP_PATCHES = ("object-pulls", "message-inflate")


def patch_clientapp_process() -> bool:
    """The patches a ClientApp process of a node runs with: object pulls, message inflation and,
    where recorded for the installed flwr, the FAB installed once.

    The node launcher's forkserver (``deploy/warm_node.py``) applies them before it forks a
    ClientApp, and ``snake-flower memory --measure``'s node process (``harness/measure_node.py``)
    applies the same, so that it measures what a launcher's ClientApp holds.
    """
    optional = tuple(patch for patch in ("fab-install",) if recorded(patch))
    if not patches_on(*CLIENTAPP_PATCHES, *optional):  # all checked before any is applied
        return False
    return patch_object_pulls() and patch_message_inflate() and all(patch_fab_install() for _ in optional)


# -- the SuperExec's executor --------------------------------------------------------------

def patch_executor(executor: Any) -> bool:
    """Make ``run_superexec`` (this process's SuperExec) use ``executor`` for every task.

    ``executor`` follows Flower's ``Executor`` protocol (``deploy/warm_executor.py``).
    """
    def factory(*args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return executor

    def apply() -> None:
        importlib.import_module("flwr.supercore.superexec.run_superexec").get_executor = factory
    return _apply("executor", apply, f"SuperExec tasks run by {type(executor).__name__}")

