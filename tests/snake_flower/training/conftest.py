"""Fixture: bytes of live tensor storage, at their peak, for tests that count memory without RSS.

A ``TorchDispatchMode`` sees every operator call, forward and backward. Every storage
an operator reads or writes is tracked (once) until it is freed, which a weak reference
to the storage tells; the peak is the largest sum after any operator. Storages made outside
the mode (a model's parameters, a batch) count from the first operator that touches
them, or from the start when passed to the constructor.
"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes(*tensors) as live: ...`` then ``live.peak`` (bytes)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        for tensor in tensors:
            self._track(tensor)
        self.peak = self.now

    def restart(self) -> None:
        """Count the peak from now on (what is live now stays counted)."""
        self.peak = self.now

    def _track(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata not in self._live:
            self._live[ref.cdata] = (ref, storage.nbytes())
            self.now += storage.nbytes()

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for tensor in tree_leaves((args, kwargs, out)):
            self._track(tensor)
        self.peak = max(self.peak, self.now)
        return out


@pytest.fixture
def live_bytes() -> type[LiveBytes]:
    """The ``LiveBytes`` class, for tests that count a hop's peak tensor bytes."""
    return LiveBytes
