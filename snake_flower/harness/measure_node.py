"""The measured node's process: the project's ClientApp, fed messages from files.

``python -m snake_flower.harness.measure_node SPEC_JSON`` (``NodeProcess`` starts it):

1. imports torch, transformers, Flower and the ClientApp (``snake_flower.client_app.app``,
   the one ``make_client_app`` returns for the built-in tasks), applies the Flower patches a
   node launcher's ClientApp runs with (``patch_clientapp_process``) and loads the node's data
   (its partition of the task's training set, as the ClientApp reads it every hop);
2. warms up: one training step of a miniature of the same architecture (two layers,
   toy widths), a node store written and read back and a message through a file, so
   that lazily imported modules, kernels and thread pools belong to the process and not
   to its first hop;
3. prints ``{"baseline_rss_bytes": ..., "baseline_anon_bytes": ...}``: its resident set now,
   before any message, and its anonymous part;
4. then, per line ``{"message": path, "reply": path}`` on its input: resets the kernel's
   peak resident set (``/proc/self/clear_refs``), reads the message as Flower inflates a
   pulled one, calls the ClientApp with it and the node's ``Context`` (its state
   directory on disk, from its node config), writes the reply as Flower deflates a
   pushed one and prints its resident set before the message and at its peak, and the peak
   of its anonymous part (``AnonPeak``).

It exits when its input closes.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> dict[str, int]:
    """This process's resident set now (``rss``), its peak (``peak``) and its file-backed part (``file``)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"], "file": fields.get("RssFile", 0)}


def anon() -> int:
    """This process's anonymous resident memory (``RssAnon``: resident less file-backed and shared)."""
    with open("/proc/self/statm") as statm:
        _, resident, shared = statm.read().split()[:3]
    return (int(resident) - int(shared)) * PAGE


class AnonPeak(threading.Thread):
    """The most anonymous memory this process held while it ran (read every 5 ms).

    The kernel keeps a peak of the whole resident set only; its file-backed part (pages of
    torch's libraries, a mapped checkpoint) is counted differently in a process forked from
    a warm one (``experiments/memory_deployed.py``), so the hop is also measured without it.
    """

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, anon(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, anon())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, anon())


def reset_peak() -> None:
    """Let the peak resident set start again from the current one (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def warm_up(config: dict[str, Any]) -> None:
    """One step of a miniature of the node's architecture, a store round trip, a message file."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from transformers import AutoModelForCausalLM

    from snake_flower.harness.message_files import read_message, write_message
    from snake_flower.node_store import NodeStore
    from snake_flower.tasks.llm import CausalLMSegments, load_config
    from snake_flower.tasks.llm_data import align_tokens
    from snake_flower.tasks.task import segment_keys
    from snake_flower.training.frozen import resolve_dtype
    from snake_flower.training.loop import LocalWork, train_window

    small = miniature(load_config(str(config["model"])))
    lm = AutoModelForCausalLM.from_config(small, dtype=torch.float32, attn_implementation="sdpa")
    lora = config["finetune"] == "lora"
    if lora:
        from peft import get_peft_model

        from snake_flower.tasks.llm import lora_config

        lm = get_peft_model(lm, lora_config(int(config["lora-rank"]))).base_model.model
    model = CausalLMSegments(lm, lora=lora)
    x = torch.randint(3, small.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    work = LocalWork(steps=1, batch_size=2, frozen_dtype=resolve_dtype(str(config["frozen-dtype"]), "llm"),
                     optimizer=str(config.get("optimizer", "sgd")))
    segments = segment_keys(model)
    window = [name for name in segments if name.startswith("layer")][:1]
    train_window(model, window, (x, x), segments=segments, work=work, seed=0, align=align_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        store = NodeStore(Path(scratch) / "node")
        store.write(model.state_dict(), {name: segments[name] for name in window}, {name: 0 for name in window})
        store.read()
        message = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"x": 1})}),
                          dst_node_id=1, message_type=MessageType.TRAIN, group_id="0")
        write_message(message, Path(scratch) / "m.bin")
        read_message(Path(scratch) / "m.bin")


def miniature(config: Any) -> Any:
    """``config`` shrunk to two layers of toy widths: the same code runs, on toy sizes."""
    import copy

    small = copy.deepcopy(config)
    heads = small.num_attention_heads
    small.num_hidden_layers, small.vocab_size, small.hidden_size = 2, 256, 8 * heads
    for name in ("intermediate_size", "ffn_dim"):
        if hasattr(small, name):
            setattr(small, name, 32 * heads)
    if hasattr(small, "word_embed_proj_dim"):
        small.word_embed_proj_dim = small.hidden_size
    if getattr(small, "head_dim", None):
        small.head_dim = 8
    return small


def serve(spec: dict[str, Any]) -> None:
    """Steps 1-4 of the module docstring, until the input closes."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from snake_flower.client_app import app, task_data
    from snake_flower.harness.message_files import read_message, write_message
    from snake_flower.runtime.flower_patches import patch_clientapp_process

    patch_clientapp_process()  # as a node launcher's ClientApp (stock Flower if the environment says so)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = spec["run_id"], spec["node_id"], 1
    context = Context(run_id=spec["run_id"], node_id=spec["node_id"], node_config=spec["node_config"],
                      state=RecordDict(), run_config={})
    task_data(context, spec["config"])  # the node's data, as every hop reads it (cached)
    warm_up(spec["config"])
    gc.collect()
    print(json.dumps({"baseline_rss_bytes": rss()["rss"], "baseline_anon_bytes": anon()}), flush=True)
    for line in sys.stdin:
        paths = json.loads(line)
        gc.collect()
        before = rss()["rss"]
        reset_peak()
        sampler = AnonPeak()
        sampler.start()
        start = time.perf_counter()
        message, _ = read_message(Path(paths["message"]))
        os.unlink(paths["message"])
        reply = app(message, context)
        del message
        write_message(reply, Path(paths["reply"]))
        del reply
        seconds = time.perf_counter() - start
        peak_anon = sampler.stop()
        now = rss()
        print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": now["peak"], "rss_after_bytes": now["rss"],
                          "rss_file_after_bytes": now["file"], "peak_anon_bytes": peak_anon,
                          "seconds": round(seconds, 2)}), flush=True)


def main(argv: list[str]) -> int:
    """``python -m snake_flower.harness.measure_node SPEC_JSON``."""
    serve(json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
