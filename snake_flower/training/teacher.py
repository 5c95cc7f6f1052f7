"""The distillation teacher without a second model.

The teacher is the model as the node received it. It differs from the student only in
the window, so instead of a deep copy of the whole model (two models on the node) it is
the student's own modules called with the window's *received* tensors swapped in
(``torch.func.functional_call``): the frozen layers are shared, in whatever dtype they are
held, and distillation costs one copy of the window plus one batch of teacher outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ReceivedTeacher:
    """Outputs of ``model`` as it is now (received), for every later step of the hop.

    Call it after the window is unfrozen (``freeze_outside_keys``) and the frozen layers are
    held, and before the first step. It copies the window's trainable parameters and the
    buffers of the segments in train mode (a BatchNorm's running statistics move while the
    window trains); everything else is the student's own tensors, which do not change.
    The teacher runs in eval mode and without gradients, as a frozen copy would.

    Parameters
    ----------
    model : nn.Module
        The student, its window trainable (``requires_grad``) and its window segments in
        train mode.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        training = {name for name, segment in model.named_children() if segment.training}
        received = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        received.update({name: b.detach().clone() for name, b in model.named_buffers()
                         if name.split(".", 1)[0] in training})
        self.received = received
        self.window_bytes = sum(_nbytes(t) for t in received.values())
        self.output_bytes = 0  # the largest batch of outputs so far

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The received model's outputs for ``x`` (the student's modes are left as they were)."""
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            out = functional_call(self.model, self.received, (x,), tie_weights=True, strict=False)
        finally:
            for module, mode in modes:
                module.training = mode
        self.output_bytes = max(self.output_bytes, _nbytes(out))
        return out
