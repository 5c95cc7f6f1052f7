"""Heterogeneous nodes: their capacities, the windows that fit them, the network time.

A node has a relative ``compute`` speed (1.0 sustains ``REFERENCE_GFLOPS``), a
``memory-budget-mb`` (0 = no limit) and a ``link-mbps``. A deployed node states them
in its ``--node-config``; in simulation a seeded ``capacity-profile`` draws them per
partition. ``window = "auto"`` gives each node, at each hop, the largest window at the
snake's position whose memory ledger fits its budget and whose estimated compute time
fits ``hop-deadline-s``. Both are estimated on the server by one real training step of
the candidate window on a batch of the task's inputs: the ledger exactly as a node
measures it, the floating-point operations by ``torch.utils.flop_counter``; both are
deterministic, so a seeded run picks the same windows every time.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from snake_flower.tasks.task import segment_keys
from snake_flower.training.loop import Align, LocalWork, train_window
from snake_flower.training.stated import KEYS, reported_capacity  # noqa: F401  (re-exported)

# compute = 1.0: the FLOP rate one hop of the small Fashion-MNIST CNN sustained on the
# 2-core development machine (29-47 GFLOP/s measured, depending on the window).
REFERENCE_GFLOPS = 40.0
PROFILES = ("uniform", "mixed")


@dataclass(frozen=True)
class Capacity:
    """What one node can do."""

    compute: float = 1.0
    memory_budget_mb: float = 0.0  # 0 = no limit
    link_mbps: float = 100.0

    def as_dict(self) -> dict[str, float]:
        """The run-config spelling (``compute``, ``memory-budget-mb``, ``link-mbps``)."""
        return {"compute": self.compute, "memory-budget-mb": self.memory_budget_mb,
                "link-mbps": self.link_mbps}


def profile_capacity(profile: str, rank: int, num_nodes: int, seed: int, full_ledger_mb: float) -> Capacity:
    """The seeded capacity of the node of ``rank`` (its partition id) among ``num_nodes``.

    ``uniform``: every node alike (compute 1, no memory limit, 100 Mbit/s). ``mixed``:
    compute spread evenly on a log scale over 0.25-2.0 (8x), memory budgets over
    0.25-1.0 of what training the whole model takes (4x) and links over 5-100 Mbit/s,
    each dealt to the nodes by its own seeded permutation.
    """
    if profile not in PROFILES:
        raise ValueError(f"capacity-profile: {profile!r} is not one of {', '.join(PROFILES)}")
    if profile == "uniform" or num_nodes <= 1:
        return Capacity()

    def level(what: str) -> float:  # this node's place, 0..1, in a seeded permutation
        order = list(range(num_nodes))
        random.Random(f"{seed}:{what}:{num_nodes}").shuffle(order)
        return order.index(int(rank) % num_nodes) / (num_nodes - 1)

    return Capacity(compute=round(0.25 * 8 ** level("compute"), 4),
                    memory_budget_mb=round(full_ledger_mb * (0.25 + 0.75 * level("memory")), 4),
                    link_mbps=round(5.0 * 20 ** level("link"), 4))


def node_capacity(reported: Mapping[str, Any], rank: float, profile: str, seed: int,
                  num_nodes: int, full_ledger_mb: float) -> Capacity:
    """What a node stated in its node-config, else its share of the ``capacity-profile``.

    A node that never reported its rank has no share: it gets the uniform capacity.
    """
    if not math.isfinite(rank):
        base = Capacity()
    else:
        base = profile_capacity(profile, int(rank), num_nodes, seed, full_ledger_mb)
    return Capacity(compute=float(reported.get("compute", base.compute)),
                    memory_budget_mb=float(reported.get("memory-budget-mb", base.memory_budget_mb)),
                    link_mbps=float(reported.get("link-mbps", base.link_mbps)))


def compute_s(metrics: Mapping[str, Any]) -> float:
    """A node visit's measured compute: its CPU seconds (older results: wall seconds).

    CPU time, not wall time: the runs share a 2-core machine, and a node's wall time
    also counts the time it waited for a core, which depends on what else ran.
    """
    return float(metrics.get("train-cpu-seconds", metrics.get("train-seconds", 0.0)))


def transfer_s(nbytes: float, capacity: Capacity) -> float:
    """Seconds to move ``nbytes`` over the node's link."""
    return 8.0 * nbytes / (capacity.link_mbps * 1e6)


def hop_time_s(train_s: float, nbytes: float, capacity: Capacity) -> float:
    """The network-time model of one node visit: compute scaled by speed, plus transfer."""
    return train_s / capacity.compute + transfer_s(nbytes, capacity)


