"""Data loading (IDX, offline errors) and Flower Datasets partitioning."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from snake_flower.config import resolve
from snake_flower.tasks.data import (
    DataError,
    _partitions,
    iid_partitions,
    load_fashion_mnist,
    partition_from_config,
    partition_indices,
    preload_partition,
    read_idx,
)

LABELS = torch.arange(2000) % 10


def test_iid_partitions_are_equal_and_disjoint():
    parts = [partition_indices(LABELS, "iid", 4, i) for i in range(4)]
    assert [len(p) for p in parts] == [500] * 4
    assert len(np.unique(np.concatenate(parts))) == 2000


@pytest.mark.parametrize("examples,partitions", [(2000, 4), (1203, 10), (57, 4), (10, 10)])
def test_iid_partitions_are_flower_datasets_own(examples, partitions):
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    flower = IidPartitioner(num_partitions=partitions)
    flower.dataset = Dataset.from_dict({"index": list(range(examples))})
    ours = iid_partitions(examples, partitions)
    assert len(ours) == partitions
    for i, part in enumerate(ours):
        assert part.dtype == np.int64 and part.tolist() == flower.load_partition(i)["index"]


@pytest.mark.parametrize("partitioner,nodes", [("dirichlet", 201), ("iid", 2001), ("pathological", 2001)])
def test_too_few_examples_for_the_partitions_is_a_data_error(partitioner, nodes):
    with pytest.raises(DataError, match=f"partitioner {partitioner}: 2000 training examples are too few"):
        partition_indices(LABELS, partitioner, nodes, 0)


def test_the_cli_says_so_in_one_line_before_any_simulation(capsys):
    from snake_flower import cli

    # the synthetic task has 1200: 1000 Dirichlet partitions of at least 10 cannot be cut
    assert cli.main(["run", "--run-config", "task=synthetic", "--num-supernodes", "1000"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("snake-flower: error: partitioner dirichlet: 1200 training examples") \
        and "\n" not in printed and "at most 120 nodes" in printed


def test_dirichlet_is_seeded_skewed_and_covers_everything():
    parts = [partition_indices(LABELS, "dirichlet", 5, i, alpha=0.3, seed=1) for i in range(5)]
    again = [partition_indices(LABELS, "dirichlet", 5, i, alpha=0.3, seed=1) for i in range(5)]
    other = partition_indices(LABELS, "dirichlet", 5, 0, alpha=0.3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], other)
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    shares = [np.bincount(LABELS[p].numpy(), minlength=10) / len(p) for p in parts]
    assert max(s.max() for s in shares) > 0.2  # far from the IID 0.1


def test_pathological_gives_k_classes_each():
    for i in range(5):
        part = partition_indices(LABELS, "pathological", 5, i, classes_per_partition=2, seed=0)
        assert len(np.unique(LABELS[part].numpy())) <= 2


def test_partition_id_out_of_range():
    with pytest.raises(DataError, match="partition-id"):
        partition_indices(LABELS, "iid", 4, 4)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (6, 28, 28)), np.arange(6) % 10
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    x, y, xt, yt = load_fashion_mnist(str(tmp_path))
    assert x.shape == (6, 1, 28, 28) and y.tolist() == labels.tolist() and xt.shape == x.shape


def test_missing_data_dir_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="no Fashion-MNIST IDX files"):
        load_fashion_mnist(str(tmp_path))


def test_offline_without_local_copy_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("snake_flower.tasks.data.DEBIAN_FASHION_MNIST", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    load_fashion_mnist.cache_clear()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("")
    load_fashion_mnist.cache_clear()


def test_partition_keys_are_all_a_partition_reads():
    from snake_flower.config import DEFAULTS
    from snake_flower.tasks.data import PARTITION_KEYS, partition_from_config

    labels = torch.arange(200) % 10
    only = {key: DEFAULTS[key] for key in PARTITION_KEYS}  # a KeyError if it reads any other key
    assert list(partition_from_config(labels, only, 4, 1)) == list(partition_from_config(labels, DEFAULTS, 4, 1))


def test_preloaded_partitions_are_the_ones_a_node_then_cuts(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 255, (60, 28, 28)), np.arange(60) % 10
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    config = resolve({"data-dir": str(tmp_path), "partitioner": "iid"})
    _partitions.cache_clear()
    assert preload_partition(config, 3, 1)
    assert not preload_partition({**config, "task": "synthetic"}, 3, 1)  # generated by torch: nothing to read
    x, y, _, _ = load_fashion_mnist(str(tmp_path))
    hits = _partitions.cache_info().hits
    assert partition_from_config(y, config, 3, 1).tolist() == partition_indices(y, "iid", 3, 1).tolist()
    assert _partitions.cache_info().hits == hits + 2  # both found what the preload cut
    expected = (torch.from_numpy(images.astype(np.float32) / 255.0) - 0.2860) / 0.3530
    assert torch.equal(x[:, 0], expected)  # the same tensors as reading the files in one go
