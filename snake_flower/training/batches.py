"""Where a hop's batches come from: tensors in a seeded order, or the user's own loader.

``train_window`` takes either. Tensors ``(x, y)`` are drawn in an order seeded per visit
(``visit_seed``), so that every strategy draws the same batches at the same round and
split learning can draw batch ``t`` again one message later. Any other iterable is a
loader (a ``DataLoader``, a list of batches) and keeps its own order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

INPUT_KEYS = ("img", "image", "pixel_values", "x", "inputs", "input")
LABEL_KEYS = ("label", "labels", "y", "target", "targets", "fine_label")


def is_tensor_pair(data: Any) -> bool:
    """Whether ``data`` is ``(x, y)``, two tensors with one row per example."""
    return (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            and len(data[0]) == len(data[1]))


def visit_seed(seed: int, server_round: int) -> int:
    """The batch-order seed of one visit: equal rounds draw equal batches in every strategy."""
    return int(seed) * 100_003 + int(server_round)


def num_batches(n: int, batch_size: int, steps: int, epochs: int) -> int:
    """How many batches a visit trains: ``steps`` when > 0, else ``epochs`` passes over ``n``."""
    return steps if steps > 0 else epochs * -(-n // batch_size)


def tensor_batches(n: int, batch_size: int, steps: int, epochs: int,
                   gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of a visit's batches: reshuffled passes over ``n`` examples, drawn from ``gen``."""
    if n == 0:
        raise ValueError("train data: this node's partition holds no example")
    total, done = num_batches(n, batch_size, steps, epochs), 0
    while done < total:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if done == total:
                return
            yield idx
            done += 1


def visit_batches(n: int, batch_size: int, steps: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Index tensors of every batch of one visit, drawn exactly as ``train_window`` draws them.

    Split learning needs batch ``t`` again one message later (the node recomputes its
    forward pass), so it redraws the visit's batches from the same seed.
    """
    return list(tensor_batches(n, batch_size, steps, epochs, torch.Generator().manual_seed(seed)))


def loader_batches(loader: Iterable, steps: int, epochs: int) -> Iterator:
    """A loader's batches: ``steps`` of them when > 0 (the loader restarts as needed), else
    ``epochs`` passes."""
    if steps <= 0:
        for _ in range(epochs):
            yield from loader
        return
    done = 0
    while done < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done == steps:
                return
        if empty:
            raise ValueError("train data: the loader yielded no batch")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a batch: a tuple or list (first two items), or a dict as Flower
    Datasets loaders give (``{"img": ..., "label": ...}``; see ``INPUT_KEYS``/``LABEL_KEYS``)."""
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if inputs is None or labels is None:
            raise ValueError(f"train data: a dict batch needs an input key ({', '.join(INPUT_KEYS)}) and a "
                             f"label key ({', '.join(LABEL_KEYS)}); got {sorted(batch)[:5]}")
        return inputs, labels
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"train data: expected batches of (inputs, labels), got a {type(batch).__name__}")
