"""Frozen layers held in a lower precision on the node while the window trains.

``frozen-dtype = "fp16" | "bf16"`` casts every frozen floating parameter. ``"int8"`` holds
every frozen floating weight with two or more dimensions as ``int8`` plus one fp32 scale per
output channel (``scale = max|w| / 127`` over all
dimensions but the first; ``q = round(w / scale)`` in ``[-127, 127]``). Each forward pass
dequantizes it to fp32 (``q * scale``), so the window and every segment compute in fp32
as before. One-dimensional frozen parameters (biases, norms) stay fp32: they are a small
share of the bytes, and a norm's gain is the worst place to lose precision.

The dequantization is a ``torch.nn.utils.parametrize`` parametrization whose original is
the int8 tensor. Swapping ``p.data`` in forward hooks instead would be wrong: autograd
saves tensors by reference, so a weight swapped back after the forward pass would be
the one backward reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from strategies.payload import quantize


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 ``(q, scale)`` of ``weight`` (``ndim >= 2``).

    The same quantizer as int8 payloads (:func:`strategies.payload.quantize`). An all-zero
    channel gets scale 0 and ``q = 0``, so it dequantizes to exact zeros.
    """
    q, scale = quantize(weight.detach().float().cpu().numpy())
    return torch.from_numpy(q), torch.from_numpy(scale)


class Int8Dequant(nn.Module):
    """Parametrization: the int8 original times its per-output-channel fp32 scale.

    Parameters
    ----------
    scale : torch.Tensor
        One fp32 scale per output channel (the first dimension of the weight).
    """

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """The fp32 weight ``q * scale`` (a fresh tensor each call, not a parameter).

        Scaled in place: one fp32 weight at a time, not two (``q.float()`` and the product).
        """
        return q.float().mul_(self.scale.view(-1, *[1] * (q.dim() - 1)))


def native_dtype(flags: set[str] | None = None) -> str:
    """The 2-byte dtype this CPU computes natively, for ``frozen-dtype = "auto"``.

    ``bf16`` where the CPU has native bfloat16 (``avx512_bf16`` or ``amx_bf16``), ``fp16``
    where it has native half precision (``avx512_fp16``, or Arm's ``asimdhp``), else
    ``fp32``. Elsewhere a 2-byte dtype is emulated: on an AMD EPYC with ``avx512_bf16`` but
    no ``avx512_fp16``, a 768x576 @ 576x1536 matmul on one thread takes 15.9 ms in fp32,
    2.8 ms in bf16 and 556 ms in fp16.
    """
    flags = cpu_flags() if flags is None else flags
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    if flags & {"avx512_fp16", "asimdhp"}:
        return "fp16"
    return "fp32"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def resolve_dtype(frozen_dtype: str, task: str) -> str:
    """``frozen-dtype`` as a node holds it: ``"auto"`` is ``native_dtype()`` for task ``llm``
    (whose segments compute in their own dtype) and ``fp32`` for the others."""
    if frozen_dtype != "auto":
        return frozen_dtype
    return native_dtype() if task == "llm" else "fp32"


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # int8: hold_int8
Held = list[tuple[nn.Module, str, list[str]]]  # module, weight name, its parameters' order


@dataclass
class FrozenHold:
    """What ``hold_frozen_in`` changed, and how each held parameter gets its exact values back.

    ``lossless`` holds the parameters whose values the held dtype represents exactly (a node
    whose copy came as fp16 or int8 payloads and holds it in the same dtype): their
    original dtype, and for int8 their scales, are all ``restore`` needs. ``from_exact``
    names, for others, their ``state_dict`` key in the caller's exact copy. Only what is
    in neither keeps its fp32 data alive in ``originals`` during the hop.
    """

    originals: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    from_exact: dict[nn.Parameter, tuple[str, torch.dtype]] = field(default_factory=dict)
    lossless: dict[nn.Parameter, tuple[torch.dtype, torch.Tensor | None]] = field(default_factory=dict)
    parametrized: Held = field(default_factory=list)


Keep = Callable[[nn.Parameter, torch.Tensor, torch.Tensor | None], None]


