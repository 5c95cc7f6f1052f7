"""The analytic memory ledger (design §5) and ``snake-flower memory``."""

from __future__ import annotations

import json

import pytest
import torch

from snake_flower.cli import main
from snake_flower.tasks.architectures import ArchitectureError, load_config
from snake_flower.training.loop import SavedActivations, memory_ledger
from snake_flower.training.memory import (
    GIB,
    MemoryOptions,
    MemoryOptionsError,
    analyze,
    build_meta_model,
    segments,
)

MEMORY_KEYS = {"trainable_param_bytes", "frozen_param_bytes", "grad_bytes", "optimizer_bytes",
               "activation_bytes", "total_bytes", "peak_rss_bytes"}  # design §6


@pytest.fixture(scope="module")
def opt():
    return analyze("opt-1.3b")


def test_opt_1_3b_exact_count(opt):
    assert opt["params"] == 1_315_758_080 and opt["layer_params"] == 50_358_272
    assert opt["decoder_layers"] == 24
    assert opt["fedavg"]["total_bytes"] == 16 * 1_315_758_080
    assert opt["snake"]["total_bytes"] == 16 * 50_358_272 + 2 * (1_315_758_080 - 50_358_272)
    assert opt["total_gib"] == {"fedavg": 19.61, "snake": 3.11}


def test_opt_1_3b_nominal_count_gives_the_papers_figures(opt):
    nominal = opt["nominal"]
    assert nominal["params"] == 1.3e9
    assert nominal["total_gib"] == {"fedavg": 19.37, "snake": 3.13} == opt["paper_gb"]
    assert nominal["snake"]["total_bytes"] == pytest.approx(1.3e9 * (16 + 23 * 2) / 24, abs=2)


def test_ledgers_have_the_results_memory_shape(opt):
    for ledger in (opt["fedavg"], opt["snake"], opt["nominal"]["fedavg"], opt["nominal"]["snake"]):
        assert set(ledger) == MEMORY_KEYS
        assert ledger["total_bytes"] == sum(v for k, v in ledger.items() if k not in ("total_bytes", "peak_rss_bytes"))
    snake = opt["snake"]
    assert snake["grad_bytes"] == snake["trainable_param_bytes"] == snake["optimizer_bytes"] // 2
    assert opt["fedavg"]["frozen_param_bytes"] == 0


def test_segments_are_embeddings_layers_head_with_the_tied_head_once():
    model = build_meta_model(load_config("opt-1.3b"))
    segs = segments(model)
    names = list(segs)
    assert names[0] == "embeddings" and names[-1] == "head" and names[1:-1] == [f"layer.{i}" for i in range(24)]
    counts = {name: sum(p.numel() for p in ps) for name, ps in segs.items()}
    assert counts["embeddings"] == 50272 * 2048 + 2050 * 2048  # tokens (= the tied head) + positions
    assert counts["head"] == 2 * 2048  # the final layer norm
    assert sum(counts.values()) == 1_315_758_080


def test_llama_3_8b():
    report = analyze("llama-3-8b")
    assert report["params"] == 8_030_261_248 and report["layer_params"] == 218_112_000
    assert report["total_gib"] == {"fedavg": 119.66, "snake": 17.80}
    assert report["nominal"]["total_gib"] == {"fedavg": 119.21, "snake": 18.16}
    assert report["paper_gb"] == {}  # the paper's figure is OPT-1.3B's


def test_window_and_frozen_dtype():
    four = analyze("opt-1.3b", MemoryOptions(window=4, frozen_dtype="int8"))
    n, layer = 1_315_758_080, 50_358_272
    assert four["trainable_params"]["snake"] == 4 * layer
    assert four["snake"]["total_bytes"] == 16 * 4 * layer + (n - 4 * layer)
    assert four["nominal"]["snake"]["total_bytes"] == pytest.approx(1.3e9 * (16 * 4 + 20) / 24, abs=2)
    fp32 = analyze("opt-1.3b", MemoryOptions(frozen_dtype="fp32"))
    assert fp32["snake"]["frozen_param_bytes"] == 4 * (n - layer)
    assert fp32["fedavg"] == analyze("opt-1.3b")["fedavg"]  # FedAvg freezes nothing


