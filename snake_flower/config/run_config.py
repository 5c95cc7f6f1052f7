"""``RunConfig``: every knob of a run, typed, with its default, in one frozen dataclass.

A field's run-config key is its name in kebab-case (``num_server_rounds`` is
``num-server-rounds``, as in Flower's run-config); ``field_name`` and ``key_of`` are the one
place the two spellings meet. ``pyproject.toml``'s ``[tool.flwr.app.config]`` holds the same
table so that ``flwr run .`` sees the same defaults; a test keeps the two equal.

A ``RunConfig`` is also a read-only mapping from kebab-case keys to values, the vocabulary of
the results file, checkpoints and the messages a node receives (``node_message``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A bad run-config value; the message is one line naming the key."""


@dataclass(frozen=True)
class RunConfig(Mapping[str, Any]):
    """One run's configuration, parsed and validated (build it with ``config.resolve``)."""

    # what to train, and how; run-name names the results file (default: the strategy)
    strategy: str = "snake"
    run_name: str = ""
    task: str = "fashion-mnist"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    seed: int = 42
    # task llm: the model and how it is fine-tuned
    model: str = "smollm2-135m"
    finetune: str = "full"
    lora_rank: int = 8
    # FlowerTune's adapters drop out at 0.075; 0 keeps the runs made before the key existed
    lora_dropout: float = 0.0
    # task llm: recompute every decoder layer in backward (transformers' gradient checkpointing),
    # as FlowerTune trains; frozen layers above a Snake window are recomputed either way
    gradient_checkpointing: bool = False
    seq_len: int = 128
    # auto: bf16 or fp16 where the CPU computes it natively (task llm), else fp32
    frozen_dtype: str = "auto"
    frozen_segments: str = ""
    # the snake
    num_server_rounds: int = 128
    window: int | str = 2  # a number of segments, or "auto"
    train_head: bool = True
    train_stem: bool = False
    sweep: str = "serpentine"
    order: str = "shuffle"
    sync: str = "delta"
    sync_tolerance: float = 0.0
    max_update_norm: float = 0.0
    # Snake and relay: score each reply's merge on a seeded slice of the validation data and roll
    # it back if the loss rises by more than gate-tolerance (docs/reliability.md, "Gated merges")
    merge_gate: str = "off"
    gate_tolerance: float = 0.0
    gate_strikes: int = 2
    gate_size: int = 1000
    # Snake: hops in flight at once, on disjoint windows (train-head and train-stem off), and the
    # schedule's lanes (0: as many as concurrency; more: the same windows, fewer hops at once)
    concurrency: int = 1
    lanes: int = 0
    # Snake and relay: evaluate (and return) a moving average of the model over hops; 0 = off
    average_decay: float = 0.0
    # heterogeneous nodes (training/capacity.py): window = "auto" fits each node's memory and compute
    capacity_profile: str = "uniform"
    hop_deadline_s: float = 0.0
    # cs: the window is relayed through the server (counted down and up); p2p: node to node
    mode: str = "cs"
    # FedAvg: Flower's mean, or one of its robust aggregators (FedMedian, FedTrimmedAvg, MultiKrum)
    aggregation: str = "mean"
    trim_beta: float = 0.2
    krum_malicious: int = 0
    krum_select: int = 1
    # Snake's messages, both ways (the server keeps an fp32 master); FedAvg and split send fp32
    payload_dtype: str = "fp32"
    # what the server sends a node (Snake, relay, FedAvg; the master is never changed by it);
    # auto: as before the key existed (Snake's and relay's downloads in payload-dtype, FedAvg's fp32)
    download_dtype: str = "auto"
    # split learning (baseline): the node keeps segments[:cut], the server the rest
    cut: int = 2
    # local work per hop (identical for every strategy)
    local_epochs: int = 1
    local_steps: int = 100
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: str = "none"
    lr_floor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    # sgd (with momentum), adam, or adamw (torch's AdamW: what transformers' Trainer, and so
    # FlowerTune, trains with); one fresh optimizer per visit
    optimizer: str = "sgd"
    clip_norm: float = 1.0
    # knowledge distillation against the model as the node received it
    kd: str = "auto"
    kd_weight: float = 0.7
    kd_temperature: float = 2.0
    # harness: validation-size examples are held out of the training data before partitioning
    # (seeded, stratified); evaluate-on = "validation" scores on them and never reads the test set
    validation_size: int = 0
    evaluate_on: str = "test"
    tune_visits: int = 64
    # set by tune only: stop a trial below the target once past this many bytes (0 = never)
    prune_above_bytes: float = 0.0
    # compare: a run whose node grows by more than this many MB on the ClientApp with its own
    # settings (snake-flower memory --measure) is not run but shown as "does not fit"; 0 = no
    # budget. Not a node's capacity: that is memory-budget-mb, which a node states itself
    fit_budget_mb: float = 0.0
    target_accuracy: float = 0.85
    # task llm: count "to target" down to this held-out perplexity instead (lower is better; 0 = off,
    # target-accuracy then counts); perplexity-levels, e.g. "12.5,9.0,7.5": the bytes, visits and
    # network seconds to each perplexity as well (the cost curve, by the same sustained rule)
    target_perplexity: float = 0.0
    perplexity_levels: str = ""
    # stop a run once it has held its target (the above) for this many consecutive evaluations;
    # the same rule for every strategy of a comparison (0 = run the whole budget)
    stop_after_held: int = 0
    eval_every: int = 2
    eval_batch_size: int = 1000
    eval_samples: int = 0
    hop_timeout: float = 600.0
    fast_poll: bool = True
    min_nodes: int = 1
    # Snake and relay: ask every node its rank before the first hop ("all"), or learn ranks from
    # replies ("lazy": a large federation's first hop waits on no query); auto: lazy above 256 nodes
    rank_discovery: str = "auto"
    out_dir: str = "results"
    # failures: a failed node sits out node-backoff hops (doubling); resume from <out-dir>/snake.ckpt
    node_backoff: int = 2
    resume: bool = False
    # chaos (simulation): crash a train call with this probability; one node leaves for good
    fail_rate: float = 0.0
    leave_round: int = 0
    # chaos: the process of the node that trains this round dies at once (0 = never)
    crash_round: int = 0
    leave_partition: int = 0
    # attacks (tests and benchmarks): byzantine-nodes partitions, chosen by the seed, send poisoned
    # but well-formed replies (training/attack.py); 0 = none
    byzantine_nodes: int = 0
    attack: str = "label-flip"
    attack_scale: float = 10.0

    # ---- the kebab-case view --------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, _FIELDS[key])

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)

    def as_dict(self) -> dict[str, Any]:
        """Every run-config key and its value, kebab-case, in field order (results, checkpoints)."""
        return {key: getattr(self, name) for key, name in _FIELDS.items()}

    @property
    def name(self) -> str:
        """What the run's results file is called: ``run-name``, else the strategy."""
        return self.run_name or self.strategy

    @property
    def kd_enabled(self) -> bool:
        """Whether the run distils (``kd_enabled``)."""
        return kd_enabled(self)

    def replace(self, **fields: Any) -> RunConfig:
        """A copy with ``fields`` (snake_case) changed, not validated again: for values the
        caller has checked (an absolute ``out-dir``); ``resolve(config, {...})`` validates."""
        return dataclasses.replace(self, **fields)


