"""Fixtures: the real ClientApp run in-process behind a LoopbackGrid (no Ray), and live tensor bytes."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, Error, RecordDict
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from snake_flower.client_app import app as client_app


class InProcessNodes:
    """``n`` nodes running the project's ClientApp (or ``app``), each with its own ``context.state``."""

    def __init__(self, n: int, first_id: int = 1000, app=client_app) -> None:  # noqa: ANN001
        self.app = app
        self.contexts = {first_id + 7 * i: Context(run_id=1, node_id=first_id + 7 * i,
                                                   node_config={"partition-id": i, "num-partitions": n},
                                                   state=RecordDict(), run_config={})
                         for i in range(n)}
        self.tamper = None  # optional (content, node_id) -> content

    def __call__(self, msg) -> RecordDict | Error:
        node = msg.metadata.dst_node_id
        sent = msg.content  # Flower hands each node its own copy: the node may release its records
        msg.content = RecordDict(dict(sent.items()))
        try:
            content = self.app(msg, self.contexts[node]).content
        except Exception as err:  # a crashing ClientApp becomes an error reply, as in Flower
            return Error(code=1, reason=f"{type(err).__name__}: {err}")
        finally:
            msg.content = sent
        return self.tamper(content, node) if self.tamper else content


@pytest.fixture
def nodes():
    return InProcessNodes


# Bytes of live tensor storage, at their peak, for tests that count memory without RSS.
# A ``TorchDispatchMode`` sees every operator call, forward and backward. Every storage an
# operator reads or writes is tracked (once) until it is freed, which a weak reference to
# the storage tells; the peak is the largest sum after any operator. Storages made outside
# the mode (a model's parameters, a batch) count from the first operator that touches them,
# or from the start when passed to the constructor.

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
