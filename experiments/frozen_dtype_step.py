"""CPU seconds of one Snake training step of SmolLM2-135M with its frozen layers in bf16 or fp16.

    python experiments/frozen_dtype_step.py

``experiments/llm.toml``'s step (batch 8, 96 tokens, layer 0 trained, every layer above it
frozen and crossed by backward), with random weights, the frozen layers built in their
dtype; CPU seconds (``time.process_time``), so that waiting for a shared core does not count.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from snake_flower.tasks.architectures import load_config
from snake_flower.tasks.llm import CausalLMSegments
from snake_flower.tasks.llm_data import align_tokens
from snake_flower.training.frozen import DTYPES
from snake_flower.tasks.task import segment_keys
from snake_flower.training.loop import LocalWork, train_window


def random_node_model(config, held: torch.dtype) -> CausalLMSegments:  # noqa: ANN001
    """SmolLM2's segments with random weights (seed 0), every segment in ``held`` but ``layer00`` (fp32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config, dtype=held, attn_implementation="sdpa")
    model = CausalLMSegments(lm).train()
    model.layer00.float()
    return model


def main() -> None:
    config = load_config("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, config.vocab_size, (8, 96), generator=gen)
    y = torch.randint(3, config.vocab_size, (8, 96), generator=gen)
    for dtype in ("bf16", "fp16", "bf16"):  # bf16 twice: the first pays for warming up
        model = random_node_model(config, DTYPES[dtype])
        start = time.process_time()
        train_window(model, ["layer00"], (x, y), segments=segment_keys(model),
                     work=LocalWork(steps=1, batch_size=8, frozen_dtype=dtype, lr=0.02), seed=0, align=align_tokens)
        print(f"{dtype}: {time.process_time() - start:.1f} CPU s per step", flush=True)


if __name__ == "__main__":
    main()
