"""What a node reads into its model during a hop, and what it keeps of it on its disk.

``node.py``'s hop, in the order it runs: the stored copy is checked (``read_copy``), the
model is built with its frozen parameters already in the held dtype (``frozen_names``:
which those are), the keys in no segment are stored as built (``rest_keys``), the copy
is loaded one file at a time (``load_copy``) and then the message, one segment at a
time, each sent segment written to the copy exactly as received before it is loaded
(``load_received``). No step holds the whole model twice, nor any frozen layer in fp32
when it is held lower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from snake_flower.node_store import CopyUnreadable, NodeStore, StoredCopy
from snake_flower.runtime.message_inflate import return_freed_memory


def read_copy(store: NodeStore | None) -> tuple[StoredCopy | None, str | None]:
    """The node's stored copy, and if it has none, why (a node's first visit has none either)."""
    if store is None:
        return None, None
    try:
        copy = store.read(tensors=False)  # checked; its parts are mapped one at a time as loaded
    except CopyUnreadable as err:
        return None, f"its copy of the model is unreadable ({err})"
    return copy, None if copy is not None else f"its state directory {store.directory} holds no copy"


def frozen_names(model: nn.Module, segments: Mapping[str, list[str]], window: Iterable[str] | None) -> list[str]:
    """The names of ``model``'s parameters that ``window`` (``None``: every segment) does not
    train, under every name a tied one has; window names not among ``segments`` are ignored
    here (the hop refuses them with its own error)."""
    names = list(segments) if window is None else [str(name) for name in window if name in segments]
    keys = {key for name in names for key in segments[name]}
    params = list(model.named_parameters(remove_duplicate=False))
    trained = {id(p) for name, p in params if name in keys}
    return [name for name, p in params if id(p) not in trained]


def rest_keys(model: nn.Module, segments: Mapping[str, list[str]]) -> list[str]:
    """The ``state_dict`` keys in no segment, less a tied weight's alias (it follows its owner;
    a stale alias loaded later would undo it)."""
    state = model.state_dict(keep_vars=True)
    owned = {id(state[key]) for keys in segments.values() for key in keys if key in state}
    return [key for key in state if id(state[key]) not in owned]


def load_copy(model: nn.Module, store: NodeStore, copy: StoredCopy, skip: Iterable[str]) -> None:
    """Load the stored copy over ``model`` one part (one file) at a time, each mapping let go of
    once loaded; the parts in ``skip`` (sent again in the message) are not read."""
    skip = set(skip)
    for name in copy.parts:
        if name not in skip:
            part = store.load_part(copy, name)
            model.load_state_dict(part, strict=False)
            del part


def load_received(model: nn.Module, received: dict[str, Any], segments: Mapping[str, list[str]],
                  store: NodeStore | None = None, sent: Iterable[str] = (), files: dict[str, str] | None = None
                  ) -> None:
    """Load what was sent over the model, one segment at a time, each let go of once loaded;
    keys the model does not have are an error. With a ``store``, each ``sent`` segment is
    first written as received (``files`` gets its part's file for ``NodeStore.commit``): the
    node's copy is exact even where the model holds the segment in a lower precision."""
    sent = set(sent)
    groups = [(name, keys) for name, keys in segments.items()] + [(None, list(received))]  # the rest last
    for name, keys in groups:
        part = {key: torch.from_numpy(received.pop(key).numpy()) for key in keys if key in received}
        if store is not None and name in sent and files is not None:
            state = model.state_dict()
            files[name] = store.write_part(name, {key: part[key] if key in part else state[key] for key in keys})
            del state
        if part:
            result = model.load_state_dict(part, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"the server sent keys this model does not have: {result.unexpected_keys[:3]}")
            del part
            return_freed_memory()

