"""Frozen segments above the window keep only their input for backward, and run again in it.

Backward from the loss down to a Snake window crosses every frozen segment above it, so
autograd would keep each one's activations (SmolLM2 at 8 x 96 tokens: 526 MB in bf16 for
29 layers, against 14 MB for the window's weights). A frozen segment has no gradient of its
own to give, only its input's, so it can save just its input and run its forward again
during backward (activation checkpointing): the hop holds one segment's activations at a
time, at the price of one more forward pass through the frozen segments above the window.
Frozen segments are in eval mode, so the second pass computes exactly the first.

A model opts in with ``recompute_frozen = True`` (the LLM task's ``CausalLMSegments``). Its
segments must be called as ``segment(hidden, *args, **kwargs)`` with ``hidden`` the only
input that needs a gradient; below the window nothing needs one and they run as always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn


class Meter(Protocol):
    """What counts saved tensors: ``training.loop.SavedActivations``."""

    peak: int

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class _Recompute(torch.autograd.Function):
    """``run(hidden)`` saving ``hidden`` alone; backward runs it again, under ``meter``."""

    @staticmethod
    def forward(ctx, hidden, run, meter):  # noqa: ANN001, ANN205
        ctx.run, ctx.meter = run, meter
        ctx.save_for_backward(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad(), ctx.meter:
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return hidden.grad, None, None


def _forward(original: Callable[..., torch.Tensor], meter: Meter, hidden: torch.Tensor,
             *args: Any, **kwargs: Any) -> torch.Tensor:
    if not (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad):
        return original(hidden, *args, **kwargs)
    return _Recompute.apply(hidden, lambda h: original(h, *args, **kwargs), meter)


@contextlib.contextmanager
def recompute_frozen(model: nn.Module, trainable: list[nn.Parameter], meter: Meter) -> Iterator[None]:
    """While inside, the frozen top-level segments of an opted-in ``model`` recompute in backward.

    ``meter`` counts what one segment saves when it runs again (its ``peak`` is then the
    largest such segment: the hop holds one at a time). A model without
    ``recompute_frozen = True`` is left alone.
    """
    if not getattr(model, "recompute_frozen", False):
        yield
        return
    train = {id(p) for p in trainable}
    frozen = [segment for segment in model.children()
              if not any(id(p) in train for p in segment.parameters())]
    for segment in frozen:
        segment.forward = partial(_forward, segment.forward, meter)
    try:
        yield
    finally:
        for segment in frozen:
            del segment.forward  # the class's forward again
