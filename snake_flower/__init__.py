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

from snake_flower.node import make_client_app
from snake_flower.segments import segment_model
from snake_flower.tasks.base import Task
from snake_flower.training.loop import train_window
from strategies import MergeGate, SnakeStrategy

__all__ = ["MergeGate", "SnakeStrategy", "Task", "make_client_app", "segment_model", "train_window"]
