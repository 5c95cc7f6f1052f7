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
    """What a run trains: model, segment order and data."""

    name: str
    segment_names: tuple[str, ...]
    build: Callable[[], nn.Sequential]
    load: Callable[[str], data.Split]
    """``load(data_dir) -> (x_train, y_train, x_test, y_test)``."""
    align: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    """``align(outputs, y) -> (logits, labels)``, one row per prediction (an LLM: one per
    answer token); ``None`` when ``model(x)`` already gives one row per label."""
    partition_by: Callable[[str], torch.Tensor] | None = None
    """``partition_by(data_dir)``: the per-example labels partitioners split by
    (an LLM: topics); ``None`` for ``y_train``."""
    max_eval_batch: int = 0
    """Caps ``eval-batch-size`` when > 0 (an LLM's logits are batch x tokens x vocab)."""
