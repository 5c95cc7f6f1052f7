"""Where the window is, and which node trains it, at each hop (pure, no Flower).

Window position and node rotation advance independently. Left alone they can
lock together: a serpentine over 4 positions has period 6, and with 6 (or 3, or
2) nodes in fixed order a node would meet the same positions forever. The fixed
order therefore shifts its starting node by one after every ``lcm(nodes, period)``
hops; the shuffled order draws a fresh permutation of the nodes every cycle.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from functools import lru_cache

SWEEPS = ("serpentine", "forward")
ORDERS = ("fixed", "shuffle", "capacity")


def serpentine_schedule(num_positions: int, window: int, sweep: str = "serpentine") -> list[int]:
    """Window start offsets over one period of the sweep.

    ``serpentine`` goes first to last and back (``0 1 2 3 2 1`` for 4 positions of
    width 1); ``forward`` restarts at the first position (``0 1 2 3``).
    """
    if sweep not in SWEEPS:
        raise ValueError(f"sweep: {sweep!r} is not one of {', '.join(SWEEPS)}")
    if not 1 <= window <= num_positions:
        raise ValueError(f"window: {window} does not fit in {num_positions} segments")
    last = num_positions - window
    forward = list(range(last + 1))
    if sweep == "forward" or last == 0:
        return forward
    return forward + list(range(last - 1, 0, -1))


class SnakeSchedule:
    """The window and the node of every hop (hops count from 0).

    Parameters
    ----------
    segments : Sequence[str]
        All segment names of the model, input to output.
    window : int
        Number of contiguous segments trained per hop (extras not counted).
    sweep : str
        ``"serpentine"`` or ``"forward"``.
    order : str
        ``"fixed"`` (the caller's stable node order, anti-aliased), ``"shuffle"`` (new permutation
        every cycle through the nodes, seeded) or ``"capacity"`` (fixed, over nodes the caller
        sorted fastest first).
    train_head, train_stem : bool
        Train the last (first) segment in every window; it then leaves the sweep.
    seed : int
        Seed of the shuffled order.
    """

    def __init__(self, segments: Sequence[str], window: int, *, sweep: str = "serpentine",
                 order: str = "shuffle", train_head: bool = True, train_stem: bool = False,
                 seed: int = 0) -> None:
        if order not in ORDERS:
            raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
        self.segments = list(segments)
        self.stem = self.segments[:1] if train_stem else []
        self.head = self.segments[-1:] if train_head else []
        self.body = self.segments[len(self.stem):len(self.segments) - len(self.head)]
        self.offsets = serpentine_schedule(len(self.body), window, sweep)
        self.window, self.order, self.seed = window, order, seed

    def sized_window_at(self, hop: int, size: int) -> list[str]:
        """The window of ``size`` segments that covers ``hop``'s position (``window = "auto"``).

        The position is that of a one-segment sweep (build the schedule with ``window=1``),
        so windows of every size follow the same snake; a window that would run past the
        last segment ends there instead.
        """
        if not 1 <= size <= len(self.body):
            raise ValueError(f"window: {size} does not fit in {len(self.body)} segments")
        start = min(self.offsets[hop % self.period], len(self.body) - size)
        return self.stem + self.body[start:start + size] + self.head

    @property
    def period(self) -> int:
        """Hops after which the window position repeats."""
        return len(self.offsets)

    def window_at(self, hop: int) -> list[str]:
        """Segments trained at ``hop``, in model order (extras included)."""
        start = self.offsets[hop % self.period]
        return self.stem + self.body[start:start + self.window] + self.head

    def node_at(self, hop: int, ordered: Sequence[int]) -> int:
        """The node that trains at ``hop``, among the known nodes in their stable order."""
        if not ordered:
            raise ValueError("no nodes to schedule")
        count = len(ordered)
        if self.order in ("fixed", "capacity"):
            shift = hop // math.lcm(count, self.period)
            return ordered[(hop + shift) % count]
        cycle, slot = divmod(hop, count)
        return ordered[node_permutation(cycle, count, self.seed)[slot]]


@lru_cache(maxsize=4)
def node_permutation(cycle: int, count: int, seed: int) -> Sequence[int]:
    """The shuffled order's permutation of ``count`` nodes for one cycle (seeded).

    Cached: every hop of a cycle reads the same permutation, which at 10,000 nodes
    takes longer to draw (about 4 ms) than the rest of the server's share of a hop;
    held as 4-byte integers (a tuple of Python ints takes 36 bytes a node).
    """
    permutation = list(range(count))
    random.Random(f"{seed}:{cycle}:{count}").shuffle(permutation)
    return array("I", permutation)
