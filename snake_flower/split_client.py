"""Split learning on the node: the bottom of the model, one batch per message.

A visit is a chain of ``train.split`` messages from the server, numbered by their
config's ``split-batch`` t = 0 .. T (T = the visit's number of batches):

- message 0 carries the bottom weights (relayed from the previous node through the
  server); the node replies with the cut-layer activations and labels of batch 0;
- message t, 0 < t < T, carries the gradients of the loss with respect to batch
  t-1's activations. The node recomputes batch t-1's bottom forward with its current
  weights (unchanged since it sent those activations), backpropagates the gradients,
  clips, steps its optimizer, and replies with the activations and labels of batch t;
- message T carries the last gradients; the node applies them and replies with its
  trained bottom weights and its metrics (memory ledger included).

Between messages the process keeps the bottom model and its optimizer (``_OPEN``), so
a visit builds its bottom once, not per batch; ``context.state`` keeps the bottom
weights, the optimizer's momentum and where the visit stands as well, for a ClientApp
process that did not see the previous message. The visit's last message clears both. Batches
are redrawn from the visit's seed (``training.visit_batches``), so batch t-1 is found
again. The recomputed forward pass is exact for the tasks' models (no dropout);
BatchNorm running statistics would be updated twice per batch.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from snake_flower.node_settings import node_settings
from snake_flower.tasks.data import PARTITION_KEYS, partition_from_config
from snake_flower.tasks.task import TASKS, build_model
from snake_flower.training.batches import visit_batches, visit_seed
from snake_flower.training.loop import LocalWork, SavedActivations, memory_ledger

STATE_BOTTOM, STATE_MOMENTUM, STATE_VISIT = "split-bottom", "split-momentum", "split-visit"


@dataclass
class _OpenVisit:
    """A visit in progress in this process: its bottom model, optimizer and last batch sent."""

    visit: int
    batch: int
    token: str  # also in context.state: the state this process's model belongs to
    bottom: nn.Module
    optimizer: torch.optim.Optimizer


_OPEN: dict[tuple[int, int], _OpenVisit] = {}
"""(run id, node id) -> the visit in progress, kept between its messages."""


def train_split(msg: Message, context: Context) -> Message:
    """One message of a split-learning visit (see the module docstring)."""
    cfg = dict(msg.content["config"])
    settings = node_settings(context.node_config)
    partition_id, num_partitions = settings.partition()
    task = TASKS[cfg["task"]]
    data_dir = settings.data_dir_or(str(cfg["data-dir"]))
    x_train, idx, y = _node_data(task.name, data_dir, _partition_key(cfg), num_partitions, partition_id)
    work = replace(LocalWork.from_config(cfg, kd=False), steps=int(cfg["split-steps"]))
    visit, batch = int(cfg["server-round"]), int(cfg["split-batch"])
    # the Snake ClientApp's hop seed: at equal rounds both draw the same batches
    batches = visit_batches(len(y), work.batch_size, work.steps, work.epochs, seed=visit_seed(cfg["seed"], visit))
    if not 0 <= batch <= len(batches):
        raise ValueError(f"split-batch {batch} is outside this visit's 0..{len(batches)}")

    key = (context.run_id, context.node_id)
    kept = _OPEN.pop(key, None)
    progress = _progress(msg.content, context.state, visit, batch) if batch > 0 else {}
    if kept is not None and batch > 0 and progress.get("token") == kept.token:
        bottom, optimizer = kept.bottom, kept.optimizer  # as the previous message left them
    else:  # the visit's first message, or a process that did not see the previous one
        bottom = build_model(task, int(cfg["seed"]))[:int(cfg["split-cut"])].train()
        progress = _resume(bottom, msg.content, context.state, visit, batch)
        optimizer = torch.optim.SGD(list(bottom.parameters()), lr=work.lr, momentum=work.momentum,
                                    weight_decay=work.weight_decay)
        if batch > 0:
            _restore_momentum(bottom, optimizer, context.state[STATE_MOMENTUM])
    params = list(bottom.parameters())
    meter = SavedActivations(params)
    meter.peak = int(progress.get("activation-peak", 0))
    compute = float(progress.get("compute", 0.0))  # CPU seconds of the visit's training so far
    if batch > 0:
        began = time.process_time()
        grads = torch.from_numpy(msg.content["gradients"]["activations"].numpy().copy())
        _apply_gradients(bottom, optimizer, x_train[idx[batches[batch - 1]]], grads, work.clip_norm, meter)
        compute += time.process_time() - began

    counts = {"batch": batch, "batches": len(batches), "partition-id": partition_id}
    if batch == len(batches):  # the visit's last message: hand back the trained bottom
        ledger = memory_ledger(bottom, params, optimizer, meter.peak)
        for key in (STATE_BOTTOM, STATE_MOMENTUM, STATE_VISIT):
            context.state.pop(key, None)
        metrics = {**counts, **ledger, **settings.capacity, "steps": batch,
                   "num-examples": len(y),
                   "train-seconds": time.time() - float(progress.get("started", time.time())),
                   "compute-seconds": compute}
        return Message(RecordDict({"arrays": ArrayRecord(bottom.state_dict()),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    token = secrets.token_hex(8)
    _OPEN[key] = _OpenVisit(visit, batch, token, bottom, optimizer)
    context.state[STATE_BOTTOM] = ArrayRecord(bottom.state_dict())
    context.state[STATE_MOMENTUM] = _momentum(bottom, optimizer)
    context.state[STATE_VISIT] = ConfigRecord({
        "round": visit, "batch": batch, "activation-peak": meter.peak, "token": token,
        "started": float(progress.get("started", time.time()))})
    rows = batches[batch]
    began = time.process_time()
    with torch.no_grad():
        activations = bottom(x_train[idx[rows]])
    context.state[STATE_VISIT]["compute"] = compute + time.process_time() - began
    content = RecordDict({"activations": ArrayRecord({"activations": activations.contiguous()}),
                          "labels": ArrayRecord({"labels": y[rows].contiguous()}),
                          "metrics": MetricRecord(counts)})
    return Message(content, reply_to=msg)


def _partition_key(cfg: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((key, cfg[key]) for key in PARTITION_KEYS)


@lru_cache(maxsize=4)
def _node_data(task_name: str, data_dir: str, partition: tuple[tuple[str, Any], ...],
               num_partitions: int, partition_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images, this node's indices into them and its labels, once per process.

    Split learning handles ~100 messages per visit; finding the partition again on each
    (hashing 60,000 labels) cost more than the batch's forward pass.
    """
    x_train, y_train, _, _ = TASKS[task_name].load(data_dir)
    idx = torch.as_tensor(partition_from_config(y_train, dict(partition), num_partitions, partition_id))
    return x_train, idx, y_train[idx]  # batches are gathered per message, never the whole partition


