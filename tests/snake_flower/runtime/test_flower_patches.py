"""The simulation engine's quicker message pickup: same messages, same order, less waiting."""

from __future__ import annotations

import threading
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api

from snake_flower.runtime.dispatch import MAX_WAIT, add_messages_to_queue_quickly, quick_pickup


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
    assert max(stop.waits) == MAX_WAIT < 0.1  # Flower's loop always waits 0.1 s


def test_quick_pickup_replaces_the_engines_loop(monkeypatch):
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert quick_pickup()
    assert vce_api.add_messages_to_queue is add_messages_to_queue_quickly
