"""Cut any PyTorch model into Snake segments: contiguous runs of ``state_dict`` keys.

A segment is the unit a Snake window is made of. ``segment_model`` finds segments in the
module tree, in registration order (which ``state_dict`` follows and which, for every
model we know of, is the forward order): it starts from the model's children and opens
the largest container until there are enough segments and none holds more than its share
of the parameters, then folds segments too small to matter into a neighbour.

Segment names are dotted module paths (``"layer4.1.conv2"``); a segment folded from two
modules is named ``"a+b"``, from more ``"first..last"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

TINY = 0.02
"""A segment holding less than this share of the parameters is folded into a neighbour."""


@dataclass
class _Unit:
    """A candidate segment: a module, plus keys its parent owned directly (``extra``)."""

    name: str
    module: nn.Module
    keys: list[str]
    size: int
    extra: list[str] = field(default_factory=list)


def segment_model(model: nn.Module, *, min_segments: int = 4,
                  max_segments: int | None = None) -> dict[str, list[str]]:
    """Contiguous segments of ``model``, in forward (registration) order.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model; containers (``Sequential``, ``ModuleList``, torchvision stages,
        Hugging Face decoder stacks) are opened as far as needed.
    min_segments : int (default: 4)
        Open containers until there are at least this many segments and none holds more
        than ``1 / min_segments`` of the parameters (as far as the tree allows: a leaf
        module, such as one ``Linear``, is never split).
    max_segments : int | None (default: None)
        Merge the adjacent pair with the fewest parameters until there are at most this many.

    Returns
    -------
    dict[str, list[str]]
        Segment name -> its ``state_dict`` keys. Every parameter and buffer is in exactly
        one segment; parameterless modules (``ReLU``, pooling) have no segment; a parameter
        owned by a container itself (ViT's ``class_token``) joins the segment that follows
        it; a tied weight belongs to its first owner, and its alias key is in no segment
        (it is never sent: the model it is loaded into shares the tensor).

    Raises
    ------
    ValueError
        If ``min_segments < 1``, ``max_segments < min_segments`` or the model has no state.
    """
    if min_segments < 1:
        raise ValueError(f"min_segments: must be >= 1, got {min_segments}")
    if max_segments is not None and max_segments < min_segments:
        raise ValueError(f"max_segments: {max_segments} is below min_segments {min_segments}")
    sizes = _owned_sizes(model)
    if not sizes:
        raise ValueError("segment_model: the model has no parameters or buffers")
    total = max(sum(sizes.values()), 1)
    units = _children(_Unit("", model, list(sizes), total), sizes)
    while True:
        openable = [u for u in units if _keyed_children(u, sizes)]
        if not openable:
            break
        largest = max(openable, key=lambda u: u.size)
        if len(units) >= min_segments and largest.size * min_segments <= total:
            break
        at = units.index(largest)
        units[at:at + 1] = _children(largest, sizes)
    groups = _fold_tiny([[u] for u in units], total, min_segments)
    while max_segments is not None and len(groups) > max_segments:
        at = min(range(len(groups) - 1), key=lambda i: _size(groups[i]) + _size(groups[i + 1]))
        groups[at:at + 2] = [groups[at] + groups[at + 1]]
    return {_name(group): [k for u in group for k in u.extra + u.keys] for group in groups}


def _name(group: list[_Unit]) -> str:
    """``"conv1"``, ``"conv1+bn1"``, or ``"conv1..layer2"`` for three modules or more."""
    if len(group) > 2:
        return f"{group[0].name}..{group[-1].name}"
    return "+".join(u.name for u in group)


def _owned_sizes(model: nn.Module) -> dict[str, int]:
    """``state_dict`` keys in order, aliases of an earlier key's tensor left out, with sizes."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        sizes[key] = max(tensor.numel(), 1)  # a 0-d buffer (a step counter) still travels
    return sizes


def _keyed_children(unit: _Unit, sizes: Mapping[str, int]) -> list[tuple[str, nn.Module, list[str]]]:
    out = []
    for child, module in unit.module.named_children():
        name = f"{unit.name}.{child}" if unit.name else child
        keys = [k for k in unit.keys if k.startswith(name + ".")]
        if keys:
            out.append((name, module, keys))
    return out


def _children(unit: _Unit, sizes: Mapping[str, int]) -> list[_Unit]:
    """``unit`` opened: its keyed children; its own keys join the first of them."""
    children = [_Unit(name, module, keys, sum(sizes[k] for k in keys))
                for name, module, keys in _keyed_children(unit, sizes)]
    inside = {k for c in children for k in c.keys}
    direct = unit.extra + [k for k in unit.keys if k not in inside]
    if not children:
        return [unit]
    children[0].extra = direct + children[0].extra
    children[0].size += sum(sizes[k] for k in direct)
    return children


def _size(group: list[_Unit]) -> int:
    return sum(u.size for u in group)


def _fold_tiny(groups: list[list[_Unit]], total: int, min_segments: int) -> list[list[_Unit]]:
    """Fold each segment under ``TINY`` of the model into its smaller neighbour."""
    while len(groups) > min_segments:
        at = min(range(len(groups)), key=lambda i: _size(groups[i]))
        if _size(groups[at]) >= TINY * total:
            break
        left = _size(groups[at - 1]) if at > 0 else None
        right = _size(groups[at + 1]) if at + 1 < len(groups) else None
        into = at - 1 if right is None or (left is not None and left <= right) else at + 1
        lo, hi = sorted((at, into))
        groups[lo:hi + 1] = [groups[lo] + groups[hi]]
    return groups
