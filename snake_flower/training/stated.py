"""The capacities a node states in its ``--node-config``: checked without torch.

A node's SuperNode process checks its ``--node-config`` when it starts (``snake-flower
supernode``) and imports nothing of the training stack for it; ``capacity.py`` turns what
is stated here into a node's ``Capacity``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

KEYS = ("compute", "memory-budget-mb", "link-mbps")


def reported_capacity(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The capacity keys a node states in its ``--node-config`` (possibly none), checked.

    Raises ``ValueError`` (one line, naming the key) for a value that is not a finite
    number, a ``compute`` or ``link-mbps`` that is not > 0, or a negative memory budget.
    """
    stated = {}
    for key in (k for k in KEYS if k in metrics):
        try:
            value = float(metrics[key])
        except (TypeError, ValueError):
            raise ValueError(f"node-config: {key} must be a number, got {metrics[key]!r}") from None
        lowest_ok = 0.0 if key == "memory-budget-mb" else math.nextafter(0.0, 1.0)
        if not math.isfinite(value) or value < lowest_ok:
            bound = ">= 0 (0 = no limit)" if key == "memory-budget-mb" else "> 0"
            raise ValueError(f"node-config: {key} must be {bound}, got {metrics[key]!r}")
        stated[key] = value
    return stated