def field_name(key: str) -> str:
    """The ``RunConfig`` field of run-config key ``key`` (``num-server-rounds`` -> ``num_server_rounds``)."""
    return key.replace("-", "_")


def key_of(name: str) -> str:
    """The run-config key of ``RunConfig`` field ``name`` (``num_server_rounds`` -> ``num-server-rounds``)."""
    return name.replace("_", "-")


_FIELDS: dict[str, str] = {key_of(f.name): f.name for f in dataclasses.fields(RunConfig)}
"""Run-config key -> field name, in field order."""

DEFAULTS: dict[str, Any] = RunConfig().as_dict()
"""Every run-config key and its default (kebab-case), as ``pyproject.toml`` holds them."""

NODE_KEYS: tuple[str, ...] = (
    # the task and its model (tasks.task.task_for), the partition (tasks.data.partition_from_config)
    "strategy", "task", "model", "finetune", "lora-rank", "seq-len", "seed", "data-dir",
    "partitioner", "dirichlet-alpha", "classes-per-partition", "validation-size",
    # what the node holds and how it syncs (training.frozen, tasks.task.swept_segment_keys)
    "frozen-dtype", "frozen-segments", "payload-dtype", "sync",
    # the local work (training.loop.LocalWork.from_config): lr-decay spans num-server-rounds
    "local-epochs", "local-steps", "batch-size", "lr", "lr-decay", "lr-floor", "num-server-rounds",
    "momentum", "weight-decay", "clip-norm", "kd", "kd-weight", "kd-temperature",
    # chaos (runtime.chaos.maybe_fail)
    "fail-rate", "crash-round",
)
"""The run-config keys a node reads from its messages, and no other: a message's bytes must
not depend on a server-only key (``out-dir``). The strategies add their own per message
(``server-round``, ``window``, ``segments-sent``, ``segment-versions``, ``lr-rounds``, ``split-*``)."""

