"""Checking a returned window and merging it into the global model (pure records).

A reply is merged only if its keys are exactly the assigned window, every shape
and dtype matches the global model, and every value is finite. ``check_window``
returns the reason a reply is refused (or ``None``); ``merge_window`` never
touches the input record, so a refused reply leaves the global model as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

MUST_SEND = ("a node must reply with one ArrayRecord holding exactly the state_dict keys of its "
             "window's segments, and a MetricRecord with num-examples (docs/protocol.md)")


def window_keys(segments: Mapping[str, Sequence[str]], window: Iterable[str]) -> list[str]:
    """All ``state_dict`` keys of the window's segments, in model order."""
    return [key for name in window for key in segments[name]]


def check_segments(segments: Mapping[str, Sequence[str]]) -> None:
    """Refuse segments a Snake run cannot use, with a one-line ``ValueError``.

    Every segment needs at least one key, and no key may be in two segments.
    """
    if not segments:
        raise ValueError("segments: none given (segment_model(model) cuts a model into segments)")
    owner: dict[str, str] = {}
    for name, keys in segments.items():
        if not name:
            raise ValueError("segments: a segment name may not be empty")
        if isinstance(keys, str) or not list(keys):
            raise ValueError(f"segments: segment {name!r} has no state_dict keys (a parameterless module "
                             f"such as a ReLU is no segment; segment_model(model) skips them)")
        for key in keys:
            if key in owner:
                raise ValueError(f"segments: key {key!r} is in both {owner[key]!r} and {name!r}")
            owner[key] = name


def unknown_keys(segments: Mapping[str, Sequence[str]], arrays: ArrayRecord) -> list[str]:
    """Keys of ``segments`` that ``arrays`` (the initial model) does not have."""
    return [key for keys in segments.values() for key in keys if key not in arrays]


def tied_aliases(segments: Mapping[str, Sequence[str]], arrays: ArrayRecord) -> dict[str, str]:
    """Keys in no segment that hold a segment key's exact values: a tied weight's alias -> its owner.

    ``segment_model`` leaves a tied weight's alias (an LM head tied to the embeddings) out of
    every segment, but ``model.state_dict()`` still has it. Arrays with a single repeated
    value (zeros, ones) are never matched: two of them are equal by coincidence, not tying.
    """
    covered = [key for keys in segments.values() for key in keys]
    owners: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    for key in covered:
        if key in arrays:
            array = arrays[key]
            owners.setdefault((array.dtype, tuple(array.shape), bytes(array.data)), key)
    aliases = {}
    for key in arrays.keys():
        if key in set(covered):
            continue
        array = arrays[key]
        owner = owners.get((array.dtype, tuple(array.shape), bytes(array.data)))
        if owner is not None and np.unique(array.numpy()).size > 1:
            aliases[key] = owner
    return aliases


def select(arrays: ArrayRecord, keys: Iterable[str]) -> ArrayRecord:
    """A new record holding only ``keys`` (the Arrays are shared, not copied)."""
    return ArrayRecord({key: arrays[key] for key in keys})


def check_window(reply: ArrayRecord | None, reference: ArrayRecord, keys: Sequence[str]) -> str | None:
    """Why ``reply`` may not be merged as window ``keys`` of ``reference``; ``None`` if it may."""
    if reply is None:
        return f"reply carries no ArrayRecord; {MUST_SEND}"
    expected, got = set(keys), set(reply.keys())
    if got != expected:
        extra, missing = sorted(got - expected), sorted(expected - got)
        parts = ([f"extra keys {extra[:3]}"] if extra else []) + ([f"missing keys {missing[:3]}"] if missing else [])
        return f"{'; '.join(parts)}; {MUST_SEND}"
    for key in keys:
        mine, theirs = reference[key], reply[key]
        if tuple(theirs.shape) != tuple(mine.shape):
            return f"{key}: shape {tuple(theirs.shape)} != {tuple(mine.shape)}"
        if theirs.dtype != mine.dtype:
            return f"{key}: dtype {theirs.dtype} != {mine.dtype}"
        try:
            values = theirs.numpy()
        except Exception as err:  # undecodable bytes are a malformed reply, not a crash
            return f"{key}: undecodable array ({type(err).__name__})"
        if values.shape != tuple(mine.shape) or str(values.dtype) != mine.dtype:
            return f"{key}: payload does not match its declared shape or dtype"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"{key}: non-finite values"
    return None


def update_norm(reply: ArrayRecord, reference: ArrayRecord, keys: Iterable[str]) -> float:
    """L2 norm of ``reply - reference`` over the floating arrays of ``keys`` (checked replies only)."""
    return _squared_sums(reply, reference, keys)[0] ** 0.5


def merge_window(arrays: ArrayRecord, window: ArrayRecord) -> ArrayRecord:
    """A new full record: ``arrays`` with the window's keys replaced, key order kept."""
    unknown = [key for key in window.keys() if key not in arrays]
    if unknown:
        raise KeyError(f"window keys not in the model: {unknown[:3]}")
    return ArrayRecord({key: _copy(window[key]) if key in window else arrays[key] for key in arrays.keys()})


def _copy(array: Array) -> Array:
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=bytes(array.data))


def relative_drift(current: ArrayRecord, held: ArrayRecord, keys: Iterable[str]) -> float:
    """‖current − held‖ / ‖held‖ over ``keys`` (floating arrays only; 0 if nothing to compare).

    The delta sync's tolerance: a frozen segment whose node copy has drifted less than
    this from the global one is not worth sending again.
    """
    diff, norm = _squared_sums(current, held, keys)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return (diff / norm) ** 0.5


def _squared_sums(new: ArrayRecord, old: ArrayRecord, keys: Iterable[str]) -> tuple[float, float]:
    """Σ(new − old)² and Σold² over the floating arrays of ``keys``, in float64."""
    diff = norm = 0.0
    for key in keys:
        before = old[key].numpy()
        if before.dtype.kind != "f":
            continue
        after = new[key].numpy().astype(np.float64)
        diff += float(np.sum((after - before) ** 2))
        norm += float(np.sum(before.astype(np.float64) ** 2))
    return diff, norm
