"""The model and the data: a small CNN of our own, Fashion-MNIST or synthetic images."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


class Net(nn.Module):
    """A plain CNN, not an ``nn.Sequential`` of segments: ``segment_model`` cuts it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def _dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "synthetic":  # ten noisy class templates: learnable in a few steps, no files
        gen = torch.Generator().manual_seed(0 if split == "train" else 1)
        templates = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(7))
        y = torch.randint(0, 10, (4000 if split == "train" else 1000,), generator=gen)
        return templates[y] + 0.8 * torch.randn(len(y), 1, 28, 28, generator=gen), y
    prefix = "train" if split == "train" else "t10k"
    images, labels = FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"no Fashion-MNIST in {FASHION_MNIST} (apt-get install dataset-fashion-mnist), "
                                f"or run with --run-config \"dataset='synthetic'\"")
    x = torch.from_numpy(_idx(images).copy()).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
    return x, torch.from_numpy(_idx(labels).astype(np.int64))


def load_train(partition_id: int, num_partitions: int, dataset: str, per_node: int,
               batch_size: int = 32) -> DataLoader:
    """This node's shuffled slice of the training set (IID)."""
    x, y = _dataset(dataset, "train")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
    share = min(per_node, len(y) // num_partitions)
    idx = order[partition_id * share:(partition_id + 1) * share]
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch_size, shuffle=True)


def test_set(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _dataset(dataset, "test")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(x[i:i + 1000]) for i in range(0, len(y), 1000)])
    return {"accuracy": float((logits.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(logits, y))}