OPTIONAL_NODE_KEYS: tuple[str, ...] = ("lora-dropout", "gradient-checkpointing", "optimizer", "download-dtype")
"""Keys a node reads that a message carries only when they differ from their defaults (the node
falls back to the default): a run that leaves them alone sends the bytes it sent before they existed."""

ATTACK_KEYS: tuple[str, ...] = ("byzantine-nodes", "attack", "attack-scale")
"""The keys of an attack (``training.attack``), sent only when ``byzantine-nodes > 0``: a run
without attackers sends the same bytes as before attacks existed."""


def node_message(config: RunConfig) -> dict[str, Any]:
    """The run-config part of a node's message: ``NODE_KEYS`` and their values, as they are,
    ``OPTIONAL_NODE_KEYS`` that differ from their defaults, and ``ATTACK_KEYS`` when the run has
    attacking nodes."""
    keys = NODE_KEYS + (ATTACK_KEYS if config.byzantine_nodes else ())
    optional = {key: config[key] for key in OPTIONAL_NODE_KEYS if config[key] != DEFAULTS[key]}
    return {**{key: config[key] for key in keys}, **optional}


def kd_enabled(config: Mapping[str, Any]) -> bool:
    """``kd = "auto"`` distils only when the partitions are non-IID (or not known to be IID:
    a plugin node's message may carry no ``partitioner``).

    FedAvg and split learning never distil, whatever ``kd`` says: they are trained the
    way their own communities train them, plain cross-entropy (design §3). ``config`` is a
    ``RunConfig`` or a node's message config (kebab-case keys).
    """
    if config.get("strategy") in ("fedavg", "split"):
        return False
    if config["kd"] == "auto":
        return config.get("partitioner") != "iid"
    return config["kd"] == "on"


def perplexity_levels(config: Mapping[str, Any]) -> tuple[float, ...]:
    """The perplexities of ``perplexity-levels`` (``"12.5,9.0,7.5"``), in the order given.

    ``config`` is a ``RunConfig`` or a results file's ``config`` (older ones have no such key:
    no levels). Raises ``ConfigError`` on an entry that is not a finite number > 0.
    """
    text = str(config.get("perplexity-levels", "")).strip()
    if not text:
        return ()
    try:
        levels = tuple(float(item) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"perplexity-levels: expected comma-separated perplexities such as "
                          f"\"12.5,9.0,7.5\", got {text!r}") from None
    for level in levels:
        if not (level > 0 and math.isfinite(level)):
            raise ConfigError(f"perplexity-levels: each level must be a finite perplexity > 0, got {level!r}")
    return levels
