"""torchvision's ResNet-18 in its CIFAR form, and CIFAR-10 or padded Fashion-MNIST."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def build_model() -> nn.Module:
    """ResNet-18 (11.2M parameters) with a 3x3 stem and no max-pool, as usual for 32x32 images."""
    model = resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def _dataset(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir and (Path(data_dir) / "cifar-10-batches-py").is_dir():
        from torchvision.datasets import CIFAR10

        data = CIFAR10(data_dir, train=train, download=False)
        x = torch.from_numpy(data.data).permute(0, 3, 1, 2).float().div(255)
        mean, std = torch.tensor([0.491, 0.482, 0.447]), torch.tensor([0.247, 0.243, 0.262])
        return (x - mean[:, None, None]) / std[:, None, None], torch.tensor(data.targets)
    prefix = "train" if train else "t10k"
    images = FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"no CIFAR-10 in data-dir {data_dir!r} and no Fashion-MNIST in {FASHION_MNIST}")
    x = torch.from_numpy(_idx(images).copy()).float().div(255).sub(0.2860).div(0.3530)
    x = F.pad(x, (2, 2, 2, 2)).unsqueeze(1).repeat(1, 3, 1, 1)  # 28x28 grey -> 3x32x32
    return x, torch.from_numpy(_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))


def load_train(partition_id: int, num_partitions: int, data_dir: str, per_node: int,
               batch_size: int) -> DataLoader:
    """This node's shuffled slice of the training set (IID)."""
    x, y = _dataset(data_dir, True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
    share = min(per_node, len(y) // num_partitions)
    idx = order[partition_id * share:(partition_id + 1) * share]
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch_size, shuffle=True)


def test_set(data_dir: str, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _dataset(data_dir, False)
    return x[:samples], y[:samples]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(x[i:i + 250]) for i in range(0, len(y), 250)])
    return {"accuracy": float((logits.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(logits, y))}
