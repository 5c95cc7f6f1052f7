"""Every patch of Flower's internals: checked against the recorded flwr versions, and what each does.

The simulation engine's quicker message pickup: same messages, same order, less waiting.
The SuperNode's capped sleeps and the object-pull back-off. A changed signature, source or
constant, or an unrecorded flwr version, turns every patch off after one warning line, and
stock Flower runs.
"""

from __future__ import annotations

import inspect
import threading
import time
from queue import Queue

import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.simulation.ray_transport import ray_actor
from flwr.supercore import constant
from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

from snake_flower.runtime import flower_patches
from snake_flower.runtime.flower_fingerprints import CHECKED
from snake_flower.runtime.flower_patches import (
    FAKE_VERSION_ENV,
    PATCHES,
    LOCAL_WAIT,
    PICKUP_MAX_WAIT,
    STOCK_ENV,
    STOCK_RUNS,
    CappedTime,
    UncheckedFlower,
    add_messages_to_queue_quickly,
    check,
    fingerprint,
    patch_clientapp_process,
    patch_message_inflate,
    patch_object_pulls,
    patch_pickup,
    patch_ray_actors,
    patch_supernode_sleeps,
    patches_on,
)

PULLERS = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
FLOWER_INFLATE = inflatable_utils.inflate_object_from_contents
FLOWER_INSTALL = run_clientapp.install_from_fab


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Each test checks afresh, with stock Flower not asked for; patched functions are restored."""
    monkeypatch.delenv(STOCK_ENV, raising=False)
    monkeypatch.delenv(FAKE_VERSION_ENV, raising=False)
    for function in PULLERS:
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.setattr(inflatable_utils, "inflate_object_from_contents", FLOWER_INFLATE)
    monkeypatch.setattr(run_clientapp, "install_from_fab", FLOWER_INSTALL)
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(ray_actor.BasicActorPool, "fetch_result_and_return_actor_to_pool",
                        ray_actor.BasicActorPool.fetch_result_and_return_actor_to_pool)
    flower_patches.reset_checks()
    yield
    flower_patches.reset_checks()


def warnings_logged(caplog) -> list[str]:
    """Every warning line Flower's logger got (where ``patches_on`` writes)."""
    return [r.getMessage() for r in caplog.records if r.name == "flwr" and r.levelname == "WARNING"]


def flower_untouched() -> bool:
    """Are the functions and modules the patches change still Flower's own?"""
    return (all(f.__kwdefaults__["initial_backoff"] == 1 for f in PULLERS) and start_client_internal.time is time
            and inflatable_utils.inflate_object_from_contents is FLOWER_INFLATE
            and run_clientapp.install_from_fab is FLOWER_INSTALL
            and vce_api.add_messages_to_queue is not add_messages_to_queue_quickly
            and ray_actor.BasicActorPool.fetch_result_and_return_actor_to_pool
            is not flower_patches.fetch_result_replacing_dead_actors)


class FakeState:
    """Per-node inboxes, handed out one message per call as Flower's LinkState does."""

    def __init__(self) -> None:
        self.inbox: dict[int, list[str]] = {1: [], 2: []}
        self.lock = threading.Lock()

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        with self.lock:
            taken, self.inbox[node_id] = self.inbox[node_id][:limit], self.inbox[node_id][limit:]
        return taken


class RecordingStop:
    """A stop event that records each wait, delivers scripted messages, and stops after them."""

    def __init__(self, state: FakeState, script: list[list[tuple[int, str]]]) -> None:
        self.state, self.script, self.waits = state, script, []

    def is_set(self) -> bool:
        return len(self.waits) >= len(self.script)

    def wait(self, seconds: float) -> bool:
        for node, msg in self.script[len(self.waits)]:  # what arrives during this wait
            self.state.inbox[node].append(msg)
        self.waits.append(seconds)
        return self.is_set()


