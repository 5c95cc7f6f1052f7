"""A pretrained model's tensors read one at a time from its safetensors files.

A node that builds its model on the ``meta`` device (``node_model.py``) fills the tensors
its copy and the message do not bring (the pretrained embeddings a Snake run never sends,
or LoRA's base weights) from here: each tensor is read from the memory-mapped file
straight into the parameter, in the dtype the parameter is held in, so the node never
holds the whole model in fp32.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class PretrainedTensors:
    """Where each of a model's tensors is in its checkpoint.

    Parameters
    ----------
    files : Mapping[str, Path]
        The model's tensor name (``named_parameters``/``named_buffers``) -> its file.
    keys : Mapping[str, str]
        The model's tensor name -> its key in that file.
    """

    def __init__(self, files: Mapping[str, Path], keys: Mapping[str, str]) -> None:
        self.files, self.keys = dict(files), dict(keys)

    def __contains__(self, name: object) -> bool:
        return name in self.keys

    def fill(self, model: nn.Module, names: Iterable[str]) -> None:
        """Copy the tensors called ``names`` from the checkpoint into ``model``'s own (cast
        to their dtype), one at a time."""
        for name, value in self._read(names):
            target = _tensor(model, name)
            with torch.no_grad():
                target.copy_(value)
            del value

    def _read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        # The file is memory-mapped, and every page read stays in the process's resident set
        # until it is unmapped: opened once for all tensors, the whole checkpoint would count.
        for name in names:
            with safe_open(str(self.files[name]), framework="pt") as handle:
                value = handle.get_tensor(self.keys[name])
            yield name, value


def pretrained_tensors(directory: Path, loaded: Iterable[tuple[str, torch.Tensor]],
                       model: nn.Module) -> PretrainedTensors | None:
    """Map ``model``'s tensors to the checkpoint in ``directory``. ``loaded`` is what a
    transformers model built from it names its tensors (the checkpoint's keys, before
    peft renames any), and ``model`` shares those tensors under its own names. ``None``
    when the directory has no safetensors."""
    where = _checkpoint_keys(Path(directory))
    if where is None:
        return None
    checkpoint_key = {id(t): key for key, t in loaded if key in where}
    keys = {name: checkpoint_key[id(t)] for name, t in model_tensors(model) if id(t) in checkpoint_key}
    return PretrainedTensors({name: where[key] for name, key in keys.items()}, keys)


def _checkpoint_keys(directory: Path) -> dict[str, Path] | None:
    """Each key of the checkpoint -> the safetensors file that holds it."""
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return {key: directory / file for key, file in weight_map.items()}
    if (directory / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(directory / SINGLE), framework="pt") as handle:
            return {key: directory / SINGLE for key in handle.keys()}
    return None


def model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` by name, each once."""
    return itertools.chain(model.named_parameters(), model.named_buffers())


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    owner = model.get_submodule(module)
    return owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]
