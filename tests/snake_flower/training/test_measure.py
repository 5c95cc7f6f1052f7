"""``snake-flower memory --measure``: one real hop per strategy, peak RSS beside the ledger."""

from __future__ import annotations

import json

import pytest
import torch

from snake_flower.cli import main
from snake_flower.harness.memory_table import format_measured
from snake_flower.tasks.architectures import load_config
from snake_flower.training.measure import (
    MeasureError,
    MeasureOptions,
    build_node_model,
    measure,
    miniature,
    run_arm,
    trained_segments,
)

TINY = MeasureOptions(model="tiny-opt", batch=2, seq=8, steps=1, frozen_dtype="fp16")


def test_snakes_frozen_segments_are_born_in_the_frozen_dtype_and_its_window_in_fp32():
    model = build_node_model(load_config("tiny-opt"),
                             torch.float16, "snake", window=1)
    window = trained_segments(model, "snake", 1)
    assert window == ["layer00"]  # the bottom of the sweep: embed and head stay pretrained
    for name, segment in model.named_children():
        dtypes = {p.dtype for p in segment.parameters()}
        assert dtypes == ({torch.float32} if name in window else {torch.float16}), name
    fedavg = build_node_model(load_config("tiny-opt"), torch.float16, "fedavg", window=1)
    assert {p.dtype for p in fedavg.parameters()} == {torch.float32}
    assert trained_segments(fedavg, "fedavg", 1) == [name for name, _ in fedavg.named_children()]


def test_miniature_keeps_the_architecture_on_toy_sizes():
    config = load_config("smollm2-135m")
    small = miniature(config)
    assert type(small) is type(config) and small.num_hidden_layers == 2
    assert small.hidden_size == 8 * config.num_attention_heads and config.hidden_size == 576
    model = build_node_model(small, torch.bfloat16, "snake", window=1)
    assert sum(p.numel() for p in model.parameters()) < 200_000  # 170,856 (SmolLM2: 134.5M)


def test_an_arm_reports_its_peak_baseline_and_ledger():
    got = run_arm("snake", TINY)  # in this process: the figures' shape, not their size
    assert got["peak_rss_bytes"] > 0 and got["baseline_rss_bytes"] > 0
    assert got["total_bytes"] == sum(v for k, v in got["ledger"].items() if k != "total_bytes") > 0
    assert got["ledger"]["optimizer_bytes"] == got["ledger"]["trainable_param_bytes"]  # SGD momentum
    assert got["window"] == ["layer00"] and got["frozen_dtype"] == got["payload_dtype"] == "fp16"


def test_measure_runs_each_arm_in_a_fresh_process():
    report = measure(TINY, arms=("snake",))
    assert report["snake"]["peak_rss_bytes"] >= report["snake"]["baseline_rss_bytes"] > 0
    assert "snake_over_fedavg" not in report  # one arm: no ratio


def test_measured_table():
    arm = {"peak_rss_bytes": 3 * 2**20, "baseline_rss_bytes": 2**20, "total_bytes": 2**21,
           "window": ["layer00"], "frozen_dtype": "bf16", "payload_dtype": "bf16"}
    report = {"model": "m", "options": {"steps": 2, "optimizer": "adam", "batch": 8, "seq": 96},
              "fedavg": arm, "snake": arm, "snake_over_fedavg": {"measured": 1.0, "ledger": 1.0}}
    table = format_measured(report)
    assert "layer00" in table and "bf16" in table and "1.00 measured" in table


@pytest.mark.parametrize(("argv", "match"), [
    (["--optimizer", "lion"], "optimizer"), (["--frozen-dtype", "int8"], "frozen-dtype"),
    (["--steps", "0"], "steps"), (["--model", "gpt-9"], "model"), (["--strategies", "split"], "strategies"),
])
def test_measure_errors_are_one_line_and_exit_2(capsys, argv, match):
    args = ["memory", "--measure", "--model", "tiny-opt", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"snake-flower: error: {match}") and "\n" not in err


def test_bad_options_raise():
    with pytest.raises(MeasureError, match="batch"):
        MeasureOptions(batch=0)
    assert json.loads(json.dumps(TINY.__dict__))["model"] == "tiny-opt"


def test_a_post_norm_opt_without_a_final_norm_runs_as_segments():
    config = miniature(load_config("opt-350m"))  # normalises inside its blocks: no final norm
    assert config.do_layer_norm_before is False
    model = build_node_model(config, torch.bfloat16, "fedavg", window=1)
    assert model.head.norm is None
    logits = model(torch.randint(3, config.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, config.vocab_size) and torch.isfinite(logits).all()