def test_every_message_is_picked_up_in_order_with_adaptive_waits():
    state, queue = FakeState(), Queue()
    state.inbox[1] = ["a", "b"]
    # waits: found a -> 1 ms; found b (c arrives) -> 1 ms; found c -> 1 ms; then idle:
    # 2, 4, 8, 16, 20, 20 ms; d and e arrive -> 1 ms after the sweep that finds them
    script = [[], [(2, "c")], [], [], [], [], [], [], [(1, "d"), (2, "e")], [], []]
    stop = RecordingStop(state, script)
    add_messages_to_queue_quickly(state, queue, {1: 0, 2: 1}, stop)
    assert [queue.get_nowait() for _ in range(5)] == ["a", "b", "c", "d", "e"]
    assert queue.empty()
    ms = [round(w * 1000) for w in stop.waits]
    assert ms == [1, 1, 1, 2, 4, 8, 16, 20, 20, 1, 2]
    assert max(stop.waits) == PICKUP_MAX_WAIT < 0.1  # Flower's loop always waits 0.1 s


def linkstate_with(monkeypatch, messages_per_node: list[int]):
    """Flower's own in-memory LinkState and grid, with queries pushed as the server pushes them."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.constant import NOOP_FLWR_AID, SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = list(_register_nodes(len(messages_per_node), factory))  # as the engine registers them
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SIMULATION)
    grid = InMemoryGrid(factory)
    grid.set_run(state.run_ids[run_id].run)
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)  # what a ServerApp process has set
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    sent = []
    for node, count in zip(nodes, messages_per_node):
        for i in range(count):
            sent.append(Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=node,
                                message_type=MessageType.QUERY))
    ids = list(grid.push_messages(sent))
    assert len(ids) == len(sent)
    return state, nodes


def handed_out(take, state, nodes: list[int]) -> list[list[tuple[int, int]]]:
    """Every sweep's messages as (node's partition, message number), until nothing is left."""
    sweeps, mapping = [], {node: i for i, node in enumerate(nodes)}
    while found := take(state, mapping):
        sweeps.append(sorted((mapping[m.metadata.dst_node_id], m.content["c"]["i"]) for m in found))
    return sweeps


def test_one_pass_over_the_messages_hands_out_what_flowers_per_node_asks_do(monkeypatch):
    """Flower's own in-memory state: one message per node and sweep, each node's oldest first."""
    counts = [2, 1, 0, 3]
    state, nodes = linkstate_with(monkeypatch, counts)
    expired = next(iter(state.message_ins_store.values()))  # partition 0's first message
    expired.metadata.__dict__["_ttl"] = 1e-6  # Flower deletes an expired message unsent
    quick = handed_out(flower_patches._undelivered, state, nodes)
    assert quick == [[(0, 1), (1, 0), (3, 0)], [(3, 1)], [(3, 2)]]
    assert expired.metadata.message_id not in state.message_ins_store
    state, nodes = linkstate_with(monkeypatch, counts)
    next(iter(state.message_ins_store.values())).metadata.__dict__["_ttl"] = 1e-6
    assert handed_out(flower_patches._per_node, state, nodes) == quick
    state, nodes = linkstate_with(monkeypatch, counts)  # a node the engine does not run: left alone
    assert handed_out(flower_patches._undelivered, state, nodes[1:])[0] == [(0, 0), (2, 0)]


def test_quick_pickup_replaces_the_engines_loop():
    assert patch_pickup()
    assert vce_api.add_messages_to_queue is add_messages_to_queue_quickly


def test_the_installed_flower_is_exactly_as_recorded():
    recorded = CHECKED[flower_patches.flwr_version()]  # KeyError: a version nobody checked
    for refs in PATCHES.values():
        for ref in refs:
            assert fingerprint(ref) == recorded[ref], ref
        assert set(refs) <= set(recorded)
    assert set(CHECKED) == {"1.41.0", "1.42.0"}
    assert recorded["flwr.supercore.constant:PULL_INITIAL_BACKOFF"] == "1"  # what the patch lowers


def test_a_changed_constant_or_signature_turns_every_patch_off_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(constant, "PULL_BACKOFF_CAP", 30)
    with pytest.raises(UncheckedFlower, match="PULL_BACKOFF_CAP"):
        check("object-pulls")
    flower_patches.reset_checks()
    monkeypatch.setattr(constant, "PULL_BACKOFF_CAP", 10)

    def _push_messages(state, object_store, send, push_object, poll=0.5):  # one argument more
        del state, object_store, send, push_object, poll
    monkeypatch.setattr(start_client_internal, "_push_messages", _push_messages)
    assert not patch_supernode_sleeps(0.1)
    assert not patch_object_pulls() and not patch_pickup()  # unchanged targets, but every patch is off
    assert flower_untouched()
    [warning] = warnings_logged(caplog)
    assert warning.startswith("snake_flower: flwr 1.42.0: flwr.supernode.start_client_internal:_push_messages "
                              "is not the one patch 'supernode-sleeps' was checked against (its signature")
    assert STOCK_RUNS in warning and "\n" not in warning


def test_the_same_signature_with_another_body_turns_the_patches_off(monkeypatch, caplog):
    original = inflatable_utils.pull_objects

    def pull_objects(*args, **kwargs):
        return original(*args, **kwargs)
    pull_objects.__signature__ = inspect.signature(original)  # the very same signature
    monkeypatch.setattr(inflatable_utils, "pull_objects", pull_objects)
    with pytest.raises(UncheckedFlower, match="pull_objects.*its source changed: sha256:"):
        check("object-pulls")
    assert not patch_object_pulls()
    [warning] = warnings_logged(caplog)
    assert "pull_objects is not the one patch 'object-pulls' was checked against (its source changed" in warning


def test_an_unchecked_flwr_version_runs_stock_flower_after_one_warning_line(monkeypatch, caplog):
    monkeypatch.setenv(FAKE_VERSION_ENV, "1.99.0")  # the hook the run's other processes inherit
    assert flower_patches.flwr_version() == "1.99.0"
    for patch in PATCHES:
        with pytest.raises(UncheckedFlower) as err:
            check(patch)
        assert str(err.value) == ("flwr 1.99.0 is not a version snake_flower's Flower patches were checked "
                                  "against (1.41.0, 1.42.0)")
    assert not patches_on("pickup", "ray-actors")
    assert not patch_pickup() and not patch_ray_actors() and not patch_object_pulls()
    assert not patch_message_inflate() and not patch_clientapp_process()
    assert not patch_supernode_sleeps(0.1) and not flower_patches.patch_executor(object())
    assert flower_untouched()
    [warning] = warnings_logged(caplog)  # one line for the whole process, not one per patch
    assert warning == flower_patches.degraded("flwr 1.99.0 is not a version snake_flower's Flower patches were "
                                              "checked against (1.41.0, 1.42.0)")
    assert "\n" not in warning and "1-10 s object-pull back-off" in warning  # the latency lost ...
    assert "a received message held twice" in warning  # ... the memory ...
    assert "replacement of a dead ClientApp actor" in warning  # ... and the fault patch_ray_actors fixes


def test_asking_for_stock_flower_turns_every_patch_off_without_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(FAKE_VERSION_ENV, "1.99.0")
    monkeypatch.setenv(STOCK_ENV, "1")  # the way to say it: stock Flower, no patch, no check
    check("pickup")
    assert not patches_on(*PATCHES) and not patch_pickup() and not patch_object_pulls()
    assert not patch_message_inflate()
    assert flower_untouched() and warnings_logged(caplog) == []


def test_a_failing_check_degrades_too(monkeypatch, caplog):
    from importlib.metadata import PackageNotFoundError

    def no_flwr() -> str:
        raise PackageNotFoundError("flwr")
    monkeypatch.setattr(flower_patches, "flwr_version", no_flwr)
    assert not patch_object_pulls() and flower_untouched()
    assert [w.split(",")[0] for w in warnings_logged(caplog)] == [
        "snake_flower: checking flwr failed (PackageNotFoundError)"]


def test_object_pulls_start_their_back_off_at_20_ms_everywhere_in_the_process():
    assert all(f.__kwdefaults__["initial_backoff"] == 1 for f in PULLERS)  # Flower's
    assert patch_object_pulls()
    for function in PULLERS:
        assert function.__kwdefaults__["initial_backoff"] == 0.02
        assert function.__kwdefaults__["backoff_cap"] == 0.05
        assert function.__kwdefaults__["max_tries_per_object"] is None  # Flower's max_time (2 h) bounds it
        assert function.__kwdefaults__["max_time"] == 7200


def test_a_late_object_is_pulled_within_the_back_off_cap_of_its_arrival():
    arrives = time.monotonic() + 0.3

    def pull(object_id: str) -> bytes:
        if time.monotonic() < arrives:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"
    assert patch_object_pulls()
    assert inflatable_utils.pull_objects(["a", "b"], pull) == {"a": b"content", "b": b"content"}
    assert time.monotonic() - arrives < 0.05 * 1.2 + 0.1  # the cap, its jitter, and a loaded machine


def test_the_supernode_sleeps_at_most_the_poll_interval():
    assert patch_supernode_sleeps(0.05)
    capped = start_client_internal.time
    assert isinstance(capped, CappedTime) and capped.time is time.time  # the rest is time's own
    started = time.monotonic()
    capped.sleep(3)  # the SuperNode's idle poll
    assert time.monotonic() - started < 1.0
    assert time.time is not None and getattr(time, "sleep") is not capped.sleep


def test_the_supernode_looks_at_its_own_state_more_often_than_it_polls_the_superlink(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    CappedTime(0.1).sleep(3)  # idle poll: a request to the SuperLink
    CappedTime(0.1).sleep(0.5)  # waiting for a ClientApp's reply: a look at the node's memory
    CappedTime(0.002).sleep(0.5)  # never longer than the poll interval
    assert slept == [0.1, LOCAL_WAIT, 0.002] and LOCAL_WAIT <= 0.01


def test_the_supernode_wakes_its_superexec_once_per_stored_message(monkeypatch):
    """The first look at its own state after an idle poll: a message was stored, its task made."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    woken = []
    capped = CappedTime(0.1, wake=lambda: woken.append(len(woken)))
    for seconds in (3, 3, 0.5, 0.5, 0.5, 3, 0.5, 0.5):  # idle, a message, idle, the next message
        capped.sleep(seconds)
    assert woken == [0, 1]


