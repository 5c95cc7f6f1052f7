"""Shared fixtures: an in-process Grid that answers messages with a handler.

``LoopbackGrid`` stands in for Flower's Grid without Ray or a SuperLink: each
pushed message is answered at once by ``handler(message) -> RecordDict | Error``
(or dropped when the handler returns ``None``, as a vanished node would).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
torch.set_num_threads(1)  # tiny models: threads only add contention on 2 cores

Handler = Callable[[Message], "RecordDict | Error | None"]


@pytest.fixture(autouse=True)
def _node_state_in_tmp(tmp_path_factory, monkeypatch):
    """Every test's nodes keep their copies (``node_store.py``) in a directory of their own,
    never in the user's cache: in-process nodes share one run id across tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


class ServerStopped(Exception):
    """Raised by ``LoopbackGrid.stopping_at``: the server dies there."""


class LoopbackGrid(Grid):
    """A Grid whose nodes are a Python function."""

    Stopped = ServerStopped

    @classmethod
    def stopping_at(cls, server_round: int) -> type[LoopbackGrid]:
        """This grid, but the server dies (``ServerStopped``) as it sends hop ``server_round``."""

        class Stopping(cls):
            def push_messages(self, messages):  # noqa: ANN001, ANN202
                messages = list(messages)
                if any(m.content.config_records["config"].get("server-round") == server_round
                       for m in messages if "config" in m.content.config_records):
                    raise ServerStopped
                return super().push_messages(messages)

        return Stopping

    def __init__(self, node_ids: Iterable[int], handler: Handler) -> None:
        self.node_ids = list(node_ids)
        self.handler = handler
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def set_run(self, run):  # noqa: ANN001, D102
        pass

    @property
    def run(self):  # noqa: ANN201, D102
        return None

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201, D102
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:  # noqa: D102
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            answer = self.handler(msg)
            if answer is not None:
                self._replies[msg.metadata.message_id] = Message(answer, reply_to=msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:  # noqa: D102
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def loopback() -> type[LoopbackGrid]:
    """The LoopbackGrid class, for tests to build with their own handler."""
    return LoopbackGrid
