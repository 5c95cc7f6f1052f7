"""Local training of a window of segments (``train_window``, public), and evaluation.

The same ``train_window`` serves every strategy and every node: Snake passes its window,
relay and FedAvg every segment; the built-in tasks and a plugin user's ``make_client_app``
call it alike. Segments outside the window are frozen (no gradient, not in the
optimizer, eval mode for their buffers), so their values are left bit-identical.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snake_flower.segments import segment_model
from snake_flower.training.batches import is_tensor_pair, loader_batches, split_batch, tensor_batches
from snake_flower.training.frozen import hold_frozen_in, resolve_dtype, restore
from snake_flower.training.head_loss import chunk_rows, head_loss, working_bytes
from snake_flower.training.ledger import SavedActivations, memory_ledger  # noqa: F401 (the ledger, as loop gave it)
from snake_flower.training.recompute import recompute_frozen
from snake_flower.training.teacher import ReceivedTeacher

Align = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LocalWork:
    """Everything that defines one visit's local training (equal for all strategies).

    The defaults are ``train_window``'s and ``make_client_app``'s, for plugin users; the
    built-in runs take theirs from the run-config (``config.RunConfig``, the experiment TOMLs).
    """

    epochs: int = 1
    steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 disables clipping
    kd_weight: float = 0.0  # 0 disables distillation
    kd_temperature: float = 2.0
    frozen_dtype: str = "fp32"  # what the frozen parameters are held in while the window trains
    optimizer: str = "sgd"  # "sgd" (with momentum), "adam" (the paper's) or "adamw" (FlowerTune's, via transformers)

    @classmethod
    def from_config(cls, config: dict, kd: bool) -> "LocalWork":
        """Build from a run-config (kebab-case keys); the lr is this visit's (``lr-decay``).

        A message carries ``optimizer`` only when a run sets it (``OPTIONAL_NODE_KEYS``): SGD
        otherwise.
        """
        lr = scheduled_lr(float(config["lr"]), int(config.get("server-round", 1)),
                          int(config.get("lr-rounds", config.get("num-server-rounds", 1))),
                          config.get("lr-decay", "none"), float(config.get("lr-floor", 1.0)))
        return cls(epochs=int(config["local-epochs"]), steps=int(config["local-steps"]),
                   batch_size=int(config["batch-size"]), lr=lr,
                   momentum=float(config["momentum"]), weight_decay=float(config["weight-decay"]),
                   clip_norm=float(config["clip-norm"]),
                   kd_weight=float(config["kd-weight"]) if kd else 0.0,
                   kd_temperature=float(config["kd-temperature"]),
                   frozen_dtype=resolve_dtype(str(config.get("frozen-dtype", "fp32")),
                                              str(config.get("task", ""))),
                   optimizer=str(config.get("optimizer", "sgd")))


def scheduled_lr(lr: float, server_round: int, rounds: int, decay: str = "none",
                 floor: float = 0.1) -> float:
    """The learning rate of round ``server_round`` of ``rounds``.

    ``"cosine"`` falls from ``lr`` at the first round to ``floor * lr`` at the last, so the
    last hops of a chain polish the model instead of tilting it towards the last
    node's classes; ``"none"`` keeps ``lr``.
    """
    if decay == "none" or rounds <= 1:
        return lr
    if decay != "cosine":
        raise ValueError(f"lr-decay: {decay!r} is not one of none, cosine")
    progress = min(1.0, max(0.0, (server_round - 1) / (rounds - 1)))
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def freeze_outside_keys(model: nn.Module, trainable: set[str]) -> list[nn.Parameter]:
    """Freeze every parameter whose ``state_dict`` key is not in ``trainable``; return the rest.

    For segments of any depth (``snake_flower.segment_model``). A module whose state is all
    frozen goes to eval mode with everything inside it (a BatchNorm keeps its statistics, a
    dropout inside a frozen block stays off); the rest of the model trains.
    """
    params = []
    for key, p in model.named_parameters():
        p.requires_grad_(key in trainable)
        if key in trainable:
            params.append(p)
    model.train()
    for prefix, module in model.named_modules():
        state = [f"{prefix}.{n}" if prefix else n
                 for n, _ in itertools.chain(module.named_parameters(), module.named_buffers())]
        if state and not any(key in trainable for key in state):
            module.eval()
    return params


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """(1-λ)·CE + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))."""
    ce = F.cross_entropy(student, labels)
    if weight == 0.0:
        return ce
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1),
                  F.log_softmax(teacher / temperature, dim=-1), log_target=True,
                  reduction="batchmean")
    return (1.0 - weight) * ce + weight * temperature**2 * kl


def window_param_keys(segments: Mapping[str, Sequence[str]], window: Iterable[str]) -> set[str]:
    """The ``state_dict`` keys of ``window``'s segments; an unknown name raises ``ValueError``."""
    window = list(window)
    unknown = [name for name in window if name not in segments]
    if unknown:
        raise ValueError(f"window: segments {unknown[:3]} are not among this model's "
                         f"{len(segments)} segments ({', '.join(list(segments)[:4])}, ...)")
    return {key for name in window for key in segments[name]}


