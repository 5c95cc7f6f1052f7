"""ClientApp of the built-in tasks (and of ``task = "package.module:factory"`` plugins).

The node itself is ``make_client_app`` (``node.py``), the same one a plugin user builds:
this module only hands it the built-in tasks' model, segments and data, each chosen by
the hop's config (``task``, ``seed``, the partitioner keys). Split learning's node side
answers on the same app, as message type ``train.split``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context
from torch import nn

from snake_flower.node import make_client_app
from snake_flower.node_settings import node_settings
from snake_flower.split_client import train_split
from snake_flower.tasks.data import partition_from_config
from snake_flower.tasks.task import build_model, swept_segment_keys, task_for


def task_model(config: Mapping[str, Any]) -> nn.Module:
    """The task's model with the run's seeded initial weights; it carries the task's ``align``."""
    task = task_for(config)
    model = build_model(task, int(config["seed"]))
    if task.align is not None:  # an LLM predicts every answer token (train_window reads this)
        model.snake_align = task.align
    return model


task_model.snake_meta_build = True  # a node with a full copy builds it on the meta device (node.py)


def task_segments(model: nn.Module, config: Mapping[str, Any]) -> dict[str, list[str]]:
    """The segments the server sweeps: every segment but the ``frozen-segments``."""
    return swept_segment_keys(model, config)


def task_data(context: Context, config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's partition as ``(x, y)`` tensors: ``train_window`` draws them in the visit's
    seeded order. The data directory is the node's own ``--node-config data-dir`` when it
    states one (a deployed node), else the run-config's."""
    settings = node_settings(context.node_config)
    partition_id, num_partitions = settings.partition()
    data_dir = settings.data_dir_or(str(config["data-dir"]))
    task = task_for(config)
    x_train, y_train, _, _ = task.load(data_dir)
    labels = task.partition_by(data_dir) if task.partition_by else y_train
    idx = partition_from_config(labels, config, num_partitions, partition_id)
    return x_train[idx], y_train[idx]


app = make_client_app(task_model, task_data, segments=task_segments)
app.train("split")(train_split)
