"""Tasks: a model cut into named segments, plus where its data comes from.

A model is an ``nn.Sequential`` whose named children are the segments, so a
``state_dict`` key's segment is the text before its first dot (``"conv2.0.weight"``
belongs to ``"conv2"``). Buffers travel with their segment.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from snake_flower.segments import segment_model
from snake_flower.tasks import data
from snake_flower.tasks.base import Task
from snake_flower.tasks.pooling import ChannelsLastMaxPool2d


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # nn.MaxPool2d(2)'s numbers, pooled where torch's CPU kernel is quick (tasks/pooling.py)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), ChannelsLastMaxPool2d(2))


def small_cnn(in_channels: int = 1, width: int = 16, side: int = 28, classes: int = 10) -> nn.Sequential:
    """Five segments: three conv blocks, a hidden dense layer and the head."""
    feat = side // 8  # three 2x poolings
    return nn.Sequential(OrderedDict(
        conv1=_conv_block(in_channels, width),
        conv2=_conv_block(width, 2 * width),
        conv3=nn.Sequential(_conv_block(2 * width, 2 * width), nn.Flatten()),
        fc1=nn.Sequential(nn.Linear(2 * width * feat * feat, 128), nn.ReLU()),
        head=nn.Linear(128, classes),
    ))


def tiny_cnn() -> nn.Sequential:
    """Same shape of model for 8x8 test images: five segments, ~2k parameters."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        conv2=nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        conv3=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()),
        fc1=nn.Sequential(nn.Linear(32, 16), nn.ReLU()),
        head=nn.Linear(16, 10),
    ))


def vgg11_cifar(classes: int = 10) -> nn.Sequential:
    """torchvision's VGG-11 in its CIFAR form (9.2M parameters), cut at its five poolings.

    ``avgpool`` and the three-layer classifier give way to one ``Linear(512, classes)``,
    as in FL papers on CIFAR-10; the convolutions are torchvision's own modules.
    """
    from torchvision.models import vgg11

    features = list(vgg11(weights=None, num_classes=classes).features)
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    starts = [0] + [p + 1 for p in pools[:-1]]
    blocks = [nn.Sequential(*features[a:b + 1]) for a, b in zip(starts, pools)]
    return nn.Sequential(OrderedDict(
        **{f"block{i}": block for i, block in enumerate(blocks, 1)},
        head=nn.Sequential(nn.Flatten(), nn.Linear(512, classes)),
    ))


SEGMENTS = ("conv1", "conv2", "conv3", "fc1", "head")
VGG_SEGMENTS = ("block1", "block2", "block3", "block4", "block5", "head")

TASKS: dict[str, Task] = {
    "fashion-mnist": Task("fashion-mnist", SEGMENTS, small_cnn, data.load_fashion_mnist),
    "synthetic": Task("synthetic", SEGMENTS, tiny_cnn, data.load_synthetic),
    "synthetic-large": Task("synthetic-large", SEGMENTS, tiny_cnn, data.load_synthetic_large),  # scale bench
    "vgg11": Task("vgg11", VGG_SEGMENTS, vgg11_cifar, data.load_cifar_shaped),
}
TASK_NAMES = (*TASKS, "llm")
"""Every task a run-config may name; ``llm`` is built from its model keys by ``task_for``."""


def task_for(config: Mapping[str, Any]) -> Task:
    """The task of a run-config (``task``, and for ``llm`` its ``model`` and fine-tuning keys)."""
    if is_plugin(config["task"]):
        return plugin_task(config["task"])
    if config["task"] == "llm":
        from snake_flower.tasks.llm_data import llm_task  # transformers is imported for LLM runs only

        return llm_task(str(config["model"]), str(config["finetune"]), int(config["lora-rank"]),
                        int(config["seq-len"]), float(config.get("lora-dropout", 0.0)),
                        bool(config.get("gradient-checkpointing", False)))
    return TASKS[config["task"]]


class PluginError(ValueError):
    """A ``task = "package.module:factory"`` that cannot be loaded (one-line message)."""


def is_plugin(name: str) -> bool:
    """Whether a ``task`` value names a plugin factory (``"package.module:factory"``)."""
    return ":" in str(name)


@lru_cache(maxsize=8)
def plugin_task(spec: str) -> Task:
    """The ``Task`` that ``factory()`` of ``"package.module:factory"`` returns (once per process)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(_import(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise PluginError(f"task: cannot load {spec!r}: {type(err).__name__}: {err}") from None
    task = factory()
    missing = [name for name in ("name", "segment_names", "build", "load") if not hasattr(task, name)]
    if missing:
        raise PluginError(f"task: {spec} returned a {type(task).__name__} without {', '.join(missing)} "
                          f"(return a snake_flower.Task)")
    return task


def _import(module_name: str) -> Any:
    """Import a plugin's module; from the working directory too, as ``python -m`` would."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())  # the snake-flower script's sys.path lacks it
        return importlib.import_module(module_name)


def build_model(task: Task, seed: int) -> nn.Module:
    """The task's model with seeded initial weights (identical on every node).

    Built anew on every call: no per-process template of the whole model is kept. A node
    that holds a complete copy builds on the ``meta`` device instead (``with
    torch.device("meta")``: the structure alone, in no time even for VGG-11) and loads its
    copy over it; a plugin task's builder is never run there (it might cache the result).
    """
    if torch.get_default_device().type == "meta" and task.name not in TASKS and task.name != "llm":
        raise RuntimeError(f"task {task.name}: a plugin task is built for real")
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = task.build()
    if task.segment_names is None:  # nested segments: every later segment_keys(model) reads these
        model.snake_segments = segment_model(model)
        return model
    if tuple(segment_keys(model)) != tuple(task.segment_names):
        raise RuntimeError(f"task {task.name}: model segments {tuple(segment_keys(model))} "
                           f"differ from {task.segment_names}")
    return model


def frozen_segments(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Segments a Snake run never trains or sends (``frozen-segments``); FedAvg trains all."""
    if config.get("strategy") != "snake":
        return ()
    return tuple(name.strip() for name in str(config.get("frozen-segments", "")).split(",") if name.strip())


def swept_segment_keys(model: nn.Module, config: Mapping[str, Any]) -> dict[str, list[str]]:
    """``segment_keys`` without the ``frozen-segments`` (a pretrained model's embeddings, say,
    which every node builds identically and which then never change)."""
    frozen = frozen_segments(config)
    return {name: keys for name, keys in segment_keys(model).items() if name not in frozen}


def segment_keys(model: nn.Module) -> dict[str, list[str]]:
    """Map each segment to its ``state_dict`` keys, in model order.

    A plugin task's model carries the segments ``segment_model`` found (``snake_segments``);
    a built-in task's segments are its top-level children.
    """
    found = getattr(model, "snake_segments", None)
    if found is not None:
        return {name: list(keys) for name, keys in found.items()}
    out: dict[str, list[str]] = {}
    for key in model.state_dict():
        out.setdefault(key.split(".", 1)[0], []).append(key)
    return out


def transport_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict ready for an ``ArrayRecord``: NumPy has no bfloat16, so bf16 goes as fp32.

    The cast is exact, and ``load_state_dict`` copies the values back into the
    receiving parameter's own dtype.
    """
    return {key: value.float() if value.dtype == torch.bfloat16 else value for key, value in state.items()}
