"""snake_flower: Snake Learning (sequential, layer-window training) as a Flower plugin.

The public API:

- ``segment_model(model)``: cut any PyTorch model into contiguous segments;
- ``SnakeStrategy(segments, window)``: the Flower strategy (server side);
  ``SnakeStrategy(..., gate=MergeGate(loss_fn, tolerance))`` rolls back merges that raise the
  loss on the server's held-out data (docs/reliability.md, "Gated merges");
- ``make_client_app(model_fn, train_data_fn)``: the Flower ClientApp (node side), for
  Snake and FedAvg alike;
- ``train_window(model, window, data)``: one hop's training, for your own ``@app.train``;
- ``Task``: what a ``task = "package.module:factory"`` plugin returns to ``snake-flower``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snake_flower.node import make_client_app
    from snake_flower.segments import segment_model
    from snake_flower.tasks.base import Task
    from snake_flower.training.loop import train_window
    from strategies import MergeGate, SnakeStrategy

__all__ = ["MergeGate", "SnakeStrategy", "Task", "make_client_app", "segment_model", "train_window"]

# Imported when first used: a node's SuperNode process (``snake-flower supernode``) imports this
# package but needs neither torch nor datasets, which would add about 600 MiB to it.
_HOMES = {"make_client_app": "snake_flower.node", "segment_model": "snake_flower.segments",
          "Task": "snake_flower.tasks.base", "train_window": "snake_flower.training.loop",
          "MergeGate": "strategies", "SnakeStrategy": "strategies"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'snake_flower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
