"""What a Snake hop's reply must be before its window is merged.

One ``ArrayRecord`` that decodes in the run's payload dtype; exactly the window's keys,
shapes and finite values (``window.check_window``); a window no other hop merged into
since this one was sent (concurrent hops); an update within ``max_update_norm``; and a
``num-examples`` that is a number. Every check runs before the strategy changes any
state, so a bad reply costs its hop and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, Message

from .payload import PayloadError, decode
from .window import MUST_SEND, check_window, update_norm


def checked_window(hop: Mapping[str, Any], records: Sequence[ArrayRecord], reported: Mapping[str, Any],
                   arrays: ArrayRecord, keys: Sequence[str], versions: Mapping[str, int], *,
                   payload_dtype: str, max_update_norm: float) -> tuple[ArrayRecord | None, str | None]:
    """The reply's window decoded to fp32, or ``None`` and why it must not be merged.

    Parameters
    ----------
    hop : Mapping[str, Any]
        The hop's row: its ``window`` and the segment versions it was sent (``versions_sent``).
    records, reported : Sequence[ArrayRecord], Mapping[str, Any]
        The reply's array records and its metrics.
    arrays : ArrayRecord
        The global model now (the reference for decoding and for the update's norm).
    keys : Sequence[str]
        The window's ``state_dict`` keys.
    versions : Mapping[str, int]
        Every segment's version now.
    payload_dtype, max_update_norm : str, float
        As ``SnakeStrategy``'s.
    """
    if len(records) != 1:
        return None, f"expected one ArrayRecord, got {len(records)}; {MUST_SEND}"
    try:
        window = decode(records[0], payload_dtype, reference=arrays)
    except PayloadError as err:
        return None, f"undecodable {payload_dtype} payload: {err}"
    reason = stale(hop, versions) or check_window(window, arrays, keys)
    if reason is None and max_update_norm > 0:
        norm = update_norm(window, arrays, keys)
        if norm > max_update_norm:
            reason = f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}"
    examples = reported.get("num-examples", 0)
    if reason is None and (isinstance(examples, bool) or not isinstance(examples, (int, float))):
        reason = f"num-examples: expected a number, got {examples!r}"
    return (window, None) if reason is None else (None, reason)


def stale(hop: Mapping[str, Any], versions: Mapping[str, int]) -> str | None:
    """Why ``hop``'s reply is stale: a window segment merged by another hop since it was sent."""
    moved = [name for name in hop["window"] if versions[name] != hop["versions_sent"][name]]
    if moved:
        return (f"stale: window segment(s) {', '.join(moved)} merged by another hop since this one "
                f"was sent (only disjoint windows may be in flight together)")
    return None


FULL_SYNC = "full-sync-needed"
"""A reply's metric (> 0) and ConfigRecord (its ``reason``): the node lacks the copy of the model
the message assumed (its state was lost) and needs every segment to train the hop."""


def full_sync_reason(reply: Message) -> str | None:
    """Why ``reply``'s node asks for the whole model (``FULL_SYNC``), or ``None`` if it does not."""
    if reply.has_error():
        return None
    content = reply.content
    if not any(float(record.get(FULL_SYNC, 0.0)) > 0 for record in content.metric_records.values()):
        return None
    said = content.config_records.get(FULL_SYNC)
    return str(said.get("reason", "")) if said is not None and said.get("reason") else "no reason given"


def last_line(reason: str) -> str:
    """The line of a remote error that says what happened."""
    # An error reply can carry a whole remote traceback, wrapped as "<class ...>:<'...'>".
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1].removesuffix("'>") if lines else reason
