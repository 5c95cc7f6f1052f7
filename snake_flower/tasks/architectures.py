"""Model architectures for the analytic memory ledger: presets, or a local ``config.json``.

No hub is reachable on this project's machines, so the configurations of the models the
paper fine-tunes ship here, copied from their ``config.json`` on the Hugging Face hub. Only
the fields that shape the parameters matter to the ledger; the others are kept so that the
model built from a preset is the published one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ArchitectureError(ValueError):
    """An unknown model name, or a folder without a usable ``config.json``."""


@dataclass(frozen=True)
class Preset:
    """One shipped architecture.

    Attributes
    ----------
    model_type : str
        The transformers ``model_type`` (``"opt"``, ``"llama"``).
    config : dict[str, Any]
        Keyword arguments of that model type's config class.
    source : str
        Where the configuration comes from.
    nominal_params : float | None
        The rounded parameter count a paper quotes (the model's name), if any.
    paper_gb : dict[str, float]
        Memory per node the Snake Learning paper reports for this model, by strategy.
    """

    model_type: str
    config: dict[str, Any]
    source: str
    nominal_params: float | None = None
    paper_gb: dict[str, float] = field(default_factory=dict)


_OPT_IDS = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}

PRESETS: dict[str, Preset] = {
    "opt-1.3b": Preset(
        "opt",
        {"vocab_size": 50272, "hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
         "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
         "do_layer_norm_before": True, "activation_function": "relu", "dropout": 0.1,
         "tie_word_embeddings": True, **_OPT_IDS},
        source="facebook/opt-1.3b", nominal_params=1.3e9,
        # the paper's peak memory per node for LLM fine-tuning (notes/paper.md)
        paper_gb={"fedavg": 19.37, "snake": 3.13}),
    "opt-350m": Preset(
        "opt",  # the one OPT that normalises after each block, and projects 512 <-> 1024
        {"vocab_size": 50272, "hidden_size": 1024, "num_hidden_layers": 24, "ffn_dim": 4096,
         "num_attention_heads": 16, "max_position_embeddings": 2048, "word_embed_proj_dim": 512,
         "do_layer_norm_before": False, "activation_function": "relu", "dropout": 0.1,
         "tie_word_embeddings": True, **_OPT_IDS},
        source="facebook/opt-350m", nominal_params=3.5e8),
    "llama-3-8b": Preset(
        "llama",
        {"vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
         "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000,
         "eos_token_id": 128001},
        source="meta-llama/Meta-Llama-3-8B", nominal_params=8e9),
    "smollm2-135m": Preset(
        "llama",
        {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
         "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
         "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0},
        source="HuggingFaceTB/SmolLM2-135M"),
    "tiny-opt": Preset(
        "opt",
        {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 256,
         "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 64,
         "tie_word_embeddings": True, **_OPT_IDS},
        source="a random OPT for tests (notes/offline-data.md, M4)"),
}


def preset_of(model: str) -> Preset | None:
    """The preset called ``model``, or ``None`` for a folder or an unknown name."""
    return PRESETS.get(model.lower())


def load_config(model: str) -> Any:
    """The transformers config of a preset, or of a local folder holding ``config.json``.

    Parameters
    ----------
    model : str
        A preset name (``opt-1.3b``, ``opt-350m``, ``llama-3-8b``, ``smollm2-135m``, ``tiny-opt``), or a
        local folder (or its ``config.json``) as ``save_pretrained`` writes it.

    Returns
    -------
    transformers.PretrainedConfig
        The configuration; nothing is downloaded and no weights are read.

    Raises
    ------
    ArchitectureError
        If ``model`` is neither a preset nor a readable local config.
    """
    from transformers import AutoConfig

    preset = preset_of(model)
    if preset is not None:
        return AutoConfig.for_model(preset.model_type, **preset.config)
    path = Path(model)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not (path / "config.json").is_file():
        raise ArchitectureError(f"model: {model!r} is not a preset ({', '.join(PRESETS)}) "
                                "nor a folder holding a config.json")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:  # bad JSON, unknown model_type
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArchitectureError(f"model: {path / 'config.json'}: {reason}") from err
