"""The chain: connected nodes in a stable order, listed again now and then, joins and leaves.

Node ids are random per run; the chain follows the ranks nodes report (``nodes.ordered_nodes``),
or, in a large federation, the node ids while ranks are learnt from replies
(``nodes.discovers_lazily``). Listing is O(nodes), so a large chain is listed again only every
``nodes.relist_interval`` hops, and after a failed hop; ``NodeChain.list_s`` says how long the
last hop spent listing them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log

from .fitting import WindowFitter
from .nodes import discovers_lazily, ordered_nodes, relist_interval, wait_for_nodes


class NodeChain:
    """The nodes a ``SnakeStrategy`` visits, in chain order.

    Parameters
    ----------
    min_nodes : int
        Nodes that must be connected before the first hop.
    query_timeout : float
        Seconds to wait for new nodes to report their rank.
    rank_discovery : str
        ``"all"``, ``"lazy"`` or ``"auto"`` (see :func:`strategies.nodes.discovers_lazily`).
    fitter : WindowFitter | None
        Capacities: with ``auto``, nodes no window fits are screened out; with
        ``by_capacity``, the fastest node goes first.
    auto, by_capacity : bool
        ``window = "auto"``; ``order = "capacity"``. Either needs every node's report.
    configrecord_key : str
        Key of the ``ConfigRecord`` in the rank query.
    on_leave : Callable[[int], None]
        Called for each node that left (its copy is unknown should it come back).
    """

    def __init__(self, *, min_nodes: int, query_timeout: float, rank_discovery: str,
                 fitter: WindowFitter | None, auto: bool, by_capacity: bool, configrecord_key: str,
                 on_leave: Callable[[int], None]) -> None:
        self.needs_every_rank = auto or by_capacity
        discovers_lazily(rank_discovery, 0, self.needs_every_rank)  # refuses a bad setting now
        self.min_nodes, self.query_timeout, self.rank_discovery = min_nodes, query_timeout, rank_discovery
        self.fitter, self.auto, self.by_capacity = fitter, auto, by_capacity
        self.configrecord_key, self.on_leave = configrecord_key, on_leave
        self.membership: list[dict[str, Any]] = []  # nodes that joined or left, per round
        self._lazy: bool | None = None  # decided at the first hop
        self.list_s: float | None = None  # seconds the last ``nodes`` call spent listing (None: none)
        self.reset()

    def reset(self) -> None:
        """Forget every node (node ids change when a run resumes): the next call lists them anew."""
        self.ranks: dict[int, float] = {}  # stable order of nodes, reported by them
        self.connected: set[int] = set()
        self._listed: list[int] = []  # the connected nodes as last listed, in chain order
        self._relist_at = 0  # the hop that lists them again (see strategies.nodes.relist_interval)

    def relist(self) -> None:
        """List the nodes again at the next hop (a node may have left)."""
        self._relist_at = 0

    def nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Connected nodes in chain order; joins and leaves are logged and recorded."""
        first = not self.connected  # a resumed run waits for its nodes again, too
        wait = self.min_nodes if first else 1
        listed = first or server_round - 1 >= self._relist_at
        self.list_s = None
        if listed:
            began = time.perf_counter()
            self._listed = self._list(grid, wait)
            self.list_s = time.perf_counter() - began  # the rank query of new nodes included
            self._relist_at = server_round - 1 + relist_interval(len(self._listed))
        nodes = self._listed
        if self.auto:
            assert self.fitter is not None
            nodes = self.fitter.screen(nodes, self.ranks)
        if self.by_capacity:
            assert self.fitter is not None
            nodes = self.fitter.by_capacity(nodes, self.ranks)
        if listed or self.needs_every_rank:  # else the chain is as it was
            self._note_membership(nodes, server_round)
        return nodes

    def _list(self, grid: Grid, wait: int) -> list[int]:
        """The connected nodes, asked of the grid, in a stable order (asking new nodes their rank)."""
        if self._lazy is None:
            self._lazy = discovers_lazily(self.rank_discovery, max(wait, len(list(grid.get_node_ids()))),
                                          self.needs_every_rank)
            if self._lazy:
                log(INFO, "SnakeStrategy: ranks learnt from replies, not asked (rank discovery %s); the "
                    "chain follows node ids, which differ from run to run", self.rank_discovery)
        if self._lazy:
            return sorted(wait_for_nodes(grid, wait))
        return ordered_nodes(grid, self.ranks, min_nodes=wait, query_timeout=self.query_timeout,
                             configrecord_key=self.configrecord_key,
                             info=self.fitter.info if self.fitter is not None else None)

    def _note_membership(self, nodes: list[int], server_round: int) -> None:
        """Log and record the nodes that joined or left since the last listing."""
        joined, left = set(nodes) - self.connected, self.connected - set(nodes)
        if self.connected and (joined or left):
            self.membership.append({"round": server_round, "joined": sorted(joined), "left": sorted(left)})
            log(INFO, "hop %d: %d node(s) joined, %d left; %d in the chain",
                server_round, len(joined), len(left), len(nodes))
        for node in left:
            self.on_leave(node)
        self.connected = set(nodes)
