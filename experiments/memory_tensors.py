"""Where a Snake hop's tensor memory peaks: live tensor storage through one SmolLM2-135M hop.

    python experiments/memory_tensors.py [--model smollm2-135m] [--optimizer adam]

The same hop as ``snake-flower memory --measure`` (8 x 96 random tokens, layer 0 trained,
frozen layers born in bf16, 2 steps), counted with the tests' ``LiveBytes`` dispatch mode:
the peak of live tensor bytes, the operator it was reached in, and the hop's ledger (MiB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "snake_flower" / "training"))
from conftest import LiveBytes  # noqa: E402

from snake_flower.tasks.architectures import load_config  # noqa: E402
from snake_flower.tasks.llm_data import align_tokens  # noqa: E402
from snake_flower.tasks.task import segment_keys  # noqa: E402
from snake_flower.training.loop import LocalWork, train_window  # noqa: E402
from snake_flower.training.measure import build_node_model, trained_segments  # noqa: E402


class PeakOp(LiveBytes):
    """``LiveBytes`` that also remembers the operator at which the peak was reached."""

    at = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        before = self.peak
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.peak > before:
            self.at = str(func)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--optimizer", default="adam")
    args = parser.parse_args()
    config = load_config(args.model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, config.vocab_size, (16, 96), generator=gen)
    y = torch.randint(3, config.vocab_size, (16, 96), generator=gen)
    model = build_node_model(config, torch.bfloat16, "snake", 1)
    live = PeakOp(*model.parameters(), x, y)
    with live:
        ledger = train_window(model, trained_segments(model, "snake", 1), (x, y), segments=segment_keys(model),
                              work=LocalWork(steps=2, batch_size=8, frozen_dtype="bf16", optimizer=args.optimizer),
                              seed=0, align=align_tokens)
    mib = 2**20
    print(f"peak live tensors {live.peak / mib:,.0f} MiB in {live.at}; ledger {ledger['total-bytes'] / mib:,.0f} MiB")


if __name__ == "__main__":
    main()