def _identity(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits, y


OPTION_FIELDS = {"local_steps": "steps", "local_epochs": "epochs"}
"""``train_window``'s keyword options that a ``LocalWork`` field holds under another name."""


def local_work(work: LocalWork | None = None, **options: Any) -> LocalWork:
    """``work`` (else the defaults) with ``options`` set, by ``LocalWork`` field or option name."""
    fields = {OPTION_FIELDS.get(name, name): value for name, value in options.items()}
    unknown = sorted(set(fields) - set(LocalWork.__dataclass_fields__))
    if unknown:
        known = sorted({*LocalWork.__dataclass_fields__, *OPTION_FIELDS} - set(OPTION_FIELDS.values()))
        raise TypeError(f"train_window: unknown option {unknown[0]!r} (known: {', '.join(known)})")
    return replace(work or LocalWork(), **fields)


def train_window(model: nn.Module, window: Iterable[str], data: Any, *,
                 segments: Mapping[str, Sequence[str]] | None = None, work: LocalWork | None = None,
                 seed: int = 0, align: Align | None = None, exact: Mapping[str, torch.Tensor] | None = None,
                 **options: Any) -> dict[str, float]:
    """Train the ``window`` segments of ``model`` in place, every other segment frozen.

    The one training function of a hop: ``make_client_app``'s node calls it for every
    strategy (Snake's window, relay's and FedAvg's whole model), and so can your own
    ``@app.train``. Frozen parameters are left bit-identical.

    Parameters
    ----------
    model : nn.Module
        The node's model, holding the values the server sent; ``model(inputs)`` gives logits
        (cross-entropy against the labels), or an LLM's ``head_inputs`` (``chunked_head``).
    window : Iterable[str]
        Names of the segments to train.
    data : tuple[torch.Tensor, torch.Tensor] | Iterable
        ``(x, y)`` tensors, drawn in batches of ``batch_size`` in an order seeded by ``seed``;
        or a loader of ``(inputs, labels)`` batches (a ``DataLoader``, dicts such as
        ``{"img": ..., "label": ...}`` from Flower Datasets; see ``split_batch``) in its own order.
    segments : Mapping[str, Sequence[str]] | None
        Segment name -> ``state_dict`` keys; ``None`` means ``segment_model(model)``.
    work : LocalWork | None
        The local work; ``None`` means ``LocalWork()``'s defaults. ``options`` override it.
    seed : int
        The batch order of tensor data (``batches.visit_seed`` gives a visit's).
    align : Callable | None
        ``align(outputs, y) -> (logits, labels)``, one row per prediction (an LLM predicts
        every answer token); ``None``: ``model.snake_align`` if the model has one, else the
        outputs are the logits.
    exact : Mapping[str, torch.Tensor] | None
        The exact values the node keeps (its stored copy) by ``state_dict`` key: a frozen
        parameter found there is held in ``frozen_dtype`` alone during the hop and restored
        from it; without it the fp32 originals stay alive for the restore.
    **options
        ``LocalWork`` fields by name: ``lr``, ``momentum``, ``weight_decay``, ``local_steps``
        (> 0 trains that many batches, the loader restarting as needed), ``local_epochs``,
        ``batch_size``, ``clip_norm`` (0: no clipping; one window trained against frozen random
        neighbours can kill its ReLUs without it), ``kd_weight`` and ``kd_temperature``
        (distillation from the model as received; 0: plain cross-entropy), ``frozen_dtype``
        and ``optimizer``.

    Returns
    -------
    dict[str, float]
        ``train-loss`` (mean over steps), ``steps``, ``num-examples`` (the partition's size for
        tensors, the examples seen for a loader), ``train-seconds`` and ``train-cpu-seconds``
        (the training: torch's one-time lazy import, ``import_lazy_torch``, is done before the
        clock starts), and the hop's memory ledger (``*-bytes``).
    """
    work = local_work(work, **options)
    segments = segments if segments is not None else segment_model(model)
    keys = window_param_keys(segments, window)
    align = align or getattr(model, "snake_align", None) or _identity
    if is_tensor_pair(data):
        x, y = data
        gen = torch.Generator().manual_seed(seed)
        batches = ((x[idx], y[idx]) for idx in tensor_batches(len(y), work.batch_size, work.steps, work.epochs, gen))
        examples = len(y)
    else:
        batches = (split_batch(batch) for batch in loader_batches(data, work.steps, work.epochs))
        examples = None
    import_lazy_torch()  # before the clock: a one-time import, not training
    start, cpu = time.perf_counter(), time.process_time()
    flags = [p.requires_grad for p in model.parameters()]
    params = freeze_outside_keys(model, keys)
    if not params:
        raise ValueError(f"window {list(window)}: no trainable parameter in it")
    held = hold_frozen_in(model, work.frozen_dtype, exact)
    try:
        metrics = _train_held(model, params, batches, work, align, examples)
    finally:
        restore(held, exact)  # a failed step too leaves the caller's model exact
        for p, flag in zip(model.parameters(), flags):  # and its requires_grad flags as they were
            p.requires_grad_(flag)
    metrics["train-seconds"] = time.perf_counter() - start
    # CPU seconds: on a shared machine the wall time also counts waiting for a core
    metrics["train-cpu-seconds"] = time.process_time() - cpu
    return metrics


def import_lazy_torch() -> None:
    """Import what torch imports on a first optimizer, once per process: ``torch._dynamo``.

    ``torch.optim.Optimizer`` wraps ``add_param_group``, ``zero_grad`` and ``step`` in
    ``torch._disable_dynamo``, which imports ``torch._dynamo`` on its first call: about 1 s
    of CPU in a fresh process (a stock Flower ClientApp is one per message), which
    ``train-seconds`` would otherwise count as training. Calling it again costs nothing.
    """
    import torch._dynamo  # noqa: F401


def _train_held(model: nn.Module, params: list[nn.Parameter], batches: Iterable[tuple[Any, torch.Tensor]],
                work: LocalWork, align: Align, examples: int | None) -> dict[str, float]:
    """``train_window``'s steps, with the frozen layers held in ``work.frozen_dtype``."""
    # the teacher is the model as received: the shared frozen layers plus a copy of the window
    teacher = ReceivedTeacher(model) if work.kd_weight > 0.0 else None
    optimizer = _optimizer(params, work)
    total_loss, steps, seen, loss_bytes = 0.0, 0, 0, 0
    meter = SavedActivations(model.parameters())  # frozen weights are not activations
    again = SavedActivations(model.parameters())  # one frozen segment run again in backward
    with recompute_frozen(model, params, again):
        for xb, yb in batches:
            # the teacher runs first, while no activation is saved: only its outputs stay
            target = align(teacher(xb), yb)[0] if teacher is not None else None
            loss, held = _loss(model, xb, yb, target, work, align, meter)
            loss_bytes = max(loss_bytes, held)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if work.clip_norm > 0:
                nn.utils.clip_grad_norm_(params, work.clip_norm)
            optimizer.step()
            total_loss += loss.item()
            steps += 1
            seen += len(yb)
            del target, loss
    model.eval()
    metrics = {"train-loss": total_loss / max(steps, 1), "steps": float(steps),
               "num-examples": float(seen if examples is None else examples)}
    teacher_window, teacher_outputs = (teacher.window_bytes, teacher.output_bytes) if teacher else (0, 0)
    return {**metrics, **memory_ledger(model, params, optimizer, meter.peak + again.peak + loss_bytes,
                                       teacher_window, teacher_outputs)}


def _loss(model: nn.Module, xb: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
          work: LocalWork, align: Align, meter: SavedActivations) -> tuple[torch.Tensor, int]:
    """One batch's loss, and the bytes its computation holds beyond the saved activations.

    A model with ``chunked_head = True`` (an LLM) gives the LM head's inputs
    (``head_inputs``) instead of logits: the head and its loss run over chunks of tokens
    (``head_loss``), whose working buffers are the bytes returned. Any other model's logits
    go to the loss whole (0 returned).
    """
    if getattr(model, "chunked_head", False):
        with meter:
            features, weight = model.head_inputs(xb)
            features, yb = align(features, y)
        rows = chunk_rows(weight.shape[0])
        loss = head_loss(features, weight, yb, target, work.kd_weight, work.kd_temperature, rows)
        return loss, working_bytes(features, weight.shape[0], rows, target is not None)
    with meter:
        logits, yb = align(model(xb), y)
    if target is not None:
        return distillation_loss(logits, target, yb, work.kd_weight, work.kd_temperature), 0
    return F.cross_entropy(logits, yb), 0


def _optimizer(params: list[nn.Parameter], work: LocalWork) -> torch.optim.Optimizer:
    """A fresh optimizer for one visit: SGD with momentum, Adam or AdamW (two fp32 moments a
    parameter; AdamW with transformers' ``TrainingArguments`` defaults: betas 0.9/0.999, eps 1e-8,
    and the run's weight decay, 0 by default as there)."""
    if work.optimizer == "adam":
        return torch.optim.Adam(params, lr=work.lr, weight_decay=work.weight_decay)
    if work.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=work.lr, weight_decay=work.weight_decay)
    if work.optimizer != "sgd":
        raise ValueError(f"optimizer: {work.optimizer!r} is not one of sgd, adam, adamw")
    return torch.optim.SGD(params, lr=work.lr, momentum=work.momentum, weight_decay=work.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             align: Align | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy per prediction over ``(x, y)`` (see ``train_window``).

    An LLM's predictions are its answer tokens: accuracy is next-token accuracy, and
    perplexity is ``exp(loss)``.
    """
    model.eval()
    align = align or _identity
    loss, correct, count = 0.0, 0, 0
    for start in range(0, len(y), batch_size):
        logits, yb = align(model(x[start:start + batch_size]), y[start:start + batch_size])
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
        count += len(yb)
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1)}
