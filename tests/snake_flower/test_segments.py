"""``segment_model`` on torchvision models, a tiny Hugging Face causal LM and hand-made trees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snake_flower import segment_model

TORCHVISION = ["resnet18", "resnet50", "vgg11", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "densenet121", "convnext_tiny", "vit_b_16"]


def _check(model: nn.Module, segments: dict[str, list[str]], at_least: int = 4) -> None:
    """Non-empty, disjoint, covering every tensor once, in state_dict (forward) order."""
    state = model.state_dict(keep_vars=True)
    assert len(segments) >= at_least, list(segments)
    assert all(segments.values()), [name for name, keys in segments.items() if not keys]
    flat = [key for keys in segments.values() for key in keys]
    assert len(flat) == len(set(flat)), "a key is in two segments"
    owners = {}
    for key, tensor in state.items():
        owners.setdefault(id(tensor), key)
    assert set(flat) == set(owners.values()), "not every tensor is in exactly one segment"
    order = list(state)
    assert [order.index(k) for k in flat] == sorted(order.index(k) for k in flat), "not in forward order"


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_get_four_or_more_segments(name):
    from torchvision import models

    with torch.device("meta"):  # shapes only: a second for all nine
        model = getattr(models, name)(weights=None)
    segments = segment_model(model)
    _check(model, segments)
    if name == "vit_b_16":  # parameters the model owns directly join a neighbouring segment
        assert "class_token" in next(iter(segments.values()))
        assert any("encoder.pos_embedding" in keys for keys in segments.values())


def test_tiny_causal_lm_one_segment_per_decoder_layer_and_tied_head_not_sent():
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(config)
    segments = segment_model(model)
    _check(model, segments)
    for i in range(4):
        assert any(name.endswith(f"layers.{i}") for name in segments), list(segments)
    flat = [key for keys in segments.values() for key in keys]
    assert "lm_head.weight" not in flat and "model.decoder.embed_tokens.weight" in flat


def test_parameterless_modules_are_no_segments_and_names_are_nested():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.ReLU(),
                          nn.Sequential(nn.Linear(8, 8), nn.Dropout(), nn.Linear(8, 4)))
    segments = segment_model(model)
    _check(model, segments)
    assert list(segments) == ["0.0", "0.2", "2.0", "2.2"]
    assert segment_model(model, min_segments=1) == {"0": ["0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias"],
                                                    "2": ["2.0.weight", "2.0.bias", "2.2.weight", "2.2.bias"]}


def test_max_segments_merges_neighbours_and_a_leaf_is_never_split():
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])
    merged = segment_model(model, min_segments=2, max_segments=3)
    _check(model, merged, at_least=2)
    assert len(merged) <= 3
    leaf = nn.Linear(4, 4)
    assert segment_model(leaf) == {"": ["weight", "bias"]}  # one module: as far as the tree goes


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="min_segments"):
        segment_model(nn.Linear(2, 2), min_segments=0)
    with pytest.raises(ValueError, match="max_segments"):
        segment_model(nn.Linear(2, 2), min_segments=4, max_segments=2)
    with pytest.raises(ValueError, match="no parameters"):
        segment_model(nn.ReLU())
