"""Which node goes next: the connected nodes in a stable order, and turns over them.

Node ids are random per run, so sorting them would make the chain of visits, and
the final model, differ between two runs with the same seed. Each new node is asked
once (a ``query`` message) for its ``rank`` (the app answers with its partition id).

Asking costs one message per node, all awaited before the first hop: a large
federation (10,000 simulated nodes) would wait for every answer to train one node.
``discovers_lazily`` says when to skip the query: the chain then walks the node ids
(random per run) and learns a node's rank from its first reply (``rank_in``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from .schedule import ORDERS, node_permutation

# The first query waits this many query timeouts: the whole chain order rests on every
# starting node's rank, and a node's first message waits for it to start (a Ray actor
# or a ClientApp process importing torch), which a loaded machine can stretch past a minute.
FIRST_QUERY_PATIENCE = 5


RANK_DISCOVERIES = ("auto", "all", "lazy")
LAZY_ABOVE = 256  # "auto" asks every node up to this many (a reproducible chain), lazily above
RELIST_SHARE = 256  # n connected nodes are listed again every n // RELIST_SHARE hops (at least every hop)
POLL_S = 0.1  # while waiting for nodes to connect (the simulation registers 10,000 in about a second)


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The connected nodes, once there are at least ``count`` (polling every ``POLL_S``, logging each second)."""
    polls = 0
    while len(nodes := list(grid.get_node_ids())) < count:
        if polls % round(1 / POLL_S) == 0:
            log(INFO, "waiting for %d nodes (have %d)", count, len(nodes))
        time.sleep(POLL_S)
        polls += 1
    return nodes


