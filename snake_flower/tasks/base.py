"""What every task is: a model builder, its segment order and where its data comes from.

Its own module so that the task registry (``tasks.task``) and the tasks it loads lazily
(``tasks.llm_data``) both import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from snake_flower.tasks import data


@dataclass(frozen=True)
class Task:
    """What a run trains: model, segment order and data.

    The built-in tasks are ``Task`` objects, and so is a plugin: ``task =
    "package.module:factory"`` in a run-config calls ``factory()``, which returns a ``Task``
    (docs/own-model.md, "Your own task in snake-flower run and compare"). A run seeds the weights
    (``seed``), builds the model with ``build()``, splits ``load(data_dir)``'s training
    set among the nodes with the run's ``partitioner`` and evaluates on its test set.
    """

    name: str
    segment_names: tuple[str, ...] | None
    """The model's top-level children, in order, each a segment; ``None``: the segments
    ``snake_flower.segment_model(model)`` finds (nested, dotted names)."""
    build: Callable[[], nn.Module]
    """Builds the model (weights are seeded by the caller); ``model(x)`` gives logits."""
    load: Callable[[str], data.Split]
    """``load(data_dir) -> (x_train, y_train, x_test, y_test)``, tensors; ``y`` class ids."""
    align: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    """``align(outputs, y) -> (logits, labels)``, one row per prediction (an LLM: one per
    answer token); ``None`` when ``model(x)`` already gives one row per label."""
    partition_by: Callable[[str], torch.Tensor] | None = None
    """``partition_by(data_dir)``: the per-example labels partitioners split by
    (an LLM: topics); ``None`` for ``y_train``."""
    max_eval_batch: int = 0
    """Caps ``eval-batch-size`` when > 0 (an LLM's logits are batch x tokens x vocab)."""
