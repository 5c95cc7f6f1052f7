"""Data: offline-first loading and Flower Datasets partitioning.

Fashion-MNIST is resolved in order: an explicit ``data-dir``, Debian's
``dataset-fashion-mnist`` package, then the Hugging Face hub through the
``datasets`` library when online. Otherwise a ``DataError`` says how to get it.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value
from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
HUB_FASHION_MNIST = "zalando-datasets/fashion_mnist"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(RuntimeError):
    """The data set cannot be found; the message says how to get it."""


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


FASHION_MNIST_MEAN, FASHION_MNIST_STD = np.float32(0.2860), np.float32(0.3530)


def _normalized(images: np.ndarray) -> np.ndarray:
    """uint8 images as normalised float32 ``(N, 1, H, W)``, in NumPy.

    Float32 arithmetic with float32 constants, which gives the same bits as torch's
    ``(x / 255 - 0.2860) / 0.3530`` on a float32 tensor (``tests/.../test_data.py``).
    """
    scaled = images.astype(np.float32) / np.float32(255.0)
    return ((scaled - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)[:, None]


@lru_cache(maxsize=2)
def fashion_mnist_arrays(data_dir: str = "") -> tuple[np.ndarray, ...] | None:
    """Local Fashion-MNIST as NumPy ``(x_train, y_train, x_test, y_test)``, images
    normalised as ``load_fashion_mnist`` gives them; ``None`` if there is no local copy.

    No torch op runs here, so a process that forks others (``deploy/warm_node.py``) can
    read, decompress and normalise the files once for all of them: a forked process
    then wraps these arrays in tensors without copying them.
    """
    directory = Path(data_dir) if data_dir else Path(DEBIAN_FASHION_MNIST)
    paths = [_find_idx(directory, stem) for stem in IDX_FILES]
    if not all(paths):
        return None
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    return _normalized(xtr), ytr.astype(np.int64), _normalized(xte), yte.astype(np.int64)


@lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: str = "") -> Split:
    """Return ``(x_train, y_train, x_test, y_test)`` as normalised tensors.

    The tensors share memory with ``fashion_mnist_arrays``' cached arrays.
    """
    arrays = fashion_mnist_arrays(data_dir)
    if arrays is not None:
        return tuple(torch.from_numpy(array) for array in arrays)  # type: ignore[return-value]
    if data_dir:
        raise DataError(f"data-dir {data_dir}: no Fashion-MNIST IDX files ({', '.join(IDX_FILES)})")
    return _load_fashion_mnist_from_hub()


def _load_fashion_mnist_from_hub() -> Split:
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    how = ("install Debian's package (apt-get install dataset-fashion-mnist) or point data-dir "
           "at a folder with the four IDX files")
    if offline:
        raise DataError(f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} and the hub is offline: {how}")
    try:
        from datasets import load_dataset
        hub = load_dataset(HUB_FASHION_MNIST)
    except Exception as err:  # any network or hub failure means the same thing to the user
        raise DataError(f"Fashion-MNIST not found locally and the hub failed ({type(err).__name__}): {how}") from None
    split = [_normalized(np.stack([np.asarray(im) for im in hub[s]["image"]])) for s in ("train", "test")]
    return (torch.from_numpy(split[0]), torch.tensor(hub["train"]["label"]),
            torch.from_numpy(split[1]), torch.tensor(hub["test"]["label"]))


@lru_cache(maxsize=1)
def load_cifar_shaped(data_dir: str = "") -> Split:
    """CIFAR-10 from ``data-dir`` (torchvision's layout); else Fashion-MNIST as 3x32x32.

    No registry serves CIFAR-10, so by default VGG-11 trains on Fashion-MNIST padded to
    32x32 and repeated to three channels: the same code path as CIFAR-10.
    """
    if data_dir and (Path(data_dir) / "cifar-10-batches-py").is_dir():
        from torchvision.datasets import CIFAR10

        parts = [CIFAR10(data_dir, train=train, download=False) for train in (True, False)]
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
        xs = [(torch.from_numpy(p.data).permute(0, 3, 1, 2).float() / 255.0 - mean) / std for p in parts]
        ys = [torch.tensor(p.targets) for p in parts]
        return xs[0], ys[0], xs[1], ys[1]
    x_train, y_train, x_test, y_test = load_fashion_mnist(data_dir)
    pad = torch.nn.functional.pad
    return (pad(x_train, (2, 2, 2, 2)).repeat(1, 3, 1, 1), y_train,
            pad(x_test, (2, 2, 2, 2)).repeat(1, 3, 1, 1), y_test)


@lru_cache(maxsize=2)
def load_synthetic(data_dir: str = "", train: int = 1200, test: int = 300) -> Split:
    """Ten noisy 8x8 prototypes: a small, learnable data set generated in memory."""
    del data_dir
    gen = torch.Generator().manual_seed(1234)
    prototypes = torch.randn(10, 1, 8, 8, generator=gen)
    labels = torch.arange(train + test) % 10
    x = prototypes[labels] + 0.8 * torch.randn(train + test, 1, 8, 8, generator=gen)
    return x[:train], labels[:train], x[train:], labels[train:]


def load_synthetic_large(data_dir: str = "") -> Split:
    """The synthetic set with 160,000 training examples: 16 per node at 10,000 nodes (41 MB),
    two full batches of 8, as every node of a smaller federation draws."""
    return load_synthetic(data_dir, 160_000, 300)


def partition_indices(labels: torch.Tensor, partitioner: str, num_partitions: int,
                      partition_id: int, *, alpha: float = 0.5, classes_per_partition: int = 2,
                      seed: int = 42) -> np.ndarray:
    """Indices of one partition, chosen by a Flower Datasets partitioner."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    return _partitions(tuple(labels.tolist()), partitioner, num_partitions, alpha,
                       classes_per_partition, seed)[partition_id]


