"""``train_window``: one hop of any model from a DataLoader, everything outside the window frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snake_flower import segment_model, train_window


class Blocks(nn.Module):
    """Nested blocks with BatchNorm: segments get dotted names like ``body.1``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 24)
        self.body = nn.ModuleList([nn.Sequential(nn.Linear(24, 24), nn.BatchNorm1d(24), nn.ReLU())
                                   for _ in range(3)])
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.body:
            x = block(x)
        return self.head(x)


def _data(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def test_train_window_freezes_everything_outside_a_nested_window():
    torch.manual_seed(0)
    model = Blocks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    segments = segment_model(model)
    name = next(n for n in segments if n.startswith("body"))
    x, y = _data(0)
    metrics = train_window(model, [name], DataLoader(TensorDataset(x, y), batch_size=32), segments=segments,
                           local_steps=5, lr=0.1)
    assert metrics["steps"] == 5 and metrics["num-examples"] == 160
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(segments[name]), changed  # BatchNorm statistics of the rest too
    with pytest.raises(ValueError, match="not among this model's"):
        train_window(model, ["missing"], [(x, y)], segments=segments)


def test_train_window_takes_dict_batches_and_restores_requires_grad():
    torch.manual_seed(0)
    model = Blocks()
    model.stem.weight.requires_grad_(False)  # the caller's own choice survives the hop
    segments = segment_model(model)
    x, y = _data(0, 64)
    batches = [{"img": x[i:i + 32], "label": y[i:i + 32]} for i in (0, 32)]
    metrics = train_window(model, [next(iter(segments))], batches, segments=segments)
    assert metrics["steps"] == 2 and metrics["num-examples"] == 64
    assert [p.requires_grad for p in model.parameters()].count(False) == 1
    with pytest.raises(ValueError, match="a dict batch needs an input key"):
        train_window(model, [next(iter(segments))], [{"pixels": x, "label": y}], segments=segments)


FRESH_PROCESS = """
import sys, time
import torch
from torch import nn
from snake_flower.training import loop

assert "torch._dynamo" not in sys.modules, "imported before the first hop: nothing to test"
seen = []

class Clock:
    def perf_counter(self):
        seen.append("torch._dynamo" in sys.modules)
        return time.perf_counter()

    def __getattr__(self, name):
        return getattr(time, name)

loop.time = Clock()
model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
loop.train_window(model, ["0"], (x, y), local_steps=2, batch_size=8, kd_weight=0.0)
print(seen[0])
"""


def test_train_window_clock_starts_after_torchs_lazy_import():
    """A fresh process's first optimizer imports ``torch._dynamo`` (a stock ClientApp's every
    hop): it happens before ``train-seconds`` starts, so the clock times the training alone."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
