"""Where the window is, and which node trains it, at each hop (pure, no Flower).

Window position and node rotation advance independently. Left alone they can
lock together: a serpentine over 4 positions has period 6, and with 6 (or 3, or
2) nodes in fixed order a node would meet the same positions forever. The fixed
order therefore shifts its starting node by one after every ``lcm(nodes, period)``
hops; the shuffled order draws a fresh permutation of the nodes every cycle.

Concurrent snakes (``lanes = K``) cut the swept segments into K contiguous lanes, each
with its own serpentine; hop ``h`` trains in lane ``h % K``. K hops in a row therefore
train K disjoint windows spread along the depth, whatever each lane's position.
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
    lanes : int (default: 1)
        Concurrent snakes: the swept segments are cut into this many contiguous lanes (as
        even as possible, each at least ``window`` long), and hop ``h`` trains in lane
        ``h % lanes``, so any ``lanes`` hops in a row have disjoint windows. The head and
        stem extras would be in every window, so they must be off.
    """

    def __init__(self, segments: Sequence[str], window: int, *, sweep: str = "serpentine",
                 order: str = "shuffle", train_head: bool = True, train_stem: bool = False,
                 seed: int = 0, lanes: int = 1) -> None:
        if order not in ORDERS:
            raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
        if lanes < 1:
            raise ValueError(f"concurrency: must be >= 1, got {lanes}")
        if lanes > 1 and (train_head or train_stem):
            raise ValueError(f"concurrency: {lanes} windows at once must be disjoint, but the "
                             f"{'head' if train_head else 'stem'} would be in every one; set "
                             f"train-head=false and train-stem=false")
        self.segments = list(segments)
        self.stem = self.segments[:1] if train_stem else []
        self.head = self.segments[-1:] if train_head else []
        self.body = self.segments[len(self.stem):len(self.segments) - len(self.head)]
        if lanes > 1 and lanes * window > len(self.body):  # one lane: serpentine_schedule says why
            raise ValueError(f"concurrency: {lanes} disjoint windows of {window} segment(s) need "
                             f"{lanes * window} segments to sweep, the model has {len(self.body)}")
        self.lanes = _lanes(len(self.body), lanes)  # (first segment, length) of each lane
        self.lane_offsets = [serpentine_schedule(length, window, sweep) for _, length in self.lanes]
        self.offsets = self.lane_offsets[0]  # one lane: the whole body
        self.window, self.sweep, self.order, self.seed = window, sweep, order, seed

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
        """Hops after which the window positions repeat."""
        if len(self.lanes) == 1:
            return len(self.offsets)
        return len(self.lanes) * math.lcm(*(len(offsets) for offsets in self.lane_offsets))

    def window_at(self, hop: int) -> list[str]:
        """Segments trained at ``hop``, in model order (extras included)."""
        lane, step = hop % len(self.lanes), hop // len(self.lanes)
        offsets = self.lane_offsets[lane]
        start = self.lanes[lane][0] + offsets[step % len(offsets)]
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


def _lanes(num_segments: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous lanes over ``num_segments`` segments, the longer ones first."""
    base, extra = divmod(num_segments, count)
    lengths = [base + (lane < extra) for lane in range(count)]
    return [(sum(lengths[:lane]), length) for lane, length in enumerate(lengths)]


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
