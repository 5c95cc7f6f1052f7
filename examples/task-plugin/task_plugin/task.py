"""A task plugin: ``task = "task_plugin.task:make_task"`` in a run-config.

``snake-flower run`` and ``compare`` call the factory, which returns a ``snake_flower.Task``:
how to build the model, how to load the data. ``segment_names=None`` lets
``segment_model`` cut the model (nested names such as ``stages.1.0``); the run seeds the
weights, splits the training set among the nodes with its ``partitioner`` and evaluates
on the test set, exactly as for the built-in tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snake_flower import Task
from snake_flower.tasks.data import load_fashion_mnist, load_synthetic


class Block(nn.Module):
    """A residual block: conv, BatchNorm, ReLU, conv, BatchNorm, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem, two stages of two residual blocks, pooled linear head (any input size)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(Block(width), Block(width)) for _ in range(2)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_task() -> Task:
    """Fashion-MNIST (``data-dir``, else Debian's copy) on the tiny ResNet."""
    return Task(name="tiny-resnet-fashion-mnist", segment_names=None, build=TinyResNet, load=load_fashion_mnist)


def make_synthetic_task() -> Task:
    """Generated 8x8 images on a narrower tiny ResNet: seconds per hop, for tests and a first try."""
    return Task(name="tiny-resnet-synthetic", segment_names=None, build=lambda: TinyResNet(width=8),
                load=load_synthetic)
