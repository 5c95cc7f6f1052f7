"""``resolve``: run-config layers fused over the defaults, coerced and validated into a ``RunConfig``.

Every bad value gets a ``ConfigError`` of one line that starts with the key to fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from snake_flower.config.run_config import DEFAULTS, ConfigError, RunConfig, field_name, perplexity_levels

CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": ("snake", "relay", "fedavg", "split"),
    "partitioner": ("iid", "dirichlet", "pathological", "topic"),
    "finetune": ("full", "lora"),
    "frozen-dtype": ("auto", "fp32", "fp16", "bf16", "int8"),
    "payload-dtype": ("fp32", "fp16", "int8"),
    "download-dtype": ("auto", "fp32", "fp16", "int8"),
    "sweep": ("serpentine", "forward"),
    "order": ("fixed", "shuffle", "capacity"),
    "rank-discovery": ("auto", "all", "lazy"),
    "capacity-profile": ("uniform", "mixed"),
    "mode": ("cs", "p2p"),
    "sync": ("delta", "window"),
    "kd": ("auto", "on", "off"),
    "lr-decay": ("none", "cosine"),
    "evaluate-on": ("test", "validation"),
    "merge-gate": ("off", "loss"),
    "aggregation": ("mean", "median", "trimmed-mean", "multi-krum"),
    "attack": ("label-flip", "sign-flip", "scale", "random"),
    "optimizer": ("sgd", "adam", "adamw"),
}

POSITIVE = ("num-server-rounds", "window", "batch-size", "eval-every", "eval-batch-size",
            "min-nodes", "classes-per-partition", "kd-temperature", "hop-timeout", "lora-rank",
            "seq-len", "tune-visits", "concurrency", "gate-strikes", "krum-select", "attack-scale")
NON_NEGATIVE = ("local-epochs", "local-steps", "lr", "momentum", "weight-decay", "clip-norm",
                "eval-samples", "sync-tolerance", "max-update-norm", "node-backoff", "leave-round",
                "leave-partition", "crash-round", "lanes", "stop-after-held", "hop-deadline-s", "validation-size", "prune-above-bytes",
                "gate-tolerance", "gate-size", "krum-malicious", "byzantine-nodes", "target-perplexity",
                "fit-budget-mb")


def resolve(*layers: Mapping[str, Any]) -> RunConfig:
    """Fuse the defaults with each layer (kebab-case keys; a ``RunConfig`` is one) in turn,
    then validate the result."""
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in DEFAULTS:
                raise ConfigError(f"{key}: unknown run-config key")
            values[field_name(key)] = _coerce(key, value)
    config = RunConfig(**values)
    validate(config)
    return config


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the type of ``key``'s default (an integral float is an int)."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(default, int) and not (key == "window" and value == "auto"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if key == "perplexity-levels" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # one level: --run-config perplexity-levels=9 reads as TOML's number 9
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def validate(config: RunConfig) -> None:
    """Check values that do not depend on the task, then the window against the task's segments."""
    from snake_flower.tasks.task import TASK_NAMES, frozen_segments, is_plugin  # local: task pulls in torch

    if config.task not in TASK_NAMES and not is_plugin(config.task):
        raise ConfigError(f"task: unknown task {config.task!r} (known: {', '.join(TASK_NAMES)})")
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key}: {config[key]!r} is not one of {', '.join(allowed)}")
    if isinstance(config.window, str) and config.window != "auto":
        raise ConfigError(f"window: expected a number of segments or \"auto\", got {config.window!r}")
    for key in POSITIVE:
        if config[key] == "auto" and key == "window":
            continue
        if not config[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {config[key]!r}")
    segments = _segments(config)
    frozen = frozen_segments(config)
    unknown = [name for name in frozen if name not in segments]
    if unknown:
        raise ConfigError(f"frozen-segments: {', '.join(unknown)} not among the segments "
                          f"({', '.join(segments[:3])}, ...)")
    # the schedule takes the last swept segment as the head (the first as the stem):
    # a frozen head would silently hand that role to its neighbour
    for flag, end in (("train-head", segments[-1]), ("train-stem", segments[0])):
        if config[flag] and end in frozen:
            raise ConfigError(f"{flag}: segment {end} is in frozen-segments; set {flag}=false")
    # int8 frozen weights are dequantized to fp32 on use, so every task computes in fp32
    if config.frozen_dtype in ("fp16", "bf16") and config.task != "llm":
        raise ConfigError(f"frozen-dtype: {config.frozen_dtype} needs task llm (its segments cast "
                          f"their inputs); task {config.task} trains with fp32 frozen layers")
    segments = tuple(name for name in segments if name not in frozen)
    sweepable = len(segments) - config.train_head - config.train_stem
    _check_window(config, segments, sweepable)
    for key in NON_NEGATIVE:
        if config[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {config[key]!r}")
    _check_values(config)


def _check_window(config: RunConfig, segments: tuple[str, ...], sweepable: int) -> None:
    """The split's cut and the window fit the segments that are not frozen."""
    if config.strategy == "split" and not 1 <= config.cut < len(segments):
        raise ConfigError(f"cut: must leave at least one segment on each side, got {config.cut}")
    if config.window == "auto" and sweepable < 1:
        raise ConfigError("window: 'auto' needs at least one segment to sweep (train-head/train-stem excluded)")
    if isinstance(config.window, int) and config.window > sweepable:
        what = f"model {config.model}" if config.task == "llm" else f"task {config.task}"
        raise ConfigError(f"window: {config.window} exceeds the {sweepable} segments that {what} "
                          f"can sweep (train-head/train-stem excluded)")
    if config.concurrency > 1 or config.lanes > 1:
        _check_concurrency(config, sweepable)


def _check_values(config: RunConfig) -> None:
    """Ranges and combinations of keys that do not involve the task's segments."""
    if config.dirichlet_alpha <= 0:
        raise ConfigError(f"dirichlet-alpha: must be > 0, got {config.dirichlet_alpha!r}")
    if config.rank_discovery == "lazy" and (config.window == "auto" or config.order == "capacity"):
        raise ConfigError("rank-discovery: 'lazy' cannot fit window = \"auto\" nor order = \"capacity\" "
                          "(both need every node's report before the first hop)")
    if config.hop_deadline_s > 0 and config.window != "auto":
        raise ConfigError("hop-deadline-s: only window = \"auto\" fits windows to a deadline; set window=auto")
    if config.hop_deadline_s > 0 and config.local_steps == 0:
        raise ConfigError("hop-deadline-s: estimating a hop's compute time needs local-steps > 0")
    if config.local_epochs == 0 and config.local_steps == 0:
        raise ConfigError("local-epochs: one of local-epochs and local-steps must be > 0")
    if not 0.0 < config.target_accuracy <= 1.0:
        raise ConfigError(f"target-accuracy: must be in (0, 1], got {config.target_accuracy!r}")
    _check_perplexity(config)
    if not 0.0 <= config.lr_floor <= 1.0:
        raise ConfigError(f"lr-floor: must be in [0, 1], got {config.lr_floor!r}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora-dropout: must be in [0, 1), got {config.lora_dropout!r}")
    if (config.lora_dropout > 0 or config.gradient_checkpointing) and config.task != "llm":
        key = "lora-dropout" if config.lora_dropout > 0 else "gradient-checkpointing"
        raise ConfigError(f"{key}: only task llm has adapters and decoder layers to apply it to")
    if not 0.0 <= config.fail_rate < 1.0:
        raise ConfigError(f"fail-rate: must be in [0, 1), got {config.fail_rate!r}")
    if config.resume and config.strategy not in ("snake", "relay"):
        raise ConfigError(f"resume: only strategies snake and relay write checkpoints, not {config.strategy!r}")
    if config.evaluate_on == "validation" and config.validation_size == 0:
        raise ConfigError("evaluate-on: 'validation' needs validation-size > 0 (examples held out of training)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*|", config.run_name):
        raise ConfigError(f"run-name: {config.run_name!r} must be a plain file name (letters, digits, - _ .)")
    if not 0.0 <= config.average_decay < 1.0:
        raise ConfigError(f"average-decay: must be in [0, 1), got {config.average_decay!r}")
    if config.average_decay and config.strategy not in ("snake", "relay"):
        raise ConfigError(f"average-decay: only snake and relay average over hops, not {config.strategy!r}")
    if config.download_dtype != "auto" and config.strategy == "split":
        raise ConfigError("download-dtype: split learning sends activations and gradients, not a model to encode")
    if not 0.0 <= config.kd_weight <= 1.0:
        raise ConfigError(f"kd-weight: must be in [0, 1], got {config.kd_weight!r}")
    _check_defences(config)


def _check_perplexity(config: RunConfig) -> None:
    """A perplexity target and its levels: task llm's held-out perplexity, lower is better."""
    levels = perplexity_levels(config)
    if not math.isfinite(config.target_perplexity):
        raise ConfigError(f"target-perplexity: must be finite (0 = off), got {config.target_perplexity!r}")
    if config.target_perplexity > 0 and config.task != "llm":
        raise ConfigError(f"target-perplexity: only task llm records a perplexity, not {config.task!r}")
    if levels and not config.target_perplexity > 0:
        raise ConfigError("perplexity-levels: the levels are counted with a perplexity target; "
                          "set target-perplexity > 0")
    if config.stop_after_held and any(level < config.target_perplexity for level in levels):
        # a run stopped at the target never had the chance to go below it: such a level would say "never"
        raise ConfigError(f"perplexity-levels: with stop-after-held every level must be at or above "
                          f"target-perplexity {config.target_perplexity:g}, got {min(levels):g}")
    if config.fit_budget_mb > 0 and (config.task != "llm" or config.strategy == "split"):
        raise ConfigError("fit-budget-mb: compare measures a node's growth for task llm and strategies snake, "
                          f"relay and fedavg only, not {config.strategy!r} on task {config.task!r}")


def _check_defences(config: RunConfig) -> None:
    """The merge gate (Snake and relay) and the robust aggregators (FedAvg)."""
    if config.merge_gate != "off":
        if config.strategy not in ("snake", "relay"):
            raise ConfigError(f"merge-gate: only snake and relay merge one reply at a time, not {config.strategy!r} "
                              f"(FedAvg's defence is aggregation)")
        if config.validation_size == 0:
            raise ConfigError("merge-gate: the gate scores a slice of the held-out examples; set validation-size > 0")
        if not config.gate_tolerance > 0:
            raise ConfigError("gate-tolerance: a gated run needs a tolerance > 0, fixed from a clean gated run "
                              "(docs/reliability.md#fixing-gate-tolerance)")
    if config.aggregation != "mean" and config.strategy != "fedavg":
        raise ConfigError(f"aggregation: only fedavg aggregates replies, not {config.strategy!r}")
    if config.byzantine_nodes and config.strategy == "split":
        raise ConfigError("byzantine-nodes: attacks are built for snake, relay and fedavg, not split")
    if not 0.0 <= config.trim_beta < 0.5:
        raise ConfigError(f"trim-beta: must be in [0, 0.5), got {config.trim_beta!r}")


def _check_concurrency(config: RunConfig, sweepable: int) -> None:
    """Concurrent hops need windows that never overlap: fixed, no extras, room for all lanes."""
    k = max(config.concurrency, config.lanes)
    if config.lanes and config.lanes < config.concurrency:
        raise ConfigError(f"lanes: {config.concurrency} hops in flight need at least as many lanes, "
                          f"got {config.lanes}")
    key = "concurrency" if config.concurrency > 1 else "lanes"  # the key the user set
    if config.strategy != "snake":
        raise ConfigError(f"{key}: only snake has lanes and hops at once, not {config.strategy!r}")
    if config.window == "auto":
        raise ConfigError(f"{key}: windows sized per node (window = \"auto\") could overlap; set a window")
    for flag in ("train-head", "train-stem"):
        if config[flag]:
            raise ConfigError(f"{key}: {k} windows in flight must be disjoint, but {flag} puts the same "
                              f"segment in every one; set {flag}=false")
    if k * config.window > sweepable:
        raise ConfigError(f"{key}: {k} disjoint windows of {config.window} segment(s) need "
                          f"{k * config.window} segments to sweep, the task has {sweepable}")


def _segments(config: RunConfig) -> tuple[str, ...]:
    """The task's segments; for ``llm``, also the checks that need its model."""
    from snake_flower.tasks.task import is_plugin, task_for

    if is_plugin(config.task):
        return _plugin_segments(config)
    if config.task != "llm":
        if config.partitioner == "topic":
            raise ConfigError(f"partitioner: 'topic' needs task llm, not {config.task!r}")
        return task_for(config).segment_names
    if config.strategy == "split":
        raise ConfigError("strategy: split learning does not support task llm")
    from snake_flower.tasks.llm import ModelError, load_config

    try:
        model = load_config(config.model)
        segments = task_for(config).segment_names
    except ModelError as err:
        raise ConfigError(str(err)) from None
    positions = getattr(model, "max_position_embeddings", None)
    if positions and config.seq_len > positions:
        raise ConfigError(f"seq-len: {config.seq_len} exceeds the {positions} positions of "
                          f"model {config.model}")
    return segments


def _plugin_segments(config: RunConfig) -> tuple[str, ...]:
    """A plugin task's segments (its model built once); split learning stays built-in only."""
    from snake_flower.tasks.task import PluginError, build_model, segment_keys, task_for

    if config.strategy == "split":
        raise ConfigError(f"strategy: split learning runs the built-in tasks only, not plugin {config.task}")
    if config.partitioner == "topic":
        raise ConfigError(f"partitioner: 'topic' needs task llm, not {config.task!r}")
    try:
        return tuple(segment_keys(build_model(task_for(config), config.seed)))
    except PluginError as err:
        raise ConfigError(str(err)) from None
