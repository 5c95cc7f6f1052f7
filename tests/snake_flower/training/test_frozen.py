"""frozen-dtype = "int8": per-channel int8 frozen weights, dequantized on use, restored exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from snake_flower.config import resolve
from snake_flower.tasks.task import segment_keys, small_cnn
from snake_flower.training.frozen import hold_frozen_in, native_dtype, quantize_int8, resolve_dtype, restore
from snake_flower.training.loop import LocalWork, train_window

WINDOW = ["conv1", "head"]  # one segment + head


def _batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return small_cnn()


def test_quantize_int8_is_per_output_channel_and_symmetric():
    w = torch.randn(3, 4, 5)
    w[1] = 0.0  # an all-zero channel dequantizes to exact zeros
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (3,) and scale[1] == 0
    assert q.abs().amax(dim=(1, 2)).tolist() == [127, 0, 127]  # each channel's max maps to 127
    back = q.float() * scale.view(-1, 1, 1)
    assert torch.all((back - w).abs() <= scale.view(-1, 1, 1) / 2 + 1e-7)


def test_int8_frozen_ledger_is_at_least_3_5x_smaller_than_fp32():
    x, y = _batch()
    ledgers = {dtype: train_window(model, WINDOW, (x, y), segments=segment_keys(model),
                                   work=LocalWork(steps=2, frozen_dtype=dtype))
               for dtype in ("fp32", "int8") for model in [_model()]}
    model = _model()
    frozen = [p for name, seg in model.named_children() if name not in WINDOW for p in seg.parameters()]
    weights = [p for p in frozen if p.dim() >= 2]
    # int8 weights, one fp32 scale per output channel, fp32 biases
    expected = sum(p.numel() + 4 * p.shape[0] for p in weights) + 4 * sum(p.numel() for p in frozen if p.dim() < 2)
    assert ledgers["int8"]["frozen-param-bytes"] == expected == 52_224
    assert ledgers["fp32"]["frozen-param-bytes"] == 4 * sum(p.numel() for p in frozen) == 203_520
    assert ledgers["fp32"]["frozen-param-bytes"] / ledgers["int8"]["frozen-param-bytes"] >= 3.5  # 3.90
    assert ledgers["int8"]["trainable-param-bytes"] == ledgers["fp32"]["trainable-param-bytes"]


def test_int8_hop_leaves_everything_outside_the_window_bit_identical():
    x, y = _batch()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_window(model, WINDOW, (x, y), segments=segment_keys(model),
                 work=LocalWork(steps=3, kd_weight=0.5, frozen_dtype="int8"), seed=0)
    after = model.state_dict()
    assert list(after) == list(before)  # no parametrization left behind
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key in before:
        assert torch.equal(before[key], after[key]) == (key.split(".")[0] not in WINDOW), key


def test_int8_held_model_computes_with_the_dequantized_weights():
    x, _ = _batch(8)
    model = _model().eval()
    exact = model(x)
    for p in model.parameters():
        p.requires_grad_(False)
    held = hold_frozen_in(model, "int8")
    try:
        assert model.fc1[0].parametrizations.weight.original.dtype == torch.int8
        assert model.fc1[0].bias.dtype == torch.float32  # 1-D parameters stay fp32
        approx = model(x)
    finally:
        restore(held)
    assert not torch.equal(approx, exact) and torch.allclose(approx, exact, atol=0.05)
    assert torch.equal(model(x), exact)


def test_int8_failing_step_still_restores_exactly():
    x, y = _batch()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(logits, labels):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        train_window(model, WINDOW, (x, y), segments=segment_keys(model),
                     work=LocalWork(steps=2, frozen_dtype="int8"), seed=0, align=broken)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("task", ["fashion-mnist", "synthetic", "vgg11"])
def test_config_accepts_int8_frozen_for_every_task(task):
    assert resolve({"task": task, "frozen-dtype": "int8"})["frozen-dtype"] == "int8"


def _training_peak(live_bytes, model, window, x, y, work) -> tuple[int, dict[str, float]]:
    """Peak live tensor bytes while the window trains (first forward to last step), and the ledger.

    The ledger's scope: before the first step the node's model is still fp32 as it arrived,
    and ``restore`` makes it fp32 again after the last.
    """
    live = live_bytes(*model.parameters(), x, y)
    marks: list[int] = []
    started = model.register_forward_pre_hook(lambda *_: None if marks else live.restart())
    stepped = register_optimizer_step_post_hook(lambda *_: marks.append(live.peak))
    try:
        with live:
            ledger = train_window(model, window, (x, y), segments=segment_keys(model), work=work, seed=0)
    finally:
        started.remove()
        stepped.remove()
    return marks[-1], ledger


def test_int8_frozen_peak_falls_with_the_ledger_on_vgg11(live_bytes):
    from snake_flower.tasks.task import vgg11_cifar
    from snake_flower.training.frozen import Int8Dequant

    torch.manual_seed(0)
    base = vgg11_cifar()
    with torch.no_grad():  # the node's copy as int8 payloads leave it: int8 holds it exactly
        for p in base.parameters():
            if p.dim() >= 2:
                q, scale = quantize_int8(p)
                p.copy_(Int8Dequant(scale)(q))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    peaks, ledgers = {}, {}
    for dtype in ("fp32", "int8"):
        model = copy.deepcopy(base)
        peaks[dtype], ledgers[dtype] = _training_peak(live_bytes, model, ["head"], x, y,
                                                      LocalWork(steps=2, batch_size=4, frozen_dtype=dtype))
        assert torch.equal(model.block5[0].weight, base.block5[0].weight)  # restored exactly
    ledger_drop = ledgers["fp32"]["total-bytes"] - ledgers["int8"]["total-bytes"]
    assert ledger_drop > 25e6  # 9.2M frozen parameters: 4 B -> 1 B (+ scales)
    # measured 19.7 MB of the ledger's 27.6: one frozen weight at a time is dequantized to fp32
    assert peaks["fp32"] - peaks["int8"] >= 0.6 * ledger_drop
    largest = max(p.numel() * 4 for p in base.parameters())
    assert peaks["int8"] <= ledgers["int8"]["total-bytes"] + largest + 2**20


@pytest.mark.parametrize(("flags", "dtype"), [
    ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),  # this project's EPYC: bf16
    ({"avx512f", "avx512_fp16"}, "fp16"), ({"fp", "asimdhp"}, "fp16"),
    ({"avx2", "f16c"}, "fp32"), (set(), "fp32"),  # f16c converts, it does not compute
])
def test_auto_picks_the_dtype_the_cpu_computes_natively(flags, dtype):
    assert native_dtype(flags) == dtype


def test_auto_is_native_for_llm_and_fp32_for_the_other_tasks():
    config = {"lr": 0.05, "local-epochs": 1, "local-steps": 1, "batch-size": 4, "momentum": 0.0,
              "weight-decay": 0.0, "clip-norm": 1.0, "kd-weight": 0.0, "kd-temperature": 2.0,
              "frozen-dtype": "auto"}
    assert LocalWork.from_config({**config, "task": "llm"}, kd=False).frozen_dtype == native_dtype()
    assert LocalWork.from_config({**config, "task": "vgg11"}, kd=False).frozen_dtype == "fp32"
    assert resolve_dtype("int8", "llm") == "int8"
    assert resolve({})["frozen-dtype"] == "auto"
