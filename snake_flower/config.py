"""Run configuration: defaults, parsing and validation.

Every knob of a run lives in ``DEFAULTS`` (kebab-case, as in Flower's run-config).
``pyproject.toml``'s ``[tool.flwr.app.config]`` holds the same table so that
``flwr run .`` sees the same defaults; a test keeps the two equal.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    # what to train, and how; run-name names the results file (default: the strategy)
    "strategy": "snake",
    "run-name": "",
    "task": "fashion-mnist",
    "data-dir": "",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "classes-per-partition": 2,
    "seed": 42,
    # task llm: the model and how it is fine-tuned
    "model": "smollm2-135m",
    "finetune": "full",
    "lora-rank": 8,
    "seq-len": 128,
    # auto: bf16 or fp16 where the CPU computes it natively (task llm), else fp32
    "frozen-dtype": "auto",
    "frozen-segments": "",
    # the snake
    "num-server-rounds": 128,
    "window": 2,
    "train-head": True,
    "train-stem": False,
    "sweep": "serpentine",
    "order": "shuffle",
    "sync": "delta",
    "sync-tolerance": 0.0,
    "max-update-norm": 0.0,
    # Snake: hops in flight at once, on disjoint windows (train-head and train-stem off), and the
    # schedule's lanes (0: as many as concurrency; more: the same windows, fewer hops at once)
    "concurrency": 1,
    "lanes": 0,
    # Snake and relay: evaluate (and return) a moving average of the model over hops; 0 = off
    "average-decay": 0.0,
    # heterogeneous nodes (training/capacity.py): window = "auto" fits each node's memory and compute
    "capacity-profile": "uniform",
    "hop-deadline-s": 0.0,
    # cs: the window is relayed through the server (counted down and up); p2p: node to node
    "mode": "cs",
    # Snake's messages, both ways (the server keeps an fp32 master); FedAvg and split send fp32
    "payload-dtype": "fp32",
    # split learning (baseline): the node keeps segments[:cut], the server the rest
    "cut": 2,
    # local work per hop (identical for every strategy)
    "local-epochs": 1,
    "local-steps": 100,
    "batch-size": 32,
    "lr": 0.05,
    "lr-decay": "none",
    "lr-floor": 0.1,
    "momentum": 0.9,
    "weight-decay": 0.0,
    "clip-norm": 1.0,
    # knowledge distillation against the model as the node received it
    "kd": "auto",
    "kd-weight": 0.7,
    "kd-temperature": 2.0,
    # harness: validation-size examples are held out of the training data before partitioning
    # (seeded, stratified); evaluate-on = "validation" scores on them and never reads the test set
    "validation-size": 0,
    "evaluate-on": "test",
    "tune-visits": 64,
    # set by tune only: stop a trial below the target once past this many bytes (0 = never)
    "prune-above-bytes": 0.0,
    "target-accuracy": 0.85,
    "eval-every": 2,
    "eval-batch-size": 1000,
    "eval-samples": 0,
    "hop-timeout": 600.0,
    "fast-poll": True,
    "min-nodes": 1,
    # Snake and relay: ask every node its rank before the first hop ("all"), or learn ranks from
    # replies ("lazy": a large federation's first hop waits on no query); auto: lazy above 256 nodes
    "rank-discovery": "auto",
    "out-dir": "results",
    # failures: a failed node sits out node-backoff hops (doubling); resume from <out-dir>/snake.ckpt
    "node-backoff": 2,
    "resume": False,
    # chaos (simulation): crash a train call with this probability; one node leaves for good
    "fail-rate": 0.0,
    "leave-round": 0,
    # chaos: the process of the node that trains this round dies at once (0 = never)
    "crash-round": 0,
    "leave-partition": 0,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": ("snake", "relay", "fedavg", "split"),
    "partitioner": ("iid", "dirichlet", "pathological", "topic"),
    "finetune": ("full", "lora"),
    "frozen-dtype": ("auto", "fp32", "fp16", "bf16", "int8"),
    "payload-dtype": ("fp32", "fp16", "int8"),
    "sweep": ("serpentine", "forward"),
    "order": ("fixed", "shuffle", "capacity"),
    "rank-discovery": ("auto", "all", "lazy"),
    "capacity-profile": ("uniform", "mixed"),
    "mode": ("cs", "p2p"),
    "sync": ("delta", "window"),
    "kd": ("auto", "on", "off"),
    "lr-decay": ("none", "cosine"),
    "evaluate-on": ("test", "validation"),
}

POSITIVE = ("num-server-rounds", "window", "batch-size", "eval-every", "eval-batch-size",
            "min-nodes", "classes-per-partition", "kd-temperature", "hop-timeout", "lora-rank",
            "seq-len", "tune-visits", "concurrency")
NON_NEGATIVE = ("local-epochs", "local-steps", "lr", "momentum", "weight-decay", "clip-norm",
                "eval-samples", "sync-tolerance", "max-update-norm", "node-backoff", "leave-round",
                "leave-partition", "crash-round", "lanes", "hop-deadline-s", "validation-size", "prune-above-bytes")


class ConfigError(ValueError):
    """A bad run-config value; the message is one line naming the key."""


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse ``"k=v k2=v2"`` as Flower's ``--run-config`` does, but leniently.

    Values are TOML (``3``, ``0.5``, ``true``, ``"text"``); a bare word that is not
    valid TOML is taken as a string, so ``task=vgg11`` works without quotes.
    """
    out: dict[str, Any] = {}
    for pair in (text or "").split():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"run-config: expected key=value, got {pair!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip("'\"")
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read an experiment TOML file: run-config keys, and tables of them (``experiment_layers``)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: no such file {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config: {path} is not valid TOML ({err})") from None
    return data


def resolve(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Fuse ``DEFAULTS`` with each layer in turn, then validate the result."""
    config = dict(DEFAULTS)
    for layer in layers:
        for key, value in layer.items():
            if key not in DEFAULTS:
                raise ConfigError(f"{key}: unknown run-config key")
            config[key] = _coerce(key, value)
    validate(config)
    return config


def _coerce(key: str, value: Any) -> Any:
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
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def validate(config: Mapping[str, Any]) -> None:
    """Check values that do not depend on the task (the task checks the window)."""
    from snake_flower.tasks.task import TASK_NAMES, frozen_segments, is_plugin  # local: task pulls in torch

    if config["task"] not in TASK_NAMES and not is_plugin(config["task"]):
        raise ConfigError(f"task: unknown task {config['task']!r} (known: {', '.join(TASK_NAMES)})")
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key}: {config[key]!r} is not one of {', '.join(allowed)}")
    if isinstance(config["window"], str) and config["window"] != "auto":
        raise ConfigError(f"window: expected a number of segments or \"auto\", got {config['window']!r}")
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
    if config["frozen-dtype"] in ("fp16", "bf16") and config["task"] != "llm":
        raise ConfigError(f"frozen-dtype: {config['frozen-dtype']} needs task llm (its segments cast "
                          f"their inputs); task {config['task']} trains with fp32 frozen layers")
    segments = tuple(name for name in segments if name not in frozen)
    sweepable = len(segments) - config["train-head"] - config["train-stem"]
    if config["strategy"] == "split" and not 1 <= config["cut"] < len(segments):
        raise ConfigError(f"cut: must leave at least one segment on each side, got {config['cut']}")
    if config["window"] == "auto" and sweepable < 1:
        raise ConfigError("window: 'auto' needs at least one segment to sweep (train-head/train-stem excluded)")
    if isinstance(config["window"], int) and config["window"] > sweepable:
        what = f"model {config['model']}" if config["task"] == "llm" else f"task {config['task']}"
        raise ConfigError(f"window: {config['window']} exceeds the {sweepable} segments that {what} "
                          f"can sweep (train-head/train-stem excluded)")
    if config["concurrency"] > 1 or config["lanes"] > 1:
        _check_concurrency(config, sweepable)
    for key in NON_NEGATIVE:
        if config[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {config[key]!r}")
    if config["dirichlet-alpha"] <= 0:
        raise ConfigError(f"dirichlet-alpha: must be > 0, got {config['dirichlet-alpha']!r}")
    if config["rank-discovery"] == "lazy" and (config["window"] == "auto" or config["order"] == "capacity"):
        raise ConfigError("rank-discovery: 'lazy' cannot fit window = \"auto\" nor order = \"capacity\" "
                          "(both need every node's report before the first hop)")
    if config["hop-deadline-s"] > 0 and config["window"] != "auto":
        raise ConfigError("hop-deadline-s: only window = \"auto\" fits windows to a deadline; set window=auto")
    if config["hop-deadline-s"] > 0 and config["local-steps"] == 0:
        raise ConfigError("hop-deadline-s: estimating a hop's compute time needs local-steps > 0")
    if config["local-epochs"] == 0 and config["local-steps"] == 0:
        raise ConfigError("local-epochs: one of local-epochs and local-steps must be > 0")
    if not 0.0 < config["target-accuracy"] <= 1.0:
        raise ConfigError(f"target-accuracy: must be in (0, 1], got {config['target-accuracy']!r}")
    if not 0.0 <= config["lr-floor"] <= 1.0:
        raise ConfigError(f"lr-floor: must be in [0, 1], got {config['lr-floor']!r}")
    if not 0.0 <= config["fail-rate"] < 1.0:
        raise ConfigError(f"fail-rate: must be in [0, 1), got {config['fail-rate']!r}")
    if config["resume"] and config["strategy"] not in ("snake", "relay"):
        raise ConfigError(f"resume: only strategies snake and relay write checkpoints, not {config['strategy']!r}")
    if config["evaluate-on"] == "validation" and config["validation-size"] == 0:
        raise ConfigError("evaluate-on: 'validation' needs validation-size > 0 (examples held out of training)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*|", config["run-name"]):
        raise ConfigError(f"run-name: {config['run-name']!r} must be a plain file name (letters, digits, - _ .)")
    if not 0.0 <= config["average-decay"] < 1.0:
        raise ConfigError(f"average-decay: must be in [0, 1), got {config['average-decay']!r}")
    if config["average-decay"] and config["strategy"] not in ("snake", "relay"):
        raise ConfigError(f"average-decay: only snake and relay average over hops, not {config['strategy']!r}")
    if not 0.0 <= config["kd-weight"] <= 1.0:
        raise ConfigError(f"kd-weight: must be in [0, 1], got {config['kd-weight']!r}")


def _check_concurrency(config: Mapping[str, Any], sweepable: int) -> None:
    """Concurrent hops need windows that never overlap: fixed, no extras, room for all lanes."""
    k = max(config["concurrency"], config["lanes"])
    if config["lanes"] and config["lanes"] < config["concurrency"]:
        raise ConfigError(f"lanes: {config['concurrency']} hops in flight need at least as many lanes, "
                          f"got {config['lanes']}")
    key = "concurrency" if config["concurrency"] > 1 else "lanes"  # the key the user set
    if config["strategy"] != "snake":
        raise ConfigError(f"{key}: only snake has lanes and hops at once, not {config['strategy']!r}")
    if config["window"] == "auto":
        raise ConfigError(f"{key}: windows sized per node (window = \"auto\") could overlap; set a window")
    for flag in ("train-head", "train-stem"):
        if config[flag]:
            raise ConfigError(f"{key}: {k} windows in flight must be disjoint, but {flag} puts the same "
                              f"segment in every one; set {flag}=false")
    if k * config["window"] > sweepable:
        raise ConfigError(f"{key}: {k} disjoint windows of {config['window']} segment(s) need "
                          f"{k * config['window']} segments to sweep, the task has {sweepable}")


def _segments(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The task's segments; for ``llm``, also the checks that need its model."""
    from snake_flower.tasks.task import is_plugin, task_for

    if is_plugin(config["task"]):
        return _plugin_segments(config)
    if config["task"] != "llm":
        if config["partitioner"] == "topic":
            raise ConfigError(f"partitioner: 'topic' needs task llm, not {config['task']!r}")
        return task_for(config).segment_names
    if config["strategy"] == "split":
        raise ConfigError("strategy: split learning does not support task llm")
    from snake_flower.tasks.llm import ModelError, load_config

    try:
        model = load_config(config["model"])
        segments = task_for(config).segment_names
    except ModelError as err:
        raise ConfigError(str(err)) from None
    positions = getattr(model, "max_position_embeddings", None)
    if positions and config["seq-len"] > positions:
        raise ConfigError(f"seq-len: {config['seq-len']} exceeds the {positions} positions of "
                          f"model {config['model']}")
    return segments


def _plugin_segments(config: Mapping[str, Any]) -> tuple[str, ...]:
    """A plugin task's segments (its model built once); split learning stays built-in only."""
    from snake_flower.tasks.task import PluginError, build_model, segment_keys, task_for

    if config["strategy"] == "split":
        raise ConfigError(f"strategy: split learning runs the built-in tasks only, not plugin {config['task']}")
    if config["partitioner"] == "topic":
        raise ConfigError(f"partitioner: 'topic' needs task llm, not {config['task']!r}")
    try:
        return tuple(segment_keys(build_model(task_for(config), int(config["seed"]))))
    except PluginError as err:
        raise ConfigError(str(err)) from None

def experiment_layers(data: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The run-config layers of run ``name`` in an experiment file, lowest precedence first.

    Flat keys apply to every run; a table ``[snake]``, ``[relay]``, ``[fedavg]`` or
    ``[split]`` adds its strategy's own settings; a table with another name is a variant
    (an ablation, a second Snake) and must set ``strategy``. Its results file is
    ``<name>.json``. ``--run-config`` comes after these layers.
    """
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: dict(v) for k, v in data.items() if isinstance(v, dict)}
    for table, values in tables.items():
        if table not in CHOICES["strategy"] and "strategy" not in values:
            raise ConfigError(f"[{table}]: a variant table must set strategy "
                              f"(one of {', '.join(CHOICES['strategy'])})")
        if table in CHOICES["strategy"] and values.get("strategy", table) != table:
            raise ConfigError(f"[{table}]: strategy = {values['strategy']!r} contradicts the table's name")
    if name in tables:
        table = tables[name]
        return [flat, {**table, "strategy": table.get("strategy", name), "run-name": name}]
    if name in CHOICES["strategy"]:
        return [flat, {"strategy": name}]
    known = sorted(set(CHOICES["strategy"]) | set(tables))
    raise ConfigError(f"strategies: {name!r} is neither a strategy nor a table of the experiment "
                      f"file (known: {', '.join(known)})")


def run_name(config: Mapping[str, Any]) -> str:
    """What a run's results file is called: ``run-name``, else the strategy."""
    return config["run-name"] or config["strategy"]


def kd_enabled(config: Mapping[str, Any]) -> bool:
    """``kd = "auto"`` distils only when the partitions are non-IID.

    FedAvg and split learning never distil, whatever ``kd`` says: they are trained the
    way their own communities train them, plain cross-entropy (design §3).
    """
    if config.get("strategy") in ("fedavg", "split"):
        return False
    if config["kd"] == "auto":
        return config["partitioner"] != "iid"
    return config["kd"] == "on"