def test_a_fab_installed_before_is_not_extracted_again(monkeypatch, tmp_path):
    """Flower extracts and checks the whole FAB in every ClientApp task; once is enough per FAB."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    calls = []

    def install(fab_file, install_dir=None, skip_prompt=False):  # Flower's: the folder it installed in
        calls.append(fab_file)
        folder = tmp_path / "apps" / f"app-{len(calls)}"
        folder.mkdir(parents=True)
        return folder
    monkeypatch.setattr(run_clientapp, "install_from_fab", install)
    assert patch_clientapp_process()
    once = run_clientapp.install_from_fab
    first = once(b"fab one", skip_prompt=True)
    assert once(b"fab one", skip_prompt=True) == first and calls == [b"fab one"]  # the second task
    assert once(b"fab two", skip_prompt=True) != first and calls == [b"fab one", b"fab two"]
    first.rmdir()  # the app folder is gone: Flower installs it again
    assert once(b"fab one", skip_prompt=True) != first and len(calls) == 3
    once(tmp_path / "a.fab", skip_prompt=True)  # any other call is Flower's
    assert len(calls) == 4


def test_a_patch_recorded_for_one_checked_version_only_is_left_out_quietly_on_the_other(monkeypatch, caplog):
    monkeypatch.setenv(FAKE_VERSION_ENV, "1.41.0")
    assert not flower_patches.recorded("fab-install") and flower_patches.recorded("message-inflate")
    assert patch_clientapp_process()  # the version was checked: its other patches apply, without a warning
    assert run_clientapp.install_from_fab is FLOWER_INSTALL
    assert PULLERS[0].__kwdefaults__["initial_backoff"] == 0.02 and not warnings_logged(caplog)