class WindowSizer:
    """Memory ledger and step FLOPs of candidate windows, measured once each on the server.

    Parameters
    ----------
    model : nn.Module
        The task's model (copied, never changed).
    x, y : torch.Tensor
        One batch of the task's inputs and labels (``batch-size`` rows).
    work : LocalWork
        A node visit's local work (its ``steps`` > 0 when ``deadline_s`` is set). With
        ``kd_weight`` > 0 (the run distils) a node also holds the window as received and one
        batch of teacher outputs, and the ledger counts them.
    deadline_s : float (default: 0.0)
        ``hop-deadline-s``: the longest estimated compute time of a hop (0: no limit).
    align : Align | None (default: None)
        The task's ``align`` (an LLM predicts every answer token).

    The model is copied for each measurement only: its values may change between them
    (the server evaluates into it), but ledgers and FLOPs depend on shapes alone.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, work: LocalWork,
                 deadline_s: float = 0.0, align: Align | None = None) -> None:
        self.model, self.x, self.y, self.align = model, x, y, align
        self.work = replace(work, steps=1)  # one step measures the ledger and a step's FLOPs
        self.steps = work.steps  # hop-deadline-s > 0 requires local-steps > 0
        self.deadline = deadline_s
        self._cache: dict[tuple[str, ...], tuple[float, float]] = {}

    def measure(self, window: list[str]) -> tuple[float, float]:
        """``(ledger total MB, FLOPs of one step)`` of training ``window``."""
        key = tuple(window)
        if key not in self._cache:
            model = copy.deepcopy(self.model)
            with FlopCounterMode(display=False) as flops:
                ledger = train_window(model, window, (self.x, self.y), segments=segment_keys(model),
                                      work=self.work, seed=0, align=self.align)
            self._cache[key] = (ledger["total-bytes"] / 1e6, float(flops.get_total_flops()))
        return self._cache[key]

    def step_flops(self, window: list[str]) -> float:
        """FLOPs of one local step training ``window`` (with the teacher's forward when the run distils)."""
        return self.measure(window)[1]

    def estimated_s(self, window: list[str], capacity: Capacity) -> float:
        """Estimated local compute seconds of a hop training ``window`` on this node."""
        _, flops = self.measure(window)
        return self.steps * flops / (capacity.compute * REFERENCE_GFLOPS * 1e9)

    def misfit(self, window: list[str], capacity: Capacity) -> str | None:
        """Why ``window`` does not fit the node, or ``None`` if it does."""
        ledger_mb, _ = self.measure(window)
        if capacity.memory_budget_mb > 0 and ledger_mb > capacity.memory_budget_mb:
            return f"ledger {ledger_mb:.2f} MB exceeds memory-budget-mb {capacity.memory_budget_mb:g}"
        seconds = self.estimated_s(window, capacity)
        if self.deadline > 0 and seconds > self.deadline:
            return (f"estimated {seconds:.2f} s at compute {capacity.compute:g} exceeds "
                    f"hop-deadline-s {self.deadline:g}")
        return None


def bottom_step_flops(bottom: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one split-learning step on the node: the bottom's forward (sent), its forward
    again (recomputed when the gradients come back) and its backward."""
    model = copy.deepcopy(bottom).train()
    with FlopCounterMode(display=False) as flops:
        with torch.no_grad():
            model(x)
        out = model(x)
        out.backward(torch.ones_like(out))
    return float(flops.get_total_flops())


class NodeCapacities:
    """``capacity(rank, reported)`` for a run: stated capacities first, then the profile.

    Parameters
    ----------
    profile : str
        The run's ``capacity-profile`` (``uniform``, ``mixed``).
    seed : int
        Seeds the profile's draws.
    num_nodes : int
        Partitions the profile deals capacities over, when a node does not say.
    sizer : WindowSizer
        Measures the whole model's ledger: the mixed profile's memory budgets are
        fractions of it (measured once, when first needed).
    segments : list[str]
        Every segment of the model.
    """

    def __init__(self, profile: str, seed: int, num_nodes: int, sizer: WindowSizer,
                 segments: list[str]) -> None:
        self.profile, self.seed, self.num_nodes, self.sizer, self.segments = profile, seed, num_nodes, sizer, segments

    def full_ledger_mb(self) -> float:
        """Ledger of training every segment (a FedAvg node's), in MB."""
        return self.sizer.measure(self.segments)[0]

    def __call__(self, rank: float, reported: Mapping[str, Any]) -> Capacity:
        needs_profile = self.profile != "uniform" and any(k not in reported for k in KEYS)
        # the profile deals capacities over the partitions: the node knows how many there are
        num_nodes = int(reported.get("num-partitions", self.num_nodes))
        return node_capacity(reported, rank, self.profile, self.seed, num_nodes,
                             self.full_ledger_mb() if needs_profile else 0.0)
