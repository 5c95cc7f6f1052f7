"""Snake's payloads on the wire: fp32, fp16 or per-channel int8 ``ArrayRecord``s (pure NumPy).

``payload-dtype`` sets what both directions of a Snake hop carry (``download-dtype``, when
set, what the server sends instead: Snake, relay and FedAvg); the server keeps an fp32 master
copy, never changed by what it sends, and merges the decoded reply into it.

- ``"fp32"``: the arrays as they are.
- ``"fp16"``: every floating array as float16.
- ``"int8"``: every floating array with ``ndim >= 2`` as int8, per output channel and
  symmetric (``scale = max|w| / 127`` over all dimensions but the first, ``q = round(w /
  scale)`` in ``[-127, 127]``), with its fp32 scales under ``"<key>::scale"``; 1-D
  floating arrays (biases, norms) as float16.

Non-floating arrays (a BatchNorm's step counter) travel unchanged. ``decode`` gives back
float32 arrays under the original keys. Re-encoding a decoded array reproduces it bit
for bit (the scales are chosen so that the largest value maps back to 127 and to the same
scale), so a node's copy and the server's master agree exactly after every merge.
NumPy has no bfloat16: a bf16 model is cast to fp32 before it is encoded.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

PAYLOAD_DTYPES = ("fp32", "fp16", "int8")
SCALE = "::scale"  # suffix of the key holding an int8 array's fp32 per-channel scales
_CANONICAL_STEPS = 8


class PayloadError(ValueError):
    """An encoded record that cannot be decoded (the message says which key and why)."""


def wire_dtype(dtype: str, ndim: int, payload: str) -> str:
    """The NumPy dtype an array of ``dtype`` and ``ndim`` travels in under ``payload``."""
    if np.dtype(dtype).kind != "f" or payload == "fp32":
        return dtype
    if payload == "int8" and ndim >= 2:
        return "int8"
    return "float16"


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 ``(q, scale)`` of ``values`` (``ndim >= 2``)."""
    w = values.astype(np.float32, copy=False)
    amax = np.abs(w).max(axis=tuple(range(1, w.ndim)), initial=np.float32(0))
    scale = _canonical(amax / np.float32(127))
    safe = np.where(scale > 0, scale, np.float32(1)).reshape(-1, *[1] * (w.ndim - 1))
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)  # an all-zero channel: q = 0
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 array ``q * scale``, one scale per output channel."""
    return q.astype(np.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))


def _canonical(scale: np.ndarray) -> np.ndarray:
    # A decoded channel's largest value is fl(127 * s); requantizing it must give s again,
    # so s is moved to a fixed point of s -> fl(fl(127 * s) / 127) (one or two steps).
    scale = scale.astype(np.float32)
    for _ in range(_CANONICAL_STEPS):
        again = (scale * np.float32(127)) / np.float32(127)
        if np.array_equal(again, scale):
            break
        scale = again
    return scale


def encode(record: ArrayRecord, payload: str) -> ArrayRecord:
    """``record`` as it travels under ``payload`` (see the module docstring)."""
    if payload not in PAYLOAD_DTYPES:
        raise ValueError(f"payload-dtype: {payload!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    if payload == "fp32":
        return record
    out: dict[str, Array] = {}
    for key, array in record.items():
        values = array.numpy()
        wire = wire_dtype(str(values.dtype), values.ndim, payload)
        if wire == "int8":
            q, scale = quantize(values)
            out[key], out[key + SCALE] = Array(q), Array(scale)
        else:
            out[key] = array if wire == str(values.dtype) else Array(values.astype(wire))
    return ArrayRecord(out)


def decode(record: ArrayRecord, payload: str, reference: ArrayRecord | None = None) -> ArrayRecord:
    """The float32 arrays ``encode(..., payload)`` carried, under their original keys.

    With ``reference`` (the server's master), every key it knows must travel in exactly
    the dtype ``encode`` gives it (a float16 array where int8 was due is refused); keys it
    does not know are passed on for the window check to refuse. Raises ``PayloadError``.
    """
    if payload not in PAYLOAD_DTYPES:
        raise PayloadError(f"payload-dtype: {payload!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    keys = list(record.keys())
    for key in keys:
        if key.endswith(SCALE) and (key[:-len(SCALE)] not in record or payload != "int8"):
            raise PayloadError(f"{key}: a scale without its int8 array")
    if payload == "fp32":
        return record
    out: dict[str, Array] = {}
    for key in keys:
        if key.endswith(SCALE):
            continue
        array = record[key]
        if reference is not None and key in reference:
            mine = reference[key]
            due = wire_dtype(mine.dtype, len(mine.shape), payload)
            if array.dtype != due:
                raise PayloadError(f"{key}: dtype {array.dtype} on the wire, expected {due} "
                                   f"(payload-dtype {payload})")
        if array.dtype == "int8" and key + SCALE in record:
            out[key] = Array(dequantize(*_int8_pair(record, key)))
        elif array.dtype == "int8" and payload == "int8" and reference is not None and key in reference:
            raise PayloadError(f"{key}: int8 array without its scale {key + SCALE!r}")
        elif array.dtype == "float16":
            out[key] = Array(_numpy(array, key).astype(np.float32))
        else:
            out[key] = array
    return ArrayRecord(out)


def _numpy(array: Array, key: str) -> np.ndarray:
    try:
        values = array.numpy()
    except Exception as err:  # undecodable bytes are a malformed payload, not a crash
        raise PayloadError(f"{key}: undecodable array ({type(err).__name__})") from None
    if values.shape != tuple(array.shape) or str(values.dtype) != array.dtype:
        raise PayloadError(f"{key}: payload does not match its declared shape or dtype")
    return values


def _int8_pair(record: ArrayRecord, key: str) -> tuple[np.ndarray, np.ndarray]:
    """An int8 array and its scales, checked: one finite scale >= 0 per output channel."""
    q, scale = _numpy(record[key], key), _numpy(record[key + SCALE], key + SCALE)
    if q.ndim < 2:
        raise PayloadError(f"{key}: int8 payload needs ndim >= 2, got shape {q.shape}")
    if scale.dtype != np.float32 or scale.shape != (q.shape[0],):
        raise PayloadError(f"{key + SCALE}: expected float32 of shape ({q.shape[0]},), "
                           f"got {scale.dtype} of shape {scale.shape}")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise PayloadError(f"{key + SCALE}: scales must be finite and >= 0")
    if (q == -128).any():
        raise PayloadError(f"{key}: int8 values must lie in [-127, 127]")
    return q, scale
