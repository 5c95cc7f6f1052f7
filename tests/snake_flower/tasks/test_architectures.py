"""Architecture presets and local configs: exact parameter counts, no weights, no hub."""

from __future__ import annotations

import pytest

from snake_flower.tasks.architectures import PRESETS, ArchitectureError, load_config
from snake_flower.training.memory import build_meta_model

# Published sizes: OPT-1.3B as in design §5; Llama-3-8B's 8.03B; SmolLM2's 134.5M
# (notes/offline-data.md, M1, counted on the real weights).
# OPT-350m: 331,196,416 (its name is nominal).
EXACT = {"opt-1.3b": 1_315_758_080, "opt-350m": 331_196_416, "llama-3-8b": 8_030_261_248,
         "smollm2-135m": 134_515_008, "tiny-opt": 172_416}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_presets_have_the_published_parameter_counts(name):
    model = build_meta_model(load_config(name))
    assert sum(p.numel() for p in model.parameters()) == EXACT[name]
    assert all(p.device.type == "meta" for p in model.parameters())  # no weights were made


def test_every_preset_is_counted_here():
    assert set(PRESETS) == set(EXACT)


def test_preset_shapes():
    opt, llama = load_config("opt-1.3b"), load_config("llama-3-8b")
    assert (opt.model_type, opt.hidden_size, opt.num_hidden_layers, opt.ffn_dim) == ("opt", 2048, 24, 8192)
    assert opt.tie_word_embeddings and not llama.tie_word_embeddings
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.vocab_size) == (8, 14336, 128256)
    assert load_config("OPT-1.3B").hidden_size == 2048  # names are case-insensitive


def test_a_local_folder_with_a_config_json(tmp_path):
    load_config("smollm2-135m").save_pretrained(tmp_path)
    for path in (tmp_path, tmp_path / "config.json"):
        config = load_config(str(path))
        assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)


def test_unknown_model_is_one_line_listing_the_presets(tmp_path):
    with pytest.raises(ArchitectureError) as err:
        load_config("gpt-5")
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in PRESETS)
    with pytest.raises(ArchitectureError, match="config.json"):
        load_config(str(tmp_path))  # a folder without one


def test_a_broken_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArchitectureError) as err:
        load_config(str(tmp_path))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
