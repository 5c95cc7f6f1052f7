"""The server's side of attacks and defences: the merge gate's data and loss, and what a run records.

- ``merge_gate``: with ``merge-gate = "loss"``, a ``strategies.MergeGate`` whose loss is the
  task's loss on a seeded slice (``gate-size`` examples) of the validation examples held out of
  the training data (``validation-size``); every arm of a comparison holds out the same
  examples, gated or not, so the gate reads nothing the others train on;
- ``gate_fields``: a hop's gate figures for its row of the results (the loss change and the
  update's norm, from which a clean run fixes ``gate-tolerance`` and ``max-update-norm``);
- ``attack_record``: which partitions attacked (``training/attack.py``), for the results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from snake_flower.config import RunConfig
from snake_flower.tasks.base import Task
from snake_flower.tasks.data import validation_split
from snake_flower.training.attack import attacking_partitions
from strategies import MergeGate

GATE_STREAM = 34  # the gate slice's own random stream, apart from the seed's other draws

Score = Callable[[nn.Module, torch.Tensor, torch.Tensor], Mapping[str, float]]


def gate_slice(held_out: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` of the ``held_out`` indices, drawn by ``seed`` and sorted (all of them for 0)."""
    if size == 0 or size >= len(held_out):
        return held_out
    return np.sort(np.random.default_rng([seed, GATE_STREAM]).choice(held_out, size, replace=False))


def merge_gate(config: RunConfig, task: Task, model: nn.Module, score: Score) -> MergeGate | None:
    """The run's merge gate (``None`` with ``merge-gate = "off"``).

    ``model`` is the server's model for scoring (its weights are overwritten at each call);
    ``score(model, x, y)`` gives at least ``loss``, as the run's evaluation does.
    """
    if config.merge_gate == "off":
        return None
    x_train, y_train, _, _ = task.load(config.data_dir)
    labels = task.partition_by(config.data_dir) if task.partition_by else y_train
    rows = torch.as_tensor(gate_slice(validation_split(labels, config)[1], config.gate_size, config.seed))
    x, y = x_train[rows], y_train[rows]

    def loss(arrays: ArrayRecord) -> float:
        model.load_state_dict(arrays.to_torch_state_dict())
        return float(score(model, x, y)["loss"])

    return MergeGate(loss, config.gate_tolerance, config.gate_strikes)


def gate_fields(hop: Mapping[str, Any]) -> dict[str, Any]:
    """A gated hop's figures for its row: the gate's losses, their change, its seconds; a
    rejected hop's reason. Nothing for a hop the gate did not score."""
    gate = hop.get("gate")
    if gate is None:
        return {}
    fields = {"gate_loss_before": gate["loss_before"], "gate_loss_after": gate["loss_after"],
              "gate_loss_change": gate["loss_change"], "update_norm": gate["update_norm"],
              "gate_s": round(gate["seconds"], 4),
              "gate_cpu_s": round(gate["cpu_seconds"], 4)}
    if hop.get("status") == "rejected":
        fields["reason"] = hop.get("reason", "")
    return fields


def gate_record(gate: MergeGate | None, config: RunConfig) -> dict[str, Any]:
    """The results' ``gate`` entry: its settings and every rejection (nothing when off)."""
    if gate is None:
        return {}
    return {"gate": {"tolerance": gate.tolerance, "strikes": gate.strikes, "size": config.gate_size,
                     "rejections": gate.rejections}}


def attack_record(config: RunConfig, num_nodes: int) -> dict[str, Any]:
    """The results' ``byzantine_partitions`` (nothing when no node attacks): the partitions that
    attacked, as the nodes draw them with ``num-partitions`` = the ``num_nodes`` of the run."""
    if not config.byzantine_nodes:
        return {}
    try:
        drawn = attacking_partitions(config.seed, config.byzantine_nodes, num_nodes)
    except ValueError as err:  # more attackers than nodes: each node's hop failed saying so, too
        return {"byzantine_partitions": None, "attack": config.attack, "attack_error": str(err)}
    return {"byzantine_partitions": drawn, "attack": config.attack}
