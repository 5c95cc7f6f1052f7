"""What each node holds of the model, and so what it must be sent before a hop.

A node keeps its own copy of the model between visits. The server tracks, per node,
the version of every segment in that copy (a segment's version counts its merges);
``sync = "delta"`` then sends only the segments whose global version moved on,
``sync = "window"`` only the window. With hops in flight at once, a node's copy is
the model *as it was sent*, which other hops may have changed since: versions are
recorded as sent, never read back from the global model at merge time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord

from .window import relative_drift, select

SYNCS = ("delta", "window")


class NodeCopies:
    """Per node: the segment versions (and, with a tolerance, values) of its copy.

    Parameters
    ----------
    segments : Mapping[str, Sequence[str]]
        Segment name -> its ``state_dict`` keys.
    sync : str (default: "delta")
        ``"delta"`` or ``"window"`` (see the module docstring).
    tolerance : float (default: 0.0)
        With delta sync, a frozen (non-window) segment is resent only if the global copy
        has drifted from the node's by more than this relative L2 norm (values are kept
        per node to measure it); 0 resends every changed segment.
    """

    def __init__(self, segments: Mapping[str, Sequence[str]], sync: str = "delta",
                 tolerance: float = 0.0) -> None:
        if sync not in SYNCS:
            raise ValueError(f"sync: {sync!r} is not one of {', '.join(SYNCS)}")
        if tolerance < 0:
            raise ValueError(f"sync_tolerance: must be >= 0, got {tolerance}")
        self.segments, self.sync, self.tolerance = segments, sync, tolerance
        self.versions: dict[int, dict[str, int]] = {}  # node -> segment -> version it holds
        self.values: dict[int, dict[str, ArrayRecord]] = {}  # ... and its values (tolerance > 0)

    def to_send(self, node: int, window: Sequence[str], arrays: ArrayRecord,
                versions: Mapping[str, int]) -> list[str]:
        """Segments ``node`` lacks of ``arrays`` (at segment ``versions``) to train ``window``."""
        held = self.versions.get(node)
        if held is None:  # first visit, or the node's copy is unknown after a failure
            return list(self.segments)
        if self.sync == "window":
            return list(window)
        stale = [name for name in self.segments if held.get(name) != versions[name]]
        if self.tolerance > 0:
            copies = self.values.get(node, {})
            stale = [name for name in stale if name in window or name not in copies
                     or relative_drift(arrays, copies[name], self.segments[name]) > self.tolerance]
        return stale

    def versions_after(self, node: int, sent: Sequence[str], versions: Mapping[str, int]) -> list[int]:
        """Every segment's version in ``node``'s copy once it applied ``sent`` (others it keeps)."""
        held = self.versions.get(node, {})
        return [versions[name] if name in sent or name not in held else held[name] for name in self.segments]

    def trained(self, node: int, sent: Mapping[str, int], window: Mapping[str, int], sent_arrays: ArrayRecord,
                merged: ArrayRecord) -> None:
        """``node``'s hop merged: it holds the ``sent`` segments as sent (name -> version sent, values
        of ``sent_arrays``) and its ``window`` as merged (name -> new version, values of ``merged``)."""
        self.versions.setdefault(node, {}).update({**sent, **window})
        if self.tolerance > 0:  # remember the values too, to measure their drift later
            copies = self.values.setdefault(node, {})
            for names, arrays in ((sent, sent_arrays), (window, merged)):
                for name in names:
                    copies[name] = select(arrays, self.segments[name])

    def forget(self, node: int) -> None:
        """``node``'s copy is unknown (a failed hop, a node that left): resend it in full."""
        self.versions.pop(node, None)
        self.values.pop(node, None)

    def reset(self) -> None:
        """Forget every node (node ids change when a run resumes)."""
        self.versions, self.values = {}, {}
