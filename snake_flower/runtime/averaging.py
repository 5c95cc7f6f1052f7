"""A moving average of the global model over hops, kept on the server.

Snake's global model changes one window at a time, and a hop on a skewed node can pull
the accuracy down for a few hops. Averaging the model over hops (an exponential moving
average, as in Polyak averaging) steadies what is evaluated and what the run returns.
Nodes keep receiving the raw model, so training and delta sync are unchanged.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord


class ModelAverage:
    """``average <- decay * average + (1 - decay) * model`` at every hop.

    Parameters
    ----------
    decay : float
        Weight of the past, in [0, 1); the average starts at the first hop's model.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"average-decay: must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.state: dict[str, torch.Tensor] = {}

    def update(self, arrays: ArrayRecord) -> ArrayRecord:
        """Fold in the model after a hop; return the average."""
        model = arrays.to_torch_state_dict()
        if not self.state:
            self.state = {key: value.clone() for key, value in model.items()}
        for key, value in model.items():
            if value.is_floating_point():
                self.state[key].mul_(self.decay).add_(value, alpha=1.0 - self.decay)
            else:  # counters such as BatchNorm's num_batches_tracked: the latest
                self.state[key] = value.clone()
        return self.arrays

    @property
    def arrays(self) -> ArrayRecord:
        """The average as an ArrayRecord, in the model's key order."""
        return ArrayRecord({key: value.clone() for key, value in self.state.items()})

    def load(self, arrays: ArrayRecord | None) -> None:
        """Continue from a checkpoint's average (``None``: none was kept yet)."""
        self.state = {} if arrays is None else dict(arrays.to_torch_state_dict())
