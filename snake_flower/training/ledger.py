"""The design §5 ledger of one hop, and the meter of what autograd saves for backward."""

from __future__ import annotations

import resource
from collections.abc import Iterable

import torch
from torch import nn

from snake_flower.training.frozen import scale_tensors


class SavedActivations:
    """Peak bytes autograd saves for backward in one forward pass, parameters excluded.

    Autograd also saves weights: a frozen linear layer downstream of the window keeps its
    weight (or a transposed view of it) to pass the gradient back to its input. Those bytes
    are already in the ledger as parameter bytes, so a saved tensor whose storage is a
    parameter's, trainable or frozen, is not an activation. With ``frozen-dtype = "int8"``
    the int8 weights are parameters, but the fp32 weight dequantized from one for a frozen
    layer downstream of the window is a fresh tensor autograd keeps until backward: it is
    memory the step holds, and it is counted here.

    Parameters
    ----------
    params : Iterable[torch.Tensor]
        Every parameter of the model that runs inside the meter, trainable and frozen.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._storages = {_storage_key(p) for p in params}
        self.peak, self._now = 0, 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if _storage_key(tensor) not in self._storages:
            self._now += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._now = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self.peak = max(self.peak, self._now)


def _storage_key(tensor: torch.Tensor) -> int | tuple[str, int]:
    # A view (weight.t(), a slice) has its own data_ptr but its base's storage.
    if tensor.device.type == "meta":  # no storage at all (training/memory.py): the tensor a view stems from
        return "meta", id(tensor._base if tensor._base is not None else tensor)
    return tensor.untyped_storage().data_ptr()


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_ledger(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                  activation_bytes: int, teacher_window: int = 0, teacher_outputs: int = 0
                  ) -> dict[str, float]:
    """Design §5 ledger of one hop, in bytes (floats, as Flower metrics want).

    Distillation's teacher (``ReceivedTeacher``) holds the window as received, counted as
    frozen parameters (``teacher_window``), and one batch of its outputs, which live through
    the step like activations (``teacher_outputs``).
    """
    trainable = {id(p) for p in params}
    # int8 frozen weights: 1 B each plus their fp32 per-channel scales
    frozen = [p for p in model.parameters() if id(p) not in trainable] + scale_tensors(model)
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    ledger = {"trainable-param-bytes": _nbytes(params), "frozen-param-bytes": _nbytes(frozen) + teacher_window,
              "grad-bytes": _nbytes(grads), "optimizer-bytes": _nbytes(state),
              "activation-bytes": activation_bytes + teacher_outputs}
    ledger["total-bytes"] = sum(ledger.values())
    ledger["peak-rss-bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {k: float(v) for k, v in ledger.items()}
