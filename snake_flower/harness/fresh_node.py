"""The measured node as a deployed SuperNode runs it: a fresh ClientApp process per message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict

from snake_flower.harness.node_process import NodeProcess


class FreshNode:
    """One node whose every train message runs in a fresh process (``NodeProcess``), as a
    deployed SuperNode starts one ``flwr-clientapp`` per message; its state directory
    (in ``spec["node_config"]``) is all that lasts from one message to the next.

    A rank query is answered by the same ClientApp in this process: it reads the node
    config and holds no model, so it is not measured.

    Parameters
    ----------
    spec : dict[str, Any]
        What ``measure_node`` needs (``NodeProcess``).
    workdir : Path
        Where the message files and each process's log go.
    timeout : float
        Seconds a process may take to start, and to answer its message.
    """

    def __init__(self, spec: dict[str, Any], workdir: Path, timeout: float) -> None:
        self.spec, self.workdir, self.timeout = spec, Path(workdir), timeout
        self.hops: list[dict[str, Any]] = []  # per train message: NodeProcess's figures and its baseline

    def handle(self, message: Message) -> RecordDict | Error:
        """The node's reply to ``message`` (its content, or its error)."""
        if message.metadata.message_type == MessageType.QUERY:
            from snake_flower.client_app import app

            context = Context(run_id=self.spec["run_id"], node_id=self.spec["node_id"],
                              node_config=self.spec["node_config"], state=RecordDict(), run_config={})
            return app(message, context).content
        node = NodeProcess(self.spec, self.workdir, self.timeout)
        try:
            content = node.handle(message)
            self.hops.append({**node.hops[-1], "baseline_rss_bytes": node.baseline_rss_bytes,
                              "baseline_anon_bytes": node.baseline_anon_bytes})
        finally:
            node.close()
        return content