PARTITION_KEYS = ("partitioner", "dirichlet-alpha", "classes-per-partition", "seed", "validation-size")
"""The run-config keys that decide a partition (``partition_from_config`` reads these)."""


def preload_partition(config: Mapping[str, Any], num_partitions: int, partition_id: int) -> bool:
    """Read local Fashion-MNIST and cut its partitions for ``config``, without a torch op.

    What ``load_fashion_mnist`` and ``partition_from_config`` then find in their caches
    in this process, and in every process forked from it. ``False`` (nothing preloaded)
    for another task or without a local copy.
    """
    if config["task"] != "fashion-mnist" or (arrays := fashion_mnist_arrays(config["data-dir"])) is None:
        return False
    preload_partitions(tuple(arrays[1].tolist()), config, num_partitions, partition_id)
    return True


def preload_partitions(labels: tuple[int, ...], config: Mapping[str, Any], num_partitions: int,
                       partition_id: int) -> None:
    """Cut the partitions of ``labels`` for ``config`` into ``partition_indices``'s cache."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    _partitions(labels, config["partitioner"], num_partitions, float(config["dirichlet-alpha"]),
                int(config["classes-per-partition"]), int(config["seed"]))


def partition_from_config(labels: torch.Tensor, config: Mapping[str, Any], num_partitions: int,
                          partition_id: int) -> np.ndarray:
    """``partition_indices`` with the partitioner settings of a run-config (kebab-case keys).

    With ``validation-size`` > 0 the validation slice is held out first
    (``validation_split``): the partitions share out the rest, so no node trains on it.
    """
    pool = validation_split(labels, config)[0]
    part = partition_indices(labels[pool] if pool is not None else labels, config["partitioner"],
                             num_partitions, partition_id, alpha=float(config["dirichlet-alpha"]),
                             classes_per_partition=int(config["classes-per-partition"]),
                             seed=int(config["seed"]))
    return pool[part] if pool is not None else part


def validation_split(labels: torch.Tensor, config: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray]:
    """``(train pool, validation)`` indices: a seeded slice of ``validation-size`` examples,
    stratified by label, held out of the training data before partitioning.

    ``(None, empty)`` when ``validation-size`` is 0.
    """
    size = int(config.get("validation-size", 0))
    if size == 0:
        return None, np.zeros(0, dtype=np.int64)
    if size >= len(labels):
        raise DataError(f"validation-size: {size} leaves nothing to train on ({len(labels)} training examples)")
    return _holdout(tuple(labels.tolist()), size, int(config["seed"]))


@lru_cache(maxsize=4)
def _holdout(labels: tuple[int, ...], size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    features = Features({"label": ClassLabel(num_classes=max(labels) + 1), "index": Value("int64")})
    table = Dataset.from_dict({"label": list(labels), "index": list(range(len(labels)))}, features=features)
    split = table.train_test_split(test_size=size, stratify_by_column="label", seed=seed)
    return (np.sort(np.asarray(split["train"]["index"], dtype=np.int64)),
            np.sort(np.asarray(split["test"]["index"], dtype=np.int64)))


# Fewest examples a partition may get: Flower Datasets' Dirichlet draws are redrawn until
# every partition has min_partition_size (10 here), and give up with a traceback after ten tries
MIN_PARTITION = {"iid": 1, "dirichlet": 10, "pathological": 1}


def _check_size(num_examples: int, partitioner: str, num_partitions: int) -> None:
    """A one-line ``DataError`` when the data set cannot fill ``num_partitions`` partitions."""
    least = MIN_PARTITION.get(partitioner, 1)
    if num_examples < least * num_partitions:
        raise DataError(f"partitioner {partitioner}: {num_examples} training examples are too few for "
                        f"{num_partitions} partitions of at least {least} (at most {num_examples // least} "
                        f"nodes); use fewer nodes or a larger data set")


def iid_partitions(num_examples: int, num_partitions: int) -> list[np.ndarray]:
    """``IidPartitioner``'s partitions, computed directly: contiguous, the first ones one larger.

    Flower Datasets builds one ``Dataset.shard`` per partition (39 s for 10,000 partitions
    of 120,000 examples); this is the same split in milliseconds.
    """
    return [part.astype(np.int64) for part in np.array_split(np.arange(num_examples), num_partitions)]


@lru_cache(maxsize=4)
def _partitions(labels: tuple[int, ...], partitioner: str, num_partitions: int, alpha: float,
                classes_per_partition: int, seed: int) -> list[np.ndarray]:
    if partitioner == "topic":
        return _by_topic(np.asarray(labels), num_partitions)
    _check_size(len(labels), partitioner, num_partitions)
    if partitioner == "iid":
        return iid_partitions(len(labels), num_partitions)
    if partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=alpha, min_partition_size=10, seed=seed)
    elif partitioner == "pathological":
        part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=classes_per_partition, seed=seed)
    else:
        raise DataError(f"partitioner: unknown partitioner {partitioner!r}")
    part.dataset = Dataset.from_dict({"label": list(labels), "index": list(range(len(labels)))})
    return [np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)]


def _by_topic(topics: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Natural non-IID: every topic whole on one partition, largest topics first, each to
    the partition with the fewest examples so far (the same for every seed)."""
    names, sizes = np.unique(topics, return_counts=True)
    if len(names) < num_partitions:
        raise DataError(f"partitioner topic: {len(names)} topics cannot fill {num_partitions} partitions")
    owner, load = {}, [0] * num_partitions
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], names[i])):
        target = min(range(num_partitions), key=lambda p: (load[p], p))
        owner[names[i]], load[target] = target, load[target] + sizes[i]
    return [np.flatnonzero([owner[t] == p for t in topics]).astype(np.int64) for p in range(num_partitions)]
