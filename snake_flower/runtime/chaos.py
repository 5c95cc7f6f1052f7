"""Fault injection for chaos runs in simulation: nodes that crash, and a node that leaves.

``fail-rate`` makes a node's ClientApp raise before it trains (Flower turns that
into an error reply), drawn from a seeded stream per (round, partition) so that a
chaos run is reproducible. ``crash-round`` makes the process of the node that trains
that round die on the spot, as an out-of-memory kill or a segfault would (in the Ray
simulation: its actor). ``leave-round``/``leave-partition`` make one node vanish
for good: from that round on, the Grid no longer lists it and drops its replies,
as if its machine went away mid-hop (the server waits out ``hop-timeout``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore import log

from snake_flower.runtime.metering import ForwardingGrid


CRASH_EXIT_CODE = 137  # what an out-of-memory kill (SIGKILL) leaves


class InjectedFailure(RuntimeError):
    """The crash that ``fail-rate`` injects."""


def maybe_fail(config: Mapping[str, Any], partition_id: int) -> None:
    """Raise :class:`InjectedFailure` with probability ``fail-rate`` (seeded per round and node);
    at round ``crash-round``, end this process at once."""
    if int(config.get("crash-round", 0)) == int(config.get("server-round", -1)) > 0:
        log(WARNING, "chaos: partition %d's process dies at round %s (crash-round)", partition_id,
            config["server-round"])
        os._exit(CRASH_EXIT_CODE)
    rate = float(config.get("fail-rate", 0.0))
    if rate > 0:
        draw = random.Random(f"fail:{config['seed']}:{config['server-round']}:{partition_id}").random()
        if draw < rate:
            raise InjectedFailure(f"injected failure (fail-rate {rate:g}) at round "
                                  f"{config['server-round']}, partition {partition_id}")


class ChaosGrid(ForwardingGrid):
    """A Grid from which the node holding ``partition`` disappears at ``leave_round``.

    The node is known by its partition id, which it reports as its rank (Snake's
    query) and with every train reply, so the wrapper reads the replies passing through.
    The round is read from the ``server-round`` of the train messages sent.
    """

    def __init__(self, grid: Grid, leave_round: int, partition: int) -> None:
        super().__init__(grid)
        self.leave_round, self.partition = leave_round, partition
        self.partition_of: dict[int, int] = {}
        self.gone: set[int] = set()

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return [node for node in self.grid.get_node_ids() if node not in self.gone]

    def get_nodes(self):  # noqa: ANN201, D102
        return [node for node in self.grid.get_nodes() if node.node_id not in self.gone]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward; the first train message of ``leave_round`` or later makes the node leave."""
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN and "config" in msg.content.config_records:
                if int(msg.content["config"].get("server-round", 0)) >= self.leave_round:
                    self._leave()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward, dropping what the departed node sends; learn partitions from the replies."""
        replies = []
        for msg in self.grid.pull_messages(message_ids):
            node = msg.metadata.src_node_id
            if not msg.has_error():  # Snake's rank query, or any train reply's partition-id
                for record in msg.content.metric_records.values():
                    for key in ("rank", "partition-id"):
                        if key in record:
                            self.partition_of[node] = int(record[key])
            if node not in self.gone:
                replies.append(msg)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Not used: :class:`snake_flower.runtime.metering.MeteredGrid` wraps this Grid and polls it."""
        raise NotImplementedError("wrap ChaosGrid in MeteredGrid")

    def _leave(self) -> None:
        nodes = [node for node, part in self.partition_of.items() if part == self.partition]
        for node in set(nodes) - self.gone:
            self.gone.add(node)
            log(WARNING, "chaos: node %d (partition %d) leaves for good", node, self.partition)
