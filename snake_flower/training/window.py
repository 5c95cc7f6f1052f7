"""Train a window of segments of any model from a ``DataLoader`` (the public, low-level helper).

``make_client_app`` (``snake_flower.node``) calls this for every hop; a user who writes
their own ``@app.train`` calls it directly. The built-in tasks train through
``training.loop``, which draws its batches from tensors with a seeded order of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snake_flower.segments import segment_model
from snake_flower.training.loop import distillation_loss, freeze_outside_keys


def window_param_keys(segments: Mapping[str, Sequence[str]], window: Iterable[str]) -> set[str]:
    """The ``state_dict`` keys of ``window``'s segments; an unknown name raises ``ValueError``."""
    window = list(window)
    unknown = [name for name in window if name not in segments]
    if unknown:
        raise ValueError(f"window: segments {unknown[:3]} are not among this model's "
                         f"{len(segments)} segments ({', '.join(list(segments)[:4])}, ...)")
    return {key for name in window for key in segments[name]}


INPUT_KEYS = ("img", "image", "pixel_values", "x", "inputs", "input")
LABEL_KEYS = ("label", "labels", "y", "target", "targets", "fine_label")


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


def _batches(loader: Iterable, steps: int, epochs: int) -> Iterator:
    if steps > 0:
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
    else:
        for _ in range(epochs):
            yield from loader


def train_window(model: nn.Module, window: Iterable[str], loader: Iterable, *,
                 segments: Mapping[str, Sequence[str]] | None = None, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 0.0, local_steps: int = 0,
                 local_epochs: int = 1, clip_norm: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 2.0) -> dict[str, float]:
    """Train the ``window`` segments of ``model`` in place, every other segment frozen.

    Parameters
    ----------
    model : nn.Module
        The node's model, holding the values the server sent; it maps a batch's inputs to
        logits (``model(inputs)``, cross-entropy against the labels).
    window : Iterable[str]
        Names of the segments to train.
    loader : Iterable
        Batches of ``(inputs, labels)``, e.g. a ``torch.utils.data.DataLoader``, or dicts
        such as ``{"img": ..., "label": ...}`` from Flower Datasets (see ``split_batch``).
    segments : Mapping[str, Sequence[str]] | None
        Segment name -> ``state_dict`` keys; ``None`` means ``segment_model(model)``.
    lr, momentum, weight_decay : float
        SGD, a fresh optimizer for the window alone.
    local_steps, local_epochs : int
        ``local_steps > 0`` trains that many batches (the loader restarts as needed);
        otherwise ``local_epochs`` passes over the loader.
    clip_norm : float
        Clip the window's gradient to this L2 norm (0: no clipping). Training one window
        against frozen, randomly initialised neighbours can kill ReLUs without it.
    kd_weight, kd_temperature : float
        Knowledge distillation from the model as received (0: plain cross-entropy).

    Returns
    -------
    dict[str, float]
        ``train-loss`` (mean over steps), ``steps`` and ``num-examples`` (examples seen).
    """
    segments = segments if segments is not None else segment_model(model)
    window = list(window)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        return _train(model, window, loader, segments, lr, momentum, weight_decay, local_steps,
                      local_epochs, clip_norm, kd_weight, kd_temperature)
    finally:  # the caller's requires_grad flags, as they were
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _train(model: nn.Module, window: list[str], loader: Iterable, segments: Mapping[str, Sequence[str]],
           lr: float, momentum: float, weight_decay: float, local_steps: int, local_epochs: int,
           clip_norm: float, kd_weight: float, kd_temperature: float) -> dict[str, float]:
    params = freeze_outside_keys(model, window_param_keys(segments, window))
    if not params:
        raise ValueError(f"window {window}: no trainable parameter in it")
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if kd_weight > 0 else None
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, steps, examples = 0.0, 0, 0
    for batch in _batches(loader, local_steps, local_epochs):
        inputs, labels = split_batch(batch)
        logits = model(inputs)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(inputs)
            loss = distillation_loss(logits, target, labels, kd_weight, kd_temperature)
        else:
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm > 0:
            nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        total += loss.item()
        steps += 1
        examples += len(labels)
    model.eval()
    return {"train-loss": total / max(steps, 1), "steps": float(steps), "num-examples": float(examples)}
