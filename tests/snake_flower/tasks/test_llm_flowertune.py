"""Federated LoRA as FlowerTune trains it (tiny-opt): AdamW, LoRA dropout, gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from snake_flower.config import ConfigError, resolve
from snake_flower.config.run_config import kd_enabled, node_message
from snake_flower.server_app import fedavg_message, run
from snake_flower.tasks.task import build_model, segment_keys, task_for
from snake_flower.training.loop import LocalWork, train_window

BASE = {"task": "llm", "model": "tiny-opt", "seq-len": 48, "partitioner": "topic", "window": 1,
        "train-head": False, "local-steps": 2, "batch-size": 4, "lr": 0.01, "eval-samples": 32, "eval-every": 1}
FLOWERTUNE = {"strategy": "fedavg", "finetune": "lora", "optimizer": "adamw", "lora-dropout": 0.075,
              "gradient-checkpointing": True, "lr-decay": "cosine", "lr-floor": 0.02}


def _config(**overrides):
    return resolve({**BASE, **overrides})


def _every_weight(model):
    return {k: p.detach().clone() for k, p in model.named_parameters(remove_duplicate=False)}


def _train(config, model=None):
    """One visit's training of every segment (a FedAvg node's work), as the node builds it."""
    task = task_for(config)
    model = model if model is not None else build_model(task, config["seed"])
    x, y, _, _ = task.load("")
    work = LocalWork.from_config(dict(config), kd=kd_enabled(config))
    train_window(model, list(task.segment_names), (x, y), segments=segment_keys(model), work=work,
                 seed=0, align=task.align)
    return model, work


def test_fedavg_lora_never_distils_and_trains_only_adapters():
    config = _config(**FLOWERTUNE, kd="on")
    task = task_for(config)
    model = build_model(task, config["seed"])
    # what a FedAvg node is sent, and so trains with: no distillation, whatever kd says
    message = fedavg_message(config, list(task.segment_names), 16)
    work = LocalWork.from_config(message, kd=kd_enabled(message))
    assert work.kd_weight == 0.0 and work.optimizer == "adamw"
    before = _every_weight(model)
    _train(config, model)
    changed = {k for k, v in _every_weight(model).items() if not torch.equal(v, before[k])}
    adapters = {k for k in before if ".lora_" in k}
    # every layer's adapters (B starts at zero, so A moves once B has) and nothing else
    assert changed and changed <= adapters
    assert {k.split(".")[0] for k in changed} == {"layer00", "layer01"}
    assert set(model.state_dict()) == {k for k in adapters if ".lora_" in k}  # only adapters travel


def test_flowertune_adapters_drop_out_and_the_optimizer_is_adamw():
    config = _config(**FLOWERTUNE)
    model = build_model(task_for(config), config["seed"])
    drops = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert drops and all(isinstance(m, torch.nn.Dropout) and m.p == 0.075 for m in drops)
    from snake_flower.training.loop import _optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, LocalWork(optimizer="adamw", lr=1e-3))
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.0


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same():
    plain = _config(strategy="fedavg", finetune="lora", optimizer="adamw")
    checkpointed = _config(strategy="fedavg", finetune="lora", optimizer="adamw", **{"gradient-checkpointing": True})
    calls = {"plain": 0, "checkpointed": 0}
    models = {}
    for name, config in (("plain", plain), ("checkpointed", checkpointed)):
        model = build_model(task_for(config), config["seed"])

        def count(*_, name=name):
            calls[name] += 1
        # inside the layer: transformers checkpoints a layer's forward, its own hooks run once
        model.layer00.self_attn.register_forward_pre_hook(count)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            models[name], _ = _train(config, model)
    # the checkpointed layer runs again in backward: once more per training step
    steps = plain["local-steps"]
    assert calls["checkpointed"] == calls["plain"] + steps
    a, b = models["plain"].state_dict(), models["checkpointed"].state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_new_keys_travel_only_when_set():
    default = node_message(_config())
    assert not {"optimizer", "lora-dropout", "gradient-checkpointing"} & set(default)
    message = node_message(_config(**FLOWERTUNE))
    assert message["optimizer"] == "adamw" and message["lora-dropout"] == 0.075
    assert message["gradient-checkpointing"] is True


@pytest.mark.parametrize("overrides,expected", [
    ({"optimizer": "lion"}, "optimizer: "),
    ({"lora-dropout": 1.0}, "lora-dropout: must be in"),
    ({"task": "synthetic", "partitioner": "iid", "gradient-checkpointing": True},
     "gradient-checkpointing: only task llm"),
    ({"task": "synthetic", "partitioner": "iid", "lora-dropout": 0.1}, "lora-dropout: only task llm"),
])
def test_bad_values_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        _config(**overrides)
    assert "\n" not in str(err.value)


def test_a_flowertune_fedavg_run_ends_to_end(loopback, nodes, tmp_path):
    config = _config(**FLOWERTUNE, **{"num-server-rounds": 4, "out-dir": str(tmp_path), "frozen-dtype": "fp16"})
    node = nodes(4)
    run(loopback(list(node.contexts), node), config)
    result = json.loads((tmp_path / "fedavg.json").read_text())
    assert all(r["status"] == "merged" for r in result["rounds"])
    assert result["final"]["perplexity"] < result["initial"]["perplexity"]
    assert result["config"]["optimizer"] == "adamw" and result["config"]["gradient-checkpointing"] is True
