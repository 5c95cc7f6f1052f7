"""Analytic memory ledger per node (design §5): a model built on the ``meta`` device.

The model is built from its config with every tensor on ``meta``: shapes and no storage, so
OPT-1.3B or Llama-3-8B is accounted in a fraction of a second without its weights. It is cut
into the design's LLM segments (embeddings, each decoder layer, final norm + head) and two
per-node ledgers in the results' ``memory`` shape (design §6) follow:

- **fedavg**: every trainable parameter on the node.
- **snake**: a window of ``window`` decoder layers trainable, everything else frozen.

What the ledger assumes:

- A trainable parameter costs 16 B: its fp32 weight, its fp32 gradient and Adam's two fp32
  moments. A frozen parameter costs the bytes of ``frozen-dtype`` (fp32 4, fp16/bf16 2,
  int8 1) and has neither gradient nor optimizer state.
- With ``finetune = "lora"`` (peft on the meta model) the trainable parameters are the LoRA
  adapters (of every layer for FedAvg, of the window's layers for Snake); the base model and
  the other adapters are frozen.
- Activations are 0 unless ``batch`` and ``seq`` are given (the paper's 19.37 GB vs 3.13 GB
  excludes them). Then ``activation_bytes`` is what autograd saves for backward in one
  forward pass of ``batch x seq`` tokens with the loss, in fp32, in train mode, parameters
  excluded: the same meter as a run's (``training.SavedActivations``), on the meta device.
  Attention is the eager one, which saves its ``batch x heads x seq x seq`` scores; a fused
  (flash) kernel saves less. Only layers at or above the window save anything, so Snake's
  peak is at the bottom of its sweep; both ends are reported. The backward pass's
  transient buffers are not counted.
- ``peak_rss_bytes`` is 0: no process runs the model.
- Snake's parameter figure is the largest over every window position; decoder layers are
  identical, so every position gives the same.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from snake_flower.tasks.architectures import ArchitectureError, load_config, preset_of
from snake_flower.tasks.llm import LORA_TARGETS, lora_config
from snake_flower.training.loop import SavedActivations

FROZEN_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "int8": 1}
FINETUNE = ("full", "lora")
GIB = 2**30
ASSUMES = ("trainable parameters at 16 B (fp32 weight, fp32 gradient, Adam's two fp32 moments); "
           "frozen parameters at frozen_dtype, no gradient, no optimizer state; activations: bytes "
           "autograd saves in one fp32 forward pass of batch x seq tokens (0 if not given); peak RSS "
           "not modelled (0)")


class MemoryOptionsError(ValueError):
    """An option of the analytic ledger is out of range."""


@dataclass(frozen=True)
class MemoryOptions:
    """What the two ledgers assume on top of the architecture.

    Attributes
    ----------
    window : int
        Decoder layers Snake trains at once (1 reproduces the paper's figure).
    frozen_dtype : str
        Precision of frozen parameters on the node: ``fp16``, ``bf16``, ``fp32`` or ``int8``.
    finetune : str
        ``full`` (the parameters themselves train) or ``lora`` (peft LoRA adapters train).
    lora_rank : int
        LoRA rank ``r`` (``finetune = "lora"`` only).
    lora_targets : tuple[str, ...]
        Module names that get LoRA adapters (``finetune = "lora"`` only).
    batch, seq : int
        Sequences per step and tokens per sequence for the activations (0: not counted).
    """

    window: int = 1
    frozen_dtype: str = "fp16"
    finetune: str = "full"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    batch: int = 0
    seq: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise MemoryOptionsError(f"window: must be >= 1 decoder layer, got {self.window}")
        if self.frozen_dtype not in FROZEN_BYTES:
            raise MemoryOptionsError(f"frozen-dtype: {self.frozen_dtype!r} is not one of "
                                     f"{', '.join(FROZEN_BYTES)}")
        if self.finetune not in FINETUNE:
            raise MemoryOptionsError(f"finetune: {self.finetune!r} is not one of {', '.join(FINETUNE)}")
        if self.lora_rank < 1:
            raise MemoryOptionsError(f"lora-rank: must be >= 1, got {self.lora_rank}")
        if self.finetune == "lora" and not self.lora_targets:
            raise MemoryOptionsError("lora-targets: name at least one module, e.g. q_proj,v_proj")
        if self.batch < 0 or self.seq < 0 or (self.batch > 0) != (self.seq > 0):
            raise MemoryOptionsError(f"batch, seq: give both > 0 to count activations, or neither "
                                     f"(got {self.batch} x {self.seq})")


def build_meta_model(config: Any) -> nn.Module:
    """A causal LM of ``config`` with every tensor on the ``meta`` device (no weights).

    Attention is transformers' eager implementation: what it saves for backward is defined
    by the model's code, not by which fused kernel a device dispatches to.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except ValueError as err:  # a config with no causal-LM class (T5, ViT, ...)
        raise ArchitectureError(f"model: {type(config).__name__} has no causal language model "
                                "in transformers") from err


def add_lora(model: nn.Module, options: MemoryOptions) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters; only the adapters keep ``requires_grad``."""
    from peft import get_peft_model

    lora = lora_config(options.lora_rank, options.lora_targets)
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise MemoryOptionsError(f"lora-targets: {str(err).splitlines()[0]}") from err


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: the ``ModuleList`` holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise MemoryOptionsError(f"{type(model).__name__} has no stack of decoder layers")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def segments(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The design's LLM segments: ``embeddings``, ``layer.0`` … ``layer.{L-1}``, ``head``.

    A tied output head shares the input embedding's tensor; it is counted once, in
    ``embeddings``. The final norm and an untied head make up ``head``.
    """
    layers = decoder_layers(model)
    owner = {id(p): f"layer.{i}" for i, layer in enumerate(layers) for p in layer.parameters()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.endswith("project_in"):
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), "embeddings")
    out: dict[str, list[nn.Parameter]] = {"embeddings": []}
    out.update({f"layer.{i}": [] for i in range(len(layers))})
    out["head"] = []
    for p in model.parameters():  # deduplicated: a tied weight comes once
        out[owner.get(id(p), "head")].append(p)
    return out


