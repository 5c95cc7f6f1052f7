"""The measured node's process, seen from the server's side (``snake-flower memory --measure``)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from flwr.app import Error, Message, RecordDict

from snake_flower.harness.message_files import read_message, write_message


class NodeProcessError(RuntimeError):
    """The node's process failed, or did not answer in time (one-line message)."""


class NodeProcess:
    """One fresh Python process running the project's ClientApp (``measure_node``).

    Each message goes to it through a file, as Flower's deflated objects
    (``message_files``); it answers with the reply the same way and one JSON line of
    figures (its resident set before and at the peak of the message). ``hops`` keeps
    those figures, with the message's and the reply's bytes, per message in order.

    Parameters
    ----------
    spec : dict[str, Any]
        What ``measure_node.main`` needs (its node's config, model and state directory).
    workdir : Path
        Where the message files go (and the process's log, ``node.log``).
    timeout : float
        Seconds the process may take to start, and to answer one message.
    """

    def __init__(self, spec: dict[str, Any], workdir: Path, timeout: float) -> None:
        self.workdir, self.timeout = Path(workdir), timeout
        self.log = self.workdir / "node.log"
        self._stderr: IO[bytes] = open(self.log, "wb")
        command = [sys.executable, "-m", "snake_flower.harness.measure_node", json.dumps(spec)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr)
        self.hops: list[dict[str, Any]] = []
        started = self._answer("start")
        self.baseline_rss_bytes = int(started["baseline_rss_bytes"])
        self.baseline_anon_bytes = int(started["baseline_anon_bytes"])

    def handle(self, message: Message) -> RecordDict | Error:
        """The node's reply to ``message`` (its content, or its error)."""
        sent, received = self.workdir / "message.bin", self.workdir / "reply.bin"
        message_bytes = write_message(message, sent)
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"message": str(sent), "reply": str(received)}) + "\n").encode())
        self.process.stdin.flush()
        figures = self._answer(f"message {message.metadata.message_type}")
        reply, reply_bytes = read_message(received)
        received.unlink()
        self.hops.append({**figures, "message_type": message.metadata.message_type,
                          "message_bytes": message_bytes, "reply_bytes": reply_bytes,
                          "config": dict(next(iter(message.content.config_records.values()), {})),
                          "reply": reply})
        return reply.error if reply.has_error() else reply.content

    def close(self) -> None:
        """End the process (it exits when its input closes) and close its log."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()  # our own child, by its handle
            self.process.wait()
        finally:
            self._stderr.close()

    def _answer(self, what: str) -> dict[str, Any]:
        """The process's next JSON line, or a ``NodeProcessError`` naming its last log line."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            if not ready:
                self.process.kill()
            self.process.wait()
            self._stderr.flush()
            lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
            why = lines[-1].strip() if lines else ("no answer within the timeout" if not ready else "no output")
            raise NodeProcessError(f"the node's process failed at {what}: {why} (log: {self.log})")
        return json.loads(line)
