"""Attacking nodes, a test and benchmark knob (never on by default): poisoned, well-formed replies.

With ``byzantine-nodes = N`` in a run's messages, ``N`` partitions drawn by the seed from the
node's ``num-partitions`` (``attacking_partitions``: the same partitions for every strategy)
attack every hop they train, as ``attack`` says:

- ``label-flip``: train as usual, on labels mapped ``y -> C - 1 - y`` (``C``: the model's outputs);
- ``sign-flip``: reply with the update reversed, ``w0 - (w - w0)``: the norm of an honest update;
- ``scale``: reply with the update times ``attack-scale``, ``w0 + s (w - w0)``;
- ``random``: reply with random values of each parameter's shape, drawn from a normal with the
  trained parameter's own mean and standard deviation (seeded per hop and partition).

``w0`` is the window as the node received it, ``w`` as it trained it. The poisoned values are
parameters only: buffers (BatchNorm statistics) go as trained. The reply keeps the window's
keys, shapes, dtypes and finite values, so reply validation (``strategies/reply.py``) passes it
unless ``max-update-norm`` catches its norm. The node keeps what it sent, as an honest node
keeps what the server will merge.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from snake_flower.training.batches import is_tensor_pair, split_batch

ATTACKS = ("label-flip", "sign-flip", "scale", "random")
ATTACK_SEED = "byzantine"


def attacking_partitions(seed: int, byzantine_nodes: int, num_partitions: int) -> list[int]:
    """The partitions that attack: ``byzantine_nodes`` of ``num_partitions``, drawn by ``seed``.

    The draw depends on nothing else, so every strategy of a comparison has the same attackers.
    """
    if not 0 <= byzantine_nodes <= num_partitions:
        raise ValueError(f"byzantine-nodes: {byzantine_nodes} attackers among {num_partitions} partitions")
    return sorted(random.Random(f"{ATTACK_SEED}:{seed}").sample(range(num_partitions), byzantine_nodes))


@dataclass(frozen=True)
class Attack:
    """What one attacking node does to one hop.

    Attributes
    ----------
    kind : str
        One of ``ATTACKS``.
    scale : float
        ``attack-scale``: the factor of the ``scale`` attack.
    seed : int
        Seeds the ``random`` attack's draw (per hop and partition).
    """

    kind: str
    scale: float
    seed: int

    def data(self, data: Any, model: nn.Module, align: Callable | None = None) -> Any:
        """The training data the node trains on: labels flipped under ``label-flip``, else ``data``."""
        if self.kind != "label-flip":
            return data
        if is_tensor_pair(data):
            x, y = data
            return x, _flip(y, _num_classes(model, x[:2], y[:2], align))
        return _FlippedLoader(data, model, align)

    def snapshot(self, model: nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The window's parameters as received (``w0``), which ``poison`` moves away from."""
        if self.kind not in ("sign-flip", "scale"):
            return {}
        names = dict(model.named_parameters())
        return {key: names[key].detach().float().clone() for key in keys if key in names}

    def poison(self, state: dict[str, torch.Tensor], model: nn.Module, keys: Iterable[str],
               before: Mapping[str, torch.Tensor]) -> None:
        """Replace the window's trained parameters in ``state`` with poisoned ones (in place)."""
        params = {name for name, _ in model.named_parameters()}
        gen = torch.Generator().manual_seed(self.seed)
        for key in keys:
            if key not in params or not state[key].is_floating_point():
                continue
            trained = state[key].float()
            if self.kind == "sign-flip":
                poisoned = before[key] - (trained - before[key])
            elif self.kind == "scale":
                poisoned = before[key] + self.scale * (trained - before[key])
            elif self.kind == "random":
                std = float(trained.std()) if trained.numel() > 1 else 0.0  # one value has no spread
                poisoned = float(trained.mean()) + std * torch.randn(trained.shape, generator=gen)
            else:
                continue
            state[key] = poisoned.to(state[key].dtype)


def node_attack(cfg: Mapping[str, Any], partition_id: int | None, num_partitions: int | None) -> Attack | None:
    """This node's attack at this hop, if its partition attacks (``None`` for an honest node)."""
    byzantine = int(cfg.get("byzantine-nodes", 0))
    if byzantine == 0:
        return None
    if partition_id is None or num_partitions is None:
        raise ValueError("byzantine-nodes: an attack needs the node's partition-id and num-partitions "
                         "in its node-config")
    kind = str(cfg.get("attack", ""))
    if kind not in ATTACKS:
        raise ValueError(f"attack: {kind!r} is not one of {', '.join(ATTACKS)}")
    if partition_id not in attacking_partitions(int(cfg["seed"]), byzantine, num_partitions):
        return None
    draw = random.Random(f"attack:{cfg['seed']}:{cfg.get('server-round', 0)}:{partition_id}").getrandbits(63)
    return Attack(kind, float(cfg.get("attack-scale", 10.0)), draw)


def _flip(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``C - 1 - y`` for every real label (negative ones, ignored by the loss, stay)."""
    return torch.where(labels >= 0, classes - 1 - labels, labels)


def _num_classes(model: nn.Module, inputs: Any, labels: torch.Tensor, align: Callable | None) -> int:
    """How many classes ``model`` predicts: the width of its logits on a couple of inputs."""
    align = align or getattr(model, "snake_align", None) or (lambda out, y: (out, y))
    modes = [(module, module.training) for module in model.modules()]  # training may set some apart
    model.eval()
    with torch.no_grad():
        logits, _ = align(model(inputs), labels)
    for module, training in modes:
        module.training = training
    return int(logits.shape[-1])


class _FlippedLoader:
    """A loader's batches as ``(inputs, flipped labels)``; iterable again and again, as a loader is."""

    def __init__(self, loader: Iterable, model: nn.Module, align: Callable | None) -> None:
        self.loader, self.model, self.align = loader, model, align
        self.classes: int | None = None

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in self.loader:
            inputs, labels = split_batch(batch)
            if self.classes is None:
                self.classes = _num_classes(self.model, inputs, labels, self.align)
            yield inputs, _flip(labels, self.classes)
