"""Which node goes next: the connected nodes in a stable order, and turns over them.

Node ids are random per run, so sorting them would make the chain of visits, and
the final model, differ between two runs with the same seed. Each new node is asked
once (a ``query`` message) for its ``rank`` (the app answers with its partition id).
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from .schedule import ORDERS, node_permutation


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The connected nodes, once there are at least ``count`` (polling every second)."""
    while len(nodes := list(grid.get_node_ids())) < count:
        log(INFO, "waiting for %d nodes (have %d)", count, len(nodes))
        time.sleep(1.0)
    return nodes


def ordered_nodes(grid: Grid, ranks: MutableMapping[int, float], *, min_nodes: int = 1,
                  query_timeout: float = 60.0, configrecord_key: str = "config") -> list[int]:
    """Connected nodes sorted by their reported rank (ties and silent nodes by id).

    Parameters
    ----------
    grid : Grid
        Where the nodes are.
    ranks : MutableMapping[int, float]
        Ranks known so far, updated in place; a node that does not answer gets ``inf``
        (ordered after the others) and is not asked again.
    min_nodes : int (default: 1)
        Wait (polling every second) until this many nodes are connected.
    query_timeout : float (default: 60.0)
        Seconds to wait for new nodes to report their rank.
    configrecord_key : str (default: "config")
        Key of the ``ConfigRecord`` in the query message.
    """
    nodes = wait_for_nodes(grid, min_nodes)
    new = [node for node in nodes if node not in ranks]
    if new:
        asks = [Message(RecordDict({configrecord_key: ConfigRecord({"ask": "rank"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in new]
        for reply in grid.send_and_receive(asks, timeout=query_timeout):
            if not reply.has_error():
                for record in reply.content.metric_records.values():
                    if "rank" in record:
                        ranks[reply.metadata.src_node_id] = float(record["rank"])
        for node in new:
            ranks.setdefault(node, float("inf"))
    return sorted(nodes, key=lambda node: (ranks[node], node))


def round_robin(turn: int, ordered: Sequence[int], order: str = "fixed", seed: int = 0) -> int:
    """The node whose turn it is (turns count from 0); every node once per cycle.

    ``"fixed"`` walks the stable order; ``"shuffle"`` draws the same seeded
    permutation per cycle as :class:`strategies.schedule.SnakeSchedule`, so with equal
    seeds two strategies visit the nodes in the same sequence.
    """
    if order not in ORDERS:
        raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
    if not ordered:
        raise ValueError("no nodes to schedule")
    cycle, slot = divmod(turn, len(ordered))
    if order == "fixed":
        return ordered[slot]
    return ordered[node_permutation(cycle, len(ordered), seed)[slot]]