def saved_activations(model: nn.Module, trainable: list[nn.Parameter], batch: int, seq: int) -> int:
    """Bytes autograd saves in one forward pass with the loss, only ``trainable`` needing grads."""
    train = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    model.train()  # fine-tuning: dropout on, its masks saved
    meter = SavedActivations(model.parameters())
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with meter:
        model(input_ids=ids, labels=ids)
    return meter.peak


def ledger(trainable: float, frozen: float, frozen_dtype: str, activations: int = 0) -> dict[str, int]:
    """A per-node ledger in the design §6 ``memory`` shape, from parameter counts.

    A trainable parameter: fp32 weight, fp32 gradient, Adam's two fp32 moments (16 B).
    """
    weights = round(trainable * 4)
    memory = {"trainable_param_bytes": weights, "frozen_param_bytes": round(frozen * FROZEN_BYTES[frozen_dtype]),
              "grad_bytes": weights, "optimizer_bytes": 2 * weights, "activation_bytes": activations}
    memory["total_bytes"] = sum(memory.values())
    memory["peak_rss_bytes"] = 0  # not measured: no process runs the model
    return memory


def _gib(memory: dict[str, int]) -> float:
    return round(memory["total_bytes"] / GIB, 2)


def _trainable(segs: dict[str, list[nn.Parameter]], finetune: str) -> dict[str, list[nn.Parameter]]:
    """Per segment, the parameters that train when it is trained: all, or its LoRA adapters."""
    return {name: [p for p in ps if finetune == "full" or p.requires_grad] for name, ps in segs.items()}