def hold_frozen_in(model: nn.Module, frozen_dtype: str,
                   exact: Mapping[str, torch.Tensor] | None = None) -> FrozenHold:
    """Hold every frozen parameter in ``frozen_dtype``; return what ``restore`` needs.

    The node's copy of the model stays exact: what it keeps and sends is restored, not
    cast back from a rounded value. A parameter that the held dtype represents exactly
    is restored from the held value itself; one whose ``state_dict`` key is in ``exact``
    (the node's stored copy) is restored from there; either way its fp32 data is let go
    now. Any other keeps its original alive until ``restore``. With ``"int8"`` the
    one-dimensional frozen parameters stay fp32 (see the module docstring).
    """
    hold = FrozenHold()
    keys = {p: key for key, p in model.named_parameters()} if exact is not None else {}

    def keep(p: nn.Parameter, held: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Record how ``p`` comes back from ``held`` (int8: times ``scale``) to its exact values."""
        back = held.to(p.dtype) if scale is None else Int8Dequant(scale)(held)
        key = keys.get(p)
        if torch.equal(back, p.data):
            hold.lossless[p] = (p.dtype, scale)
        elif key is not None and key in exact:
            hold.from_exact[p] = (key, p.dtype)
        else:
            hold.originals[p] = p.data

    if frozen_dtype == "int8":
        hold.parametrized = hold_int8(model, keep)
        return hold
    dtype = DTYPES[frozen_dtype]
    for p in model.parameters():
        if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
            held = p.data.to(dtype)
            keep(p, held, None)
            p.data = held
    return hold


def restore(hold: FrozenHold, exact: Mapping[str, torch.Tensor] | None = None) -> None:
    """Undo ``hold_frozen_in``: the exact values (from the held ones, ``exact`` or the kept
    originals) and the plain modules."""
    try:
        release_int8(hold.parametrized)
    finally:
        for p, data in hold.originals.items():
            p.data = data
        for p, (dtype, scale) in hold.lossless.items():
            p.data = p.data.to(dtype) if scale is None else Int8Dequant(scale)(p.data)
        for p, (key, dtype) in hold.from_exact.items():
            value = torch.as_tensor(exact[key])
            # a copy: the parameter must never alias the stored copy it trains away from
            p.data = value.to(dtype=dtype, copy=True).reshape(p.shape)


def hold_int8(model: nn.Module, keep: Keep) -> Held:
    """Quantize every frozen floating weight of ``model`` with ``ndim >= 2`` in place.

    ``keep(p, q, scale)`` records how each one gets its exact values back (for ``restore``); returns the
    ``(module, name, order)`` of every parametrized weight. A weight shared by several modules
    (a tied LM head) is quantized once and parametrized in each of them.
    """
    held: Held = []
    dequant: dict[nn.Parameter, Int8Dequant] = {}
    for module in list(model.modules()):
        order = list(module._parameters)
        for name, p in list(module._parameters.items()):
            shared = p in dequant  # already int8: a tied weight met again in another module
            if not shared and (p is None or p.requires_grad or not p.is_floating_point() or p.dim() < 2):
                continue
            if not shared:
                q, scale = quantize_int8(p.data)
                keep(p, q, scale)
                dequant[p] = Int8Dequant(scale)
                p.data = q
            # unsafe: the original (int8) and the weight (fp32) differ in dtype on purpose
            parametrize.register_parametrization(module, name, dequant[p], unsafe=True)
            held.append((module, name, order))
    return held


def release_int8(held: Held) -> None:
    """Undo ``hold_int8``'s parametrizations (the caller puts the fp32 data back)."""
    for module, name, order in reversed(held):
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        # the weight comes back last; put it back in place, or state_dict's key order changes
        for key in [key for key in order if key in module._parameters]:
            module._parameters[key] = module._parameters.pop(key)


class ArrayView(Mapping[str, torch.Tensor]):
    """A read-only ``state_dict`` over stored arrays (an ``ArrayRecord``), decoded one key at a time.

    ``hold_frozen_in`` and ``restore`` read the node's stored copy through it, so the exact
    values of the frozen layers exist once, in the store, and only one tensor at a time is
    decoded to restore them.
    """

    def __init__(self, arrays: Mapping) -> None:
        self.arrays = arrays

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.from_numpy(self.arrays[key].numpy())

    def __contains__(self, key: object) -> bool:
        return key in self.arrays

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


def scale_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The fp32 scales of ``model``'s int8 weights, each once (they are frozen-param bytes)."""
    found = {id(m.scale): m.scale for m in model.modules() if isinstance(m, Int8Dequant)}
    return list(found.values())
