"""The LM head and loss over chunks of tokens, and frozen layers recomputed in backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snake_flower.training.head_loss import head_loss, working_bytes
from snake_flower.tasks.task import segment_keys
from snake_flower.training.loop import LocalWork, distillation_loss, train_window


def _inputs(n: int = 50, d: int = 16, vocab: int = 300, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5).to(dtype).requires_grad_(dtype == torch.float32)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    target = torch.randn(n, vocab, generator=gen) * 3
    return hidden, weight, labels, target


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [t for t in tensors if t.requires_grad]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: a frozen head, as Snake's
@pytest.mark.parametrize("kd", [0.0, 0.7])
@pytest.mark.parametrize("rows", [7, 50])
def test_chunked_loss_and_gradients_equal_the_unchunked(rows, kd, dtype):
    hidden, weight, labels, target = _inputs(dtype=dtype)
    whole = distillation_loss(F.linear(hidden, weight).float(), target, labels, kd, 2.0)
    chunked = head_loss(hidden, weight, labels, target, kd, 2.0, rows=rows)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    assert torch.allclose(chunked, whole, **tol)
    for ours, reference in zip(_grads(3.0 * chunked, hidden, weight), _grads(3.0 * whole, hidden, weight)):
        assert ours.dtype == reference.dtype
        assert torch.allclose(ours.float(), reference.float(), **tol)


@pytest.mark.parametrize("kd", [0.0, 0.7])
def test_chunked_loss_holds_one_chunk_of_logits_not_the_batchs(kd, live_bytes):
    n, vocab, rows = 256, 4096, 16
    peaks = {}
    for name in ("whole", "chunked"):
        hidden, weight, labels, target = _inputs(n, 32, vocab)
        weight.requires_grad_(False)  # a frozen head (Snake's): no [V, d] gradient either way
        with live_bytes(hidden, weight, labels, target) as live:
            if name == "whole":
                loss = distillation_loss(F.linear(hidden, weight), target, labels, kd, 2.0)
            else:
                loss = head_loss(hidden, weight, labels, target, kd, 2.0, rows=rows)
            loss.backward()
        peaks[name] = live.peak - live.now  # what the loss held beyond what stays (inputs, grad)
    logits = n * vocab * 4
    assert peaks["whole"] > 2.5 * logits  # log-probabilities, their gradient, the logits' gradient
    assert peaks["chunked"] <= working_bytes(hidden, vocab, rows, kd > 0) < logits


def _llm_hop(chunked: bool, recompute: bool, kd: float, live_bytes) -> tuple[dict, dict, int]:
    """A Snake hop of a 4-layer tiny OPT, window ``layer00``: three frozen layers above it."""
    from transformers import AutoModelForCausalLM

    from snake_flower.tasks.architectures import load_config
    from snake_flower.tasks.llm import CausalLMSegments
    from snake_flower.tasks.llm_data import align_tokens

    config = load_config("tiny-opt")
    config.num_hidden_layers, config.dropout, config.attention_dropout = 4, 0.0, 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalLMSegments(AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                                  attn_implementation="sdpa")).train()
    model.chunked_head, model.recompute_frozen = chunked, recompute
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(3, 1000, (8, 48), generator=gen), torch.randint(3, 1000, (8, 48), generator=gen)
    work = LocalWork(steps=2, batch_size=4, lr=0.05, kd_weight=kd)
    with live_bytes(*model.parameters(), x, y) as live:
        metrics = ledger = train_window(model, ["layer00"], (x, y), segments=segment_keys(model),
                                        work=work, seed=0, align=align_tokens)
    return model.state_dict(), metrics | ledger, live.peak


@pytest.mark.parametrize("kd", [0.0, 0.7])
def test_an_llm_hop_with_chunks_and_recompute_trains_as_the_plain_one_and_holds_less(kd, live_bytes):
    plain, plain_metrics, plain_peak = _llm_hop(False, False, kd, live_bytes)
    chunked, _, chunked_peak = _llm_hop(True, False, kd, live_bytes)
    ours, metrics, peak = _llm_hop(True, True, kd, live_bytes)
    assert metrics["train-loss"] == pytest.approx(plain_metrics["train-loss"], rel=1e-6)
    for key, value in ours.items():
        assert torch.allclose(value, plain[key], rtol=1e-5, atol=1e-7), key
    assert peak < chunked_peak < plain_peak
    # the ledger of the hop covers what it really held (live tensor bytes)
    assert metrics["total-bytes"] >= peak  # the plain hop's ledger missed the loss's buffers