def _numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def analyze(model: str, options: MemoryOptions | None = None) -> dict[str, Any]:
    """The FedAvg and Snake per-node ledgers of ``model``, built on the ``meta`` device.

    Parameters
    ----------
    model : str
        A preset name or a local folder holding ``config.json`` (``architectures.load_config``).
    options : MemoryOptions | None
        Window, frozen dtype and fine-tuning mode (default: the paper's set-up).

    Returns
    -------
    dict[str, Any]
        ``fedavg`` and ``snake`` in the design §6 ``memory`` shape (bytes), their totals in
        GiB, the parameter counts behind them, and, for a preset with a nominal size, the
        same with the nominal count (the paper's convention, under ``nominal``).
    """
    options = options or MemoryOptions()
    config = load_config(model)
    net = build_meta_model(config)
    architecture = type(net).__name__
    if options.finetune == "lora":
        net = add_lora(net, options)
    segs = segments(net)
    can_train = _trainable(segs, options.finetune)
    params = {name: _numel(ps) for name, ps in segs.items()}
    layers = [name for name in segs if name.startswith("layer.")]
    if options.window > len(layers):
        raise MemoryOptionsError(f"window: {options.window} exceeds the {len(layers)} decoder "
                                 f"layers of {model}")
    total, k = sum(params.values()), options.window
    trainable = {"fedavg": sum(_numel(ps) for ps in can_train.values()),
                 "snake": max(sum(_numel(can_train[n]) for n in layers[s:s + k])
                              for s in range(len(layers) - k + 1))}
    if options.seq > getattr(config, "max_position_embeddings", options.seq):
        raise MemoryOptionsError(f"seq: {options.seq} exceeds the {config.max_position_embeddings} "
                                 f"positions of {model}")
    report: dict[str, Any] = {
        "model": model, "architecture": architecture, "params": total,
        "decoder_layers": len(layers), "layer_params": params[layers[0]],
        "segment_params": {"embeddings": params["embeddings"], "head": params["head"]},
        "options": asdict(options) | {"lora_targets": list(options.lora_targets)},
        "trainable_params": trainable, "assumes": ASSUMES, "unit": "GiB",
    }
    activations = _activations(net, can_train, layers, options) if options.batch else {}
    report["activations"] = activations or None
    for strategy, n in trainable.items():
        report[strategy] = ledger(n, total - n, options.frozen_dtype, activations.get(strategy, 0))
    report["total_gib"] = {s: _gib(report[s]) for s in trainable}
    preset = preset_of(model)
    report["source"] = preset.source if preset else model
    report["nominal"] = _nominal(preset.nominal_params if preset else None, len(layers), options)
    report["paper_gb"] = dict(preset.paper_gb) if preset else {}
    return report


def _activations(net: nn.Module, can_train: dict[str, list[nn.Parameter]], layers: list[str],
                 options: MemoryOptions) -> dict[str, Any]:
    """Saved activations for FedAvg, and for Snake with its window at both ends of the sweep."""
    def saved(names: list[str]) -> int:
        params = [p for name in names for p in can_train[name]]
        return saved_activations(net, params, options.batch, options.seq)

    first, last = saved(layers[:options.window]), saved(layers[-options.window:])
    return {"batch": options.batch, "seq": options.seq, "compute_dtype": "fp32",
            "fedavg": saved(list(can_train)), "snake": max(first, last),
            "snake_window_first": first, "snake_window_last": last}


def _nominal(params: float | None, layers: int, options: MemoryOptions) -> dict[str, Any] | None:
    """The paper's convention: a rounded count, all of it spread evenly over the layers.

    With 1.3e9 parameters and one of 24 layers trained it gives the paper's 19.37 GB
    (FedAvg) and 3.13 GB (Snake), in GiB. It is defined for full fine-tuning only.
    """
    if params is None or options.finetune != "full":
        return None
    window = params * options.window / layers
    out: dict[str, Any] = {"params": params,
                           "fedavg": ledger(params, 0, options.frozen_dtype),
                           "snake": ledger(window, params - window, options.frozen_dtype)}
    out["total_gib"] = {s: _gib(out[s]) for s in ("fedavg", "snake")}
    return out
