"""How a node builds its model for a hop: on the ``meta`` device when what it loads covers it.

A node loads its copy of the model and the message's arrays over the model it builds, so
when those cover every tensor the seeded fp32 build is wasted work and memory: the model
is then built on the ``meta`` device (its structure only), given uninitialised CPU storage
(``to_empty``) and filled by the loads. Buffers no ``state_dict`` holds (a rotary
embedding's frequencies) are computed by the builder for real even on the meta device
(the LLM task's rotary embedding: a fresh process needs no real build first), else copied
from the last real build of the same structure, a few bytes. Otherwise, and for builders
not marked ``snake_meta_build`` (a plugin's builder may cache what it builds), the model is
built with the run's seeded initial weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


class ModelBuilder:
    """Builds a node's model for a hop (see the module docstring).

    Parameters
    ----------
    model_fn : Callable[[Mapping[str, Any]], nn.Module]
        ``model_fn(config)``: the model with its initial weights (under a seeded RNG).
    meta_build : bool
        Whether ``model_fn`` may run on the meta device.
    """

    def __init__(self, model_fn: Callable[[Mapping[str, Any]], nn.Module], meta_build: bool) -> None:
        self.model_fn, self.meta_build = model_fn, meta_build
        self._unsaved: dict[tuple, dict[str, torch.Tensor]] = {}  # per model structure

    def __call__(self, cfg: Mapping[str, Any], source: Iterable[str] = (),
                 prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
        """The model to load ``source``'s ``state_dict`` keys over: empty when they fill it,
        else with the seeded initial weights (``cfg["seed"]``).

        ``prepare(model)`` runs on the empty model while it is still on the meta device
        (before its storage is allocated): casting a parameter there (``hold_parameters``)
        allocates it in its new dtype, and never in the old one.
        """
        if self.meta_build:
            shell = self._shell(cfg, set(source), prepare)
            if shell is not None:
                return shell
        with torch.random.fork_rng(devices=[]):  # every node builds the same initial weights
            torch.manual_seed(int(cfg["seed"]))
            model = self.model_fn(cfg)
        unsaved = _unsaved_buffers(model)
        if unsaved:  # computed at build, never loaded: cheap to keep
            self._unsaved[_signature(model)] = {name: model.get_buffer(name).clone() for name in unsaved}
        return model

    def _shell(self, cfg: Mapping[str, Any], source: set[str],
               prepare: Callable[[nn.Module], None] | None = None) -> nn.Module | None:
        """The model's structure with uninitialised storage, if ``source``, the unsaved
        buffers and the builder's checkpoint (``snake_pretrained``) fill every tensor; else
        ``None``. The checkpoint's tensors are read here, after ``prepare``."""
        try:
            with torch.device("meta"):
                model = self.model_fn(cfg)
        except Exception:  # a builder that cannot run on meta: build it for real
            return None
        unsaved_names = set(_unsaved_buffers(model))
        computed = {name: tensor.clone() for name, tensor in model.named_buffers()
                    if not tensor.is_meta and name in unsaved_names}
        if any(not t.is_meta for t in model.parameters()) or any(
                not t.is_meta and name not in computed for name, t in model.named_buffers()):
            return None  # the builder ignored the meta device
        state = model.state_dict(keep_vars=True)
        covered = {id(tensor) for key, tensor in state.items() if key in source}
        missing = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
                   if id(tensor) not in covered]
        # buffers no state_dict holds: computed by the builder even on meta, or kept from a real build
        unsaved = {**self._unsaved.get(_signature(model), {}), **computed}
        pretrained = getattr(model, "snake_pretrained", None) or ()  # read from a checkpoint (tasks/pretrained.py)
        from_checkpoint = [name for name in missing if name not in unsaved and name in pretrained]
        if any(name not in unsaved and name not in from_checkpoint for name in missing):
            return None
        ties = _ties(model)
        if prepare is not None:
            prepare(model)
        model.to_empty(device="cpu")  # a meta parameter becomes a new one: tied weights come apart
        for alias, owner in ties.items():
            module, _, name = alias.rpartition(".")
            model.get_submodule(module)._parameters[name] = model.get_parameter(owner)
        with torch.no_grad():
            for name in missing:
                if name in unsaved:
                    model.get_buffer(name).copy_(unsaved[name])
        if from_checkpoint:  # one tensor at a time, into the dtype prepare gave it
            pretrained.fill(model, from_checkpoint)
        return model


def hold_parameters(model: nn.Module, names: Iterable[str], dtype: torch.dtype) -> int:
    """Cast the floating parameters called ``names`` (``named_parameters``) to ``dtype`` in
    place, each once (a tied one under any of its names); return the bytes they hold now.

    On the meta device this costs nothing: the storage ``to_empty`` then gives them is
    ``dtype``'s from the start.
    """
    wanted, done, held = set(names), set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in wanted and id(p) not in done and p.is_floating_point():
            done.add(id(p))
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
            held += p.numel() * p.element_size()
    return held


def _signature(model: nn.Module) -> tuple:
    """What identifies a model's structure: its class and its tensors' names, shapes and dtypes."""
    return (type(model).__qualname__, *((name, tuple(t.shape), t.dtype) for name, t in
                                        itertools.chain(model.named_parameters(), model.named_buffers())))


def _ties(model: nn.Module) -> dict[str, str]:
    """Tied parameters: each alias's name -> the name of the first module that holds it."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        first.setdefault(id(p), name)
    return ties


def _unsaved_buffers(model: nn.Module) -> list[str]:
    """The buffers no ``state_dict`` key holds (non-persistent ones)."""
    saved = {id(tensor) for tensor in model.state_dict(keep_vars=True).values()}
    return [name for name, tensor in model.named_buffers() if id(tensor) not in saved]