def _resume(bottom: nn.Module, content: RecordDict, state: RecordDict, visit: int,
            batch: int) -> dict[str, Any]:
    """Load the bottom weights: from the message on batch 0, else from the visit's state."""
    if batch == 0:
        if "arrays" not in content:
            raise ValueError("the first message of a split visit must carry the bottom weights")
        bottom.load_state_dict(content["arrays"].to_torch_state_dict())  # strict: exactly the bottom
        return {}
    progress = _progress(content, state, visit, batch)
    bottom.load_state_dict(state[STATE_BOTTOM].to_torch_state_dict())
    return progress


def _progress(content: RecordDict, state: RecordDict, visit: int, batch: int) -> dict[str, Any]:
    """Where the visit stands (``state``), checked against message ``batch`` > 0 of ``visit``."""
    progress = dict(state[STATE_VISIT]) if STATE_VISIT in state else {}
    if (progress.get("round"), progress.get("batch")) != (visit, batch - 1):
        raise RuntimeError(f"split visit {visit}: got batch {batch}, but this node's state is at "
                           f"round {progress.get('round')} batch {progress.get('batch')}")
    if "gradients" not in content:
        raise ValueError(f"split batch {batch}: message carries no gradients for batch {batch - 1}")
    return progress


def _apply_gradients(bottom: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor,
                     grads: torch.Tensor, clip_norm: float, meter: SavedActivations) -> None:
    """Recompute the bottom forward of ``xb``, backpropagate ``grads``, clip and step."""
    with meter:
        activations = bottom(xb)
    if activations.shape != grads.shape:
        raise ValueError(f"gradients of shape {tuple(grads.shape)} for activations of shape "
                         f"{tuple(activations.shape)}")
    optimizer.zero_grad(set_to_none=True)
    activations.backward(grads)
    if clip_norm > 0:
        nn.utils.clip_grad_norm_(list(bottom.parameters()), clip_norm)
    optimizer.step()


def _momentum(bottom: nn.Module, optimizer: torch.optim.Optimizer) -> ArrayRecord:
    buffers = {name: optimizer.state[p]["momentum_buffer"] for name, p in bottom.named_parameters()
               if torch.is_tensor(optimizer.state.get(p, {}).get("momentum_buffer"))}
    return ArrayRecord(buffers) if buffers else ArrayRecord()


def _restore_momentum(bottom: nn.Module, optimizer: torch.optim.Optimizer, saved: ArrayRecord) -> None:
    buffers = saved.to_torch_state_dict() if len(saved) else {}
    for name, p in bottom.named_parameters():
        if name in buffers:
            optimizer.state[p]["momentum_buffer"] = buffers[name].clone()
