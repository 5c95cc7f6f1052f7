"""Fixtures: the real ClientApp run in-process behind a LoopbackGrid (no Ray)."""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, RecordDict

from snake_flower.client_app import app as client_app


class InProcessNodes:
    """``n`` nodes running the project's ClientApp (or ``app``), each with its own ``context.state``."""

    def __init__(self, n: int, first_id: int = 1000, app=client_app) -> None:  # noqa: ANN001
        self.app = app
        self.contexts = {first_id + 7 * i: Context(run_id=1, node_id=first_id + 7 * i,
                                                   node_config={"partition-id": i, "num-partitions": n},
                                                   state=RecordDict(), run_config={})
                         for i in range(n)}
        self.tamper = None  # optional (content, node_id) -> content

    def __call__(self, msg) -> RecordDict | Error:
        node = msg.metadata.dst_node_id
        sent = msg.content  # Flower hands each node its own copy: the node may release its records
        msg.content = RecordDict(dict(sent.items()))
        try:
            content = self.app(msg, self.contexts[node]).content
        except Exception as err:  # a crashing ClientApp becomes an error reply, as in Flower
            return Error(code=1, reason=f"{type(err).__name__}: {err}")
        finally:
            msg.content = sent
        return self.tamper(content, node) if self.tamper else content


@pytest.fixture
def nodes():
    return InProcessNodes
