"""A pretrained model's tensors read from its safetensors files, a block of rows at a time.

A node that builds its model on the ``meta`` device (``node_model.py``) fills the tensors
its copy and the message do not bring (the pretrained embeddings a Snake run never sends,
or LoRA's base weights) from here: each block is read through its own mapping of the file
straight into the parameter, in the dtype the parameter is held in, so the node never
holds the whole model, nor a whole fp32 embedding, at once.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHUNK_BYTES = 8 * 2**20  # read per mapping
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
        to their dtype), a few MB of rows at a time."""
        for name in names:
            target = _tensor(model, name)
            for rows, value in self._read(name, target):
                with torch.no_grad():
                    target[rows].copy_(value)

    def _read(self, name: str, target: torch.Tensor) -> Iterator[tuple[Any, torch.Tensor]]:
        """Tensor ``name`` in blocks of rows. The file is memory-mapped, and every page read
        stays in the process's resident set until it is unmapped: each block gets its own
        mapping, so a 113 MB fp32 embedding held in bf16 never counts in full."""
        from safetensors import safe_open

        path, key = str(self.files[name]), self.keys[name]
        if target.dim() == 0:
            with safe_open(path, framework="pt") as handle:
                yield ..., handle.get_tensor(key)
            return
        rows = target.shape[0]
        step = max(1, CHUNK_BYTES // max(1, 4 * target[0].numel()))  # stored in fp32 at most, as a rule
        for start in range(0, rows, step):
            with safe_open(path, framework="pt") as handle:
                block = handle.get_slice(key)[start:start + step]
            yield slice(start, start + step), block


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