def test_lora_trains_the_adapters_only():
    report = analyze("opt-1.3b", MemoryOptions(finetune="lora", lora_rank=8))
    adapters = 24 * 2 * (8 * 2048 + 2048 * 8)  # q and v: A (r x d) and B (d x r) per layer
    assert report["trainable_params"] == {"fedavg": adapters, "snake": adapters // 24}
    assert report["params"] == 1_315_758_080 + adapters
    assert report["fedavg"]["total_bytes"] == 16 * adapters + 2 * 1_315_758_080
    assert report["total_gib"] == {"fedavg": 2.47, "snake": 2.45}
    assert report["nominal"] is None  # the paper's convention is for full fine-tuning


def test_analytic_ledger_equals_a_measured_adam_step():
    # The same tiny OPT with real weights: one decoder layer trains with Adam, the rest stays fp32.
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(load_config("tiny-opt"))
    window = segments(model)["layer.1"]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in window:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(window)
    ids = torch.randint(0, 1000, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    measured = memory_ledger(model, window, optimizer, 0)
    analytic = analyze("tiny-opt", MemoryOptions(frozen_dtype="fp32"))["snake"]
    for key in ("trainable_param_bytes", "frozen_param_bytes", "grad_bytes"):
        assert measured[key.replace("_", "-")] == analytic[key]
    # torch's Adam also keeps a 4-byte step counter per tensor, which the ledger leaves out
    assert measured["optimizer-bytes"] == analytic["optimizer_bytes"] + 4 * len(window)


def _tiny_llama(path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=500, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                tie_word_embeddings=False).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_activations_on_meta_equal_a_real_forward(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(tmp_path) if model == "tiny-llama" else model
    report = analyze(model, MemoryOptions(batch=2, seq=16))
    acts = report["activations"]
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(load_config(model), attn_implementation="eager")
    segs = segments(real)

    def measured(trainable):
        for p in real.parameters():
            p.requires_grad_(any(p is q for q in trainable))
        meter = SavedActivations(real.parameters())
        ids = torch.randint(0, real.config.vocab_size, (2, 16))
        with meter:
            real(input_ids=ids, labels=ids)
        return meter.peak

    layers = [name for name in segs if name.startswith("layer.")]
    assert acts["fedavg"] == measured(list(real.parameters()))
    assert acts["snake_window_first"] == measured(segs[layers[0]])
    assert acts["snake_window_last"] == measured(segs[layers[-1]])
    # frozen layers below the window save nothing: the bottom of the sweep is the peak
    assert acts["fedavg"] > acts["snake"] == acts["snake_window_first"] > acts["snake_window_last"]
    assert report["snake"]["activation_bytes"] == acts["snake"]
    assert report["fedavg"]["total_bytes"] == 16 * report["params"] + acts["fedavg"]


def test_no_activations_unless_asked(opt):
    assert opt["activations"] is None
    assert opt["fedavg"]["activation_bytes"] == opt["snake"]["activation_bytes"] == 0
    with pytest.raises(MemoryOptionsError, match="seq: 129 exceeds the 128 positions"):
        analyze("tiny-opt", MemoryOptions(batch=1, seq=129))


@pytest.mark.parametrize("options, match", [
    ({"batch": 2}, "batch, seq"), ({"batch": -1, "seq": 4}, "batch, seq"),
    ({"window": 0}, "window"), ({"frozen_dtype": "fp8"}, "frozen-dtype"),
    ({"finetune": "qlora"}, "finetune"), ({"lora_rank": 0}, "lora-rank"),
    ({"finetune": "lora", "lora_targets": ()}, "lora-targets")])
def test_bad_options(options, match):
    with pytest.raises(MemoryOptionsError, match=match):
        MemoryOptions(**options)


def test_window_beyond_the_layers_and_unknown_targets():
    with pytest.raises(MemoryOptionsError, match="window: 3 exceeds the 2 decoder layers"):
        analyze("tiny-opt", MemoryOptions(window=3))
    with pytest.raises(MemoryOptionsError, match="lora-targets"):
        analyze("tiny-opt", MemoryOptions(finetune="lora", lora_targets=("no_such_proj",)))
    with pytest.raises(ArchitectureError):
        analyze("no-such-model")


def test_cli_json(capsys):
    assert main(["memory", "--model", "opt-1.3b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["fedavg"]) == set(report["snake"]) == MEMORY_KEYS
    assert report["fedavg"]["total_bytes"] / GIB == pytest.approx(19.606, abs=1e-3)
    assert report["total_gib"] == {"fedavg": 19.61, "snake": 3.11}
    assert report["nominal"]["total_gib"] == {"fedavg": 19.37, "snake": 3.13}


def test_cli_table(capsys):
    assert main(["memory", "--model", "opt-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "1,315,758,080 parameters" in out and "19.61" in out and "3.11" in out
    assert "19.37" in out and "3.13" in out
    assert main(["memory", "--model", "tiny-opt", "--window", "2", "--finetune", "lora",
                 "--batch", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "MiB" in out and "activations of 2 x 8 tokens" in out  # a tiny model: not 0.00 GiB


@pytest.mark.parametrize("argv, match", [
    (["--model", "nope"], "is not a preset (opt-1.3b, opt-350m, llama-3-8b, smollm2-135m, tiny-opt)"),
    (["--model", "tiny-opt", "--window", "x"], "window: expected an integer"),
    (["--model", "tiny-opt", "--window", "9"], "window: 9 exceeds"),
    (["--model", "tiny-opt", "--frozen-dtype", "fp8"], "frozen-dtype"),
    (["--model", "tiny-opt", "--lora-rank", "-1"], "lora-rank"),
    (["--model", "tiny-opt", "--batch", "2"], "batch, seq")])
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, match):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("snake-flower: error: ") and match in err
