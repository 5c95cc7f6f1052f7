"""A node's model built on the meta device and filled by its loads equals the seeded build."""

from __future__ import annotations

import pytest
import torch

from snake_flower.client_app import task_model
from snake_flower.config import resolve
from snake_flower.node_model import ModelBuilder, hold_parameters


@pytest.mark.parametrize("overrides", [{"task": "synthetic"}, {"task": "llm", "model": "tiny-opt", "window": 1}])
def test_a_meta_build_loaded_with_every_key_equals_the_seeded_build(overrides):
    cfg = resolve(overrides)
    real = task_model(cfg)
    state = real.state_dict()
    built = ModelBuilder(task_model, meta_build=True)(cfg, set(state))
    built.load_state_dict(state, strict=False)
    pairs = zip(real.named_parameters(remove_duplicate=False), built.named_parameters(remove_duplicate=False))
    assert all(name == other and torch.equal(a, b) for (name, a), (other, b) in pairs)
    ties = [name for name, p in built.named_parameters(remove_duplicate=False)
            if any(p is q and name != other for other, q in built.named_parameters())]
    assert ties == [name for name, p in real.named_parameters(remove_duplicate=False)
                    if any(p is q and name != other for other, q in real.named_parameters())]  # a tied head stays tied


def test_without_every_key_the_model_is_built_with_its_seeded_weights():
    cfg = resolve({"task": "synthetic"})
    real = task_model(cfg)
    partial = {key for key in real.state_dict() if not key.startswith("head")}
    built = ModelBuilder(task_model, meta_build=True)(cfg, partial)
    assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), built.state_dict().values()))


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory):
    """A two-layer Llama with tied embeddings saved as a checkpoint, as a pretrained model is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=256)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_a_pretrained_model_is_built_on_meta_and_read_from_its_checkpoint(pretrained_llama, finetune):
    cfg = resolve({"task": "llm", "model": pretrained_llama, "finetune": finetune, "window": 1})
    real = task_model(cfg)
    sent = {key: value for key, value in real.state_dict().items() if not key.startswith(("embed", "head"))}
    devices = []

    def recorded(config):  # a real build would run on the CPU device
        devices.append(torch.get_default_device().type)
        return task_model(config)

    def hold_embed(model):
        hold_parameters(model, [n for n, _ in model.named_parameters() if n.startswith("embed")], torch.bfloat16)

    built = ModelBuilder(recorded, meta_build=True)(cfg, set(sent), hold_embed)  # a fresh process's builder
    assert devices == ["meta"]
    built.load_state_dict(sent, strict=False)
    assert built.embed.tokens.weight.dtype == torch.bfloat16  # allocated held, read from the checkpoint
    assert torch.equal(built.embed.tokens.weight, real.embed.tokens.weight.bfloat16())
    assert built.head.lm_head.weight is built.embed.tokens.weight  # the tied head stays tied
    others = [(a, b) for (name, a), (_, b) in zip(real.named_parameters(), built.named_parameters())
              if not name.startswith("embed")]
    assert others and all(torch.equal(a, b) for a, b in others)
    assert all(torch.equal(a, b) for a, b in zip(real.buffers(), built.buffers()))  # rotary frequencies