def relist_interval(num_nodes: int) -> int:
    """Hops between two listings of the connected nodes: every hop up to 511 nodes, n // 256 above.

    Listing is O(n) in Flower's in-memory state (about 20 ms at 10,000 nodes, a third of a
    short hop); every n / 256 hops its share of a hop stays the same at any size. Meanwhile
    a node that left fails its hop (and the next hop lists again) and one that joined waits
    at most that many hops for its first turn.
    """
    return max(1, num_nodes // RELIST_SHARE)


def ordered_nodes(grid: Grid, ranks: MutableMapping[int, float], *, min_nodes: int = 1,
                  query_timeout: float = 60.0, configrecord_key: str = "config",
                  info: MutableMapping[int, dict[str, float]] | None = None) -> list[int]:
    """Connected nodes sorted by their reported rank (ties and silent nodes by id).

    Parameters
    ----------
    grid : Grid
        Where the nodes are.
    ranks : MutableMapping[int, float]
        Ranks known so far, updated in place; a node that does not answer gets ``inf``
        (ordered after the others) and is not asked again. While it is empty (the first
        call) the query waits ``FIRST_QUERY_PATIENCE`` times longer.
    min_nodes : int (default: 1)
        Wait (polling every second) until this many nodes are connected.
    query_timeout : float (default: 60.0)
        Seconds to wait for new nodes to report their rank.
    configrecord_key : str (default: "config")
        Key of the ``ConfigRecord`` in the query message.
    info : MutableMapping[int, dict[str, float]] | None (default: None)
        Filled with whatever else each node reported beside its rank (its capacities).
    """
    nodes = wait_for_nodes(grid, min_nodes)
    new = [node for node in nodes if node not in ranks]
    if new:
        timeout = query_timeout * (1 if ranks else FIRST_QUERY_PATIENCE)
        asks = [Message(RecordDict({configrecord_key: ConfigRecord({"ask": "rank"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in new]
        errored: set[int] = set()
        for reply in grid.send_and_receive(asks, timeout=timeout):
            if reply.has_error():  # e.g. a malformed --node-config: say so, not just "silent"
                errored.add(reply.metadata.src_node_id)
                log(WARNING, "node %d answered the rank query with an error (it goes last, ordered by its "
                    "id; its ClientApp needs an @app.query() that replies with a MetricRecord holding "
                    "'rank'): %s",
                    reply.metadata.src_node_id, (reply.error.reason.strip().splitlines() or [""])[-1][:300])
            else:
                for record in reply.content.metric_records.values():
                    if "rank" in record:
                        ranks[reply.metadata.src_node_id] = float(record["rank"])
                        if info is not None:
                            info[reply.metadata.src_node_id] = {k: float(v) for k, v in record.items()
                                                                if k != "rank"}
        for node in new:
            if node not in ranks:
                if node not in errored:
                    log(WARNING, "node %d stayed silent: no rank within %.0f s (or a reply without "
                        "'rank'); it goes last, ordered by its id (which differs from run to run)",
                        node, timeout)
                ranks[node] = float("inf")
    return sorted(nodes, key=lambda node: (ranks[node], node))


def discovers_lazily(setting: str, num_nodes: int, needs_every_rank: bool) -> bool:
    """Whether the chain skips the rank query (``"lazy"``), decided at the first hop.

    Parameters
    ----------
    setting : str
        ``"all"`` asks every node before the first hop; ``"lazy"`` asks none; ``"auto"``
        asks every node unless more than ``LAZY_ABOVE`` are connected.
    num_nodes : int
        Nodes connected (or awaited) at the first hop.
    needs_every_rank : bool
        The order or the windows rest on every node's reported capacity (``order =
        "capacity"``, ``window = "auto"``): then every node is asked, whatever the size.
    """
    if setting not in RANK_DISCOVERIES:
        raise ValueError(f"rank_discovery: {setting!r} is not one of {', '.join(RANK_DISCOVERIES)}")
    if setting == "lazy" and needs_every_rank:
        raise ValueError("rank_discovery: 'lazy' cannot order by capacity nor fit auto windows "
                         "(both need every node's report before the first hop)")
    return setting == "lazy" or (setting == "auto" and not needs_every_rank and num_nodes > LAZY_ABOVE)


def rank_in(reported: Mapping[str, Any]) -> float | None:
    """The rank a node's reply states (``rank``, else ``partition-id``), if any."""
    rank = reported.get("rank", reported.get("partition-id"))
    return None if rank is None else float(rank)


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
    if order in ("fixed", "capacity"):  # a baseline keeps the rank order under "capacity"
        return ordered[slot]
    return ordered[node_permutation(cycle, len(ordered), seed)[slot]]


class NoFreeNode(RuntimeError):
    """Every connected node is training a hop in flight (fewer nodes than ``concurrency``)."""


class NodeBackoff:
    """Nodes that failed a hop sit out a while: ``base`` hops, doubling per failure in a row.

    Parameters
    ----------
    base : int (default: 2)
        Hops a node sits out after its first failure (0 = never back off).
    cap : int (default: 64)
        Longest sit-out, in hops.
    """

    def __init__(self, base: int = 2, cap: int = 64) -> None:
        if base < 0:
            raise ValueError(f"backoff: must be >= 0 hops, got {base}")
        self.base, self.cap = base, cap
        self.until: dict[int, int] = {}  # node -> first hop it may train again
        self.streak: dict[int, int] = {}  # node -> failures in a row

    def failed(self, node: int, hop: int) -> int:
        """Record a failure at ``hop``; return the hops the node now sits out."""
        self.streak[node] = self.streak.get(node, 0) + 1
        wait = 0 if self.base == 0 else min(self.cap, self.base * 2 ** (self.streak[node] - 1))
        self.until[node] = hop + 1 + wait
        return wait

    def succeeded(self, node: int) -> None:
        """A merged hop clears the node's record."""
        self.until.pop(node, None)
        self.streak.pop(node, None)

    def available(self, node: int, hop: int) -> bool:
        """Has ``node`` sat out its time by ``hop``?"""
        return self.until.get(node, 0) <= hop

    def pick(self, hop: int, ordered: Sequence[int], turn: Callable[[int, Sequence[int]], int],
             busy: Collection[int] = ()) -> int:
        """``turn(hop)``'s node, or if it sits out, the node of the nearest later turn that does not.

        When every node sits out, the scheduled node goes anyway: a risky hop beats a stalled run.
        ``busy`` nodes (training a hop in flight) are never picked; the caller leaves one free.
        """
        free = [node for node in ordered if node not in busy]
        if not ordered:  # no node at all is the schedule's error, not a busy federation
            return turn(hop, ordered)
        if not free:
            raise NoFreeNode(f"no free node: all {len(ordered)} are training a hop in flight")
        first_free = None  # the nearest turn's free node: it goes if every free node sits out
        for ahead in range(2 * len(ordered) + 1):  # a shuffled cycle may hide a node for < 2 cycles
            node = turn(hop + ahead, ordered)
            if node in busy:
                continue
            if self.available(node, hop):
                return node
            first_free = node if first_free is None else first_free
        return free[0] if first_free is None else first_free

    def state(self, key: Callable[[int], Any]) -> list[list[Any]]:
        """``[[key(node), until, streak], ...]`` (node ids change between runs; keys need not)."""
        return [[key(node), self.until[node], self.streak[node]] for node in self.until]

    def restore(self, rows: Sequence[Sequence[Any]], node_of: Mapping[Any, int]) -> None:
        """Reload ``state`` rows whose key maps to a node now connected."""
        for key, until, streak in rows:
            if key in node_of:
                self.until[node_of[key]], self.streak[node_of[key]] = int(until), int(streak)
