"""Concurrent snakes: K hops in flight at once, merged in the order they were sent.

Flower's ``Strategy.start`` runs one round at a time: send, wait for every reply,
aggregate. A Snake hop needs one node, so a run waits on one node at a time. Windows
that share no segment can be trained at once, though: K nodes each train their own
window against the global model as it was sent, and each reply replaces only its own
window. ``HopPipeline`` keeps K hops in flight (``SnakeStrategy(concurrency=K)``):

- hop ``h`` is sent as soon as hop ``h - K`` is merged (the first K at the start), to
  a node that is not training another hop, with a window disjoint from the K - 1
  windows still in flight (the schedule's lanes);
- replies are merged strictly in the order the hops were sent, one round per hop:
  a reply that comes early waits for the hops before it. Which model each hop is sent
  therefore depends only on the merges before it, never on timing, so a seeded run,
  and a resumed one, give the same model;
- a hop's own window cannot change while it is in flight; should a reply's window
  have changed anyway, ``SnakeStrategy.merge`` rejects it as stale instead of
  re-basing it (the global model stays as it was; the hop is lost, not the run).

``evaluate_fn`` is called after every merge (round = hop), as in Flower's loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from .nodes import NoFreeNode
from .reply import full_sync_reason

if TYPE_CHECKING:
    from .snake import SnakeStrategy

FIRST_POLL_S = 0.002  # replies are pulled after 2 ms, then ever less often ...
POLL_S = 0.1  # ... down to every 0.1 s while nothing arrives


@dataclass
class Flight:
    """A hop in flight: its index (from 0), its message and when it times out."""

    hop: int
    message_id: str
    deadline: float


class HopPipeline:
    """Runs a ``SnakeStrategy`` with ``concurrency`` hops in flight.

    Parameters
    ----------
    strategy : SnakeStrategy
        Sends (``dispatch``) and merges (``merge``) the hops; ``strategy.concurrency``
        is how many may be in flight.
    grid : Grid
        Where the nodes are (``push_messages`` and ``pull_messages`` only).
    """

    def __init__(self, strategy: SnakeStrategy, grid: Grid) -> None:
        self.strategy, self.grid = strategy, grid
        self.flights: deque[Flight] = deque()
        self.replies: dict[str, Message] = {}  # arrived, not merged yet (an earlier hop is in flight)
        self.warned: set[str] = set()

    def start(self, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """``Strategy.start``'s contract: ``num_rounds`` hops (rounds), ``timeout`` per hop.

        ``evaluate_config`` is unused: Snake evaluates on the server (``evaluate_fn``).
        """
        strategy, config = self.strategy, train_config if train_config is not None else ConfigRecord()
        log(INFO, "Starting %s strategy with %d hops in flight:", type(strategy).__name__, strategy.concurrency)
        strategy.summary()
        result, arrays = Result(), initial_arrays
        result.arrays = initial_arrays
        if evaluate_fn and (metrics := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = metrics
        first = strategy.round_offset
        end = first + num_rounds
        resends = self._restored(arrays, end)
        sent = first + len(resends)
        for current_round in range(1, num_rounds + 1):
            while len(self.flights) < strategy.concurrency and (resends or sent < end):
                try:
                    merged = first + current_round - 1  # hops merged (or failed) so far
                    if resends:  # before any new hop: replies merge in the order hops were sent
                        hop, moved, rank, versions = resends[0]
                        self._send(hop, merged, moved, config, timeout, rank=rank, versions=versions)
                        resends.popleft()
                    else:
                        self._send(sent, merged, arrays, config, timeout)
                        sent += 1
                except NoFreeNode:  # fewer nodes than hops in flight: wait for one
                    if not self.flights:
                        raise
                    self._warn_once(f"concurrency {strategy.concurrency}: only {len(self.flights)} node(s) free "
                                    "of a hop in flight; fewer hops go out at once")
                    break
            flight = self.flights.popleft()
            reply = self._wait_for(flight)
            hop = strategy.hops[flight.hop]
            if reply is not None and (why := full_sync_reason(reply)) and not hop.get("full_syncs"):
                reply = self._resend_full(flight, why, timeout)  # its node lost its copy
            merged, metrics = strategy.merge(strategy.hops[flight.hop], [reply] if reply else [], arrays)
            if merged is not None:
                arrays = result.arrays = merged
            if metrics is not None:
                result.train_metrics_clientapp[current_round] = metrics
            if evaluate_fn and (metrics := evaluate_fn(current_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[current_round] = metrics
        return result

    def _send(self, hop: int, merged: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float,
              rank: float | None = None, versions: dict[str, int] | None = None) -> None:
        """Send hop ``hop`` (from 0) to a node free of the hops in flight, ``merged`` hops after the start."""
        busy = {self.strategy.hops[flight.hop]["node"] for flight in self.flights}
        message = self.strategy.dispatch(hop, arrays, config, self.grid, busy=busy, rank=rank, versions=versions)
        self.strategy.hops[-1]["sent_after"] = merged  # the network-time model's send time
        [message_id] = self.grid.push_messages([message])
        self.flights.append(Flight(hop, message_id, time.time() + timeout))
        concurrency, nodes = self.strategy.concurrency, len(self.strategy.chain.connected)
        if concurrency > 1 and nodes == concurrency:
            # hop h goes out when hop h - K merged, and its node is then the only free one:
            # it trained lane h mod K before and trains it again, never another lane
            self._warn_once(f"concurrency {concurrency} on {nodes} nodes: each node trains the same "
                            "layers at every hop; keep fewer hops in flight than nodes")

    def _resend_full(self, flight: Flight, why: str, timeout: float) -> Message | None:
        """``flight``'s hop again with every segment, to its node; its reply (``None``: timed out)."""
        message = self.strategy.resend_full(self.strategy.hops[flight.hop], why)
        [message_id] = self.grid.push_messages([message])
        return self._wait_for(Flight(flight.hop, message_id, time.time() + timeout))

    def _warn_once(self, why: str) -> None:
        if why not in self.warned:
            self.warned.add(why)
            log(WARNING, why)

    def _restored(self, arrays: ArrayRecord, end: int
                  ) -> deque[tuple[int, ArrayRecord, float | None, dict[str, int]]]:
        """Hops in flight at the checkpoint, to send again first: each with the model it was
        first sent, to the node of the same rank (whose copy is unknown now: it gets every
        segment) if that node is connected and free."""
        resends: deque[tuple[int, ArrayRecord, float | None, dict[str, int]]] = deque()
        for hop, moved in self.strategy.restored_flights:
            if hop["round"] > end:  # the resumed run stops before it
                continue
            sent = ArrayRecord({key: moved[key] if key in moved else arrays[key] for key in arrays.keys()})
            log(INFO, "hop %d was in flight at the checkpoint: sent again", hop["round"])
            resends.append((hop["round"] - 1, sent, hop.get("rank"), hop["versions"]))
        self.strategy.restored_flights = []
        return resends

    def _wait_for(self, flight: Flight) -> Message | None:
        """``flight``'s reply, or ``None`` once its deadline passed; later replies are kept."""
        wait = FIRST_POLL_S
        while flight.message_id not in self.replies and time.time() < flight.deadline:
            flights = {f.message_id: f for f in (flight, *self.flights) if f.message_id not in self.replies}
            got = list(self.grid.pull_messages(list(flights)))
            for reply in got:
                message_id = reply.metadata.reply_to_message_id
                if message_id in flights:  # stamp send-to-reply when it arrives, not when merged
                    hop = self.strategy.hops[flights[message_id].hop]
                    hop["seconds"] = time.time() - hop["started"]
                    self.replies[message_id] = reply
            if got:
                wait = FIRST_POLL_S
            elif flight.message_id not in self.replies:
                time.sleep(min(wait, max(0.0, flight.deadline - time.time())))
                wait = min(2 * wait, POLL_S)
        return self.replies.pop(flight.message_id, None)
