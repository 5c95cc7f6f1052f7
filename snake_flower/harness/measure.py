"""``snake-flower memory --measure``: a node's memory measured on the ClientApp itself.

Each arm (``snake-full``, ``snake-lora``, ``fedavg-full``, ``fedavg-lora``) runs the
project's ClientApp (``snake_flower.client_app.app``, the one ``make_client_app``
returns for the built-in tasks; that is what ``snake-flower run``, ``flwr run .`` and a
deployed node run) in fresh processes (``measure_node``), with its state directory on
disk as a deployed node's ``--node-config state-dir``. Each message of the measured node runs in a fresh process, as a deployed SuperNode
starts one ``flwr-clientapp`` per message (``FreshNode``). The server's side runs here:
the real strategies (``SnakeStrategy``; Flower's ``FedAvg`` through ``OrderedFedAvg``)
build every message, over a chain of 8 nodes (``MeasureGrid``) whose first node is the
measured one and whose 7 others answer for themselves (they are not measured). An arm is
a ``RunConfig`` (``measure_arm``): here ``experiments/llm.toml``'s (``LLM_RUN``) with the
options' model, batch, sequence length, steps, optimizer and frozen dtype (``run_config``);
``measure_runs`` measures an experiment file's runs with their own settings instead. Only the
chain is the measurement's own (``CHAIN``: 8 nodes in fixed order).

Two hops of the measured node are measured:

- ``full-sync``: its first visit, which gets every segment (FedAvg: the whole model);
- ``delta``: its next visit, after each of the 7 other nodes made one hop (Snake: the
  segments that changed since, under ``sync = "delta"``; FedAvg: round 2, the whole
  model again).

Per hop: its process's peak resident set (the kernel's ``VmHWM``, reset before the
message), its growth over that process's baseline (after imports, data and a warm-up,
before its message) and the hop's ledger: the larger of what the node reports (parameters
by dtype, gradients, optimizer state, saved activations) and the received message, which
the node holds before its model and releases array by array as it loads them
(``ledger_sum_bytes``: the two added, as if they were held together). Beside the resident
set, its anonymous part (``baseline_anon_bytes``, ``peak_anon_bytes``: without the pages of
libraries and mapped files, read every 5 ms), which ``experiments/memory_deployed.py``
compares with a deployed node's.
An arm's top-level figures are its hop with the larger growth.

The node's processes run with the Flower patches a node launcher's ClientApp runs with
(``flower_patches.patch_clientapp_process``: a received message's chunks are freed as its
arrays are built), unless ``SNAKE_FLOWER_STOCK_FLOWER=1`` asks for stock Flower: then each
holds what a stock ``flwr-clientapp`` holds. The report's ``flower`` says which.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARMS = ("snake-full", "snake-lora", "fedavg-full", "fedavg-lora")
ALIASES = {"snake": "snake-full", "fedavg": "fedavg-full"}  # the arms' names before the LoRA arms
OPTIMIZERS = ("adam", "adamw", "sgd")
HELD = ("auto", "fp32", "fp16", "bf16", "int8")
NODES = 8
HOPS = ("full-sync", "delta")
TARGETS = {"full-sync": 0.30, "delta": 0.20, "ledger": 0.20}
"""Snake-full's growth over FedAvg-full's per hop (at most), and every arm's growth off its ledger (at most)."""
CHAIN: dict[str, Any] = {"order": "fixed", "num-server-rounds": NODES + 1, "min-nodes": NODES}
"""The measurement's own keys: a chain of ``NODES`` nodes in fixed order (every other key is the arm's)."""
LLM_RUN: dict[str, Any] = {
    "task": "llm", "finetune": "full", "partitioner": "topic", "window": 1, "train-head": False,
    "frozen-segments": "embed,head", "frozen-dtype": "auto", "lr": 0.02, "momentum": 0.9,
    "clip-norm": 1.0, "kd": "off",
}
"""``experiments/llm.toml``'s keys that shape a hop (a test keeps them equal)."""


class MeasureError(ValueError):
    """A bad option, or an arm that failed (the message is one line)."""


@dataclass(frozen=True)
class MeasureOptions:
    """One measurement: the model, the task's batch shape and the local work.

    Attributes
    ----------
    model : str
        A model the task ``llm`` loads (``smollm2-135m``, ``tiny-opt``, a local folder).
    batch, seq : int
        Sequences per step and tokens per sequence (``experiments/llm.toml``: 8 x 96).
    steps : int
        Training steps of a hop (2: the second step runs with the optimizer's state).
    optimizer : str
        ``sgd`` (momentum 0.9, as runs train) or ``adam`` (the paper's setting).
    frozen_dtype : str
        What the node holds its frozen layers in (``auto``: ``frozen.native_dtype``).
    window : int
        Decoder layers Snake trains per hop.
    lora_rank : int
        The LoRA arms' rank.
    """

    model: str = "smollm2-135m"
    batch: int = 8
    seq: int = 96
    steps: int = 2
    optimizer: str = "sgd"
    frozen_dtype: str = "auto"
    window: int = 1
    lora_rank: int = 8

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "steps", "window", "lora_rank"):
            if getattr(self, name) < 1:
                raise MeasureError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise MeasureError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.frozen_dtype not in HELD:
            raise MeasureError(f"frozen-dtype: {self.frozen_dtype!r} is not one of {', '.join(HELD)}")


def arms_of(names: str) -> tuple[str, ...]:
    """The arms of ``--strategies`` (comma-separated; ``snake``/``fedavg`` name the full arms)."""
    arms = tuple(dict.fromkeys(ALIASES.get(name.strip(), name.strip()) for name in names.split(",") if name.strip()))
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise MeasureError(f"strategies: {','.join(unknown) or 'none'} not among {', '.join(ARMS)}")
    return arms


def measure(options: MeasureOptions, arms: tuple[str, ...] = ARMS, timeout: float = 3600.0) -> dict[str, Any]:
    """Measure each arm (module docstring); return the figures, the ratios and the targets.

    Raises
    ------
    MeasureError
        If the model cannot be loaded, or an arm's node process fails or times out.
    """
    from snake_flower.config import ConfigError

    configs = {}
    for arm in arms:
        try:
            configs[arm] = run_config(arm, options)
        except (ConfigError, ValueError) as err:  # the llm task's ModelError is a ValueError
            raise MeasureError(f"{err}".splitlines()[0]) from None
    report: dict[str, Any] = {"model": options.model, "options": asdict(options), "nodes": NODES,
                              "flower": flower_state(), "arms": {}}
    for arm in arms:
        report["arms"][arm] = measure_arm(arm, configs[arm], timeout)
    report["ratios"] = ratios(report["arms"])
    return report


def flower_state() -> str:
    """``patched``, or ``stock (why)``: what the node processes, which inherit the environment, run."""
    from snake_flower.runtime.flower_patches import CLIENTAPP_PATCHES, stock_reason

    stock = stock_reason(*CLIENTAPP_PATCHES)
    return "patched" if stock is None else f"stock ({stock})"


def run_config(arm: str, options: MeasureOptions) -> Any:
    """The ``RunConfig`` of ``arm``: ``LLM_RUN`` (LoRA: as ``docs/llm.md`` runs it) with the options,
    on the measurement's chain (``CHAIN``)."""
    from snake_flower.config import resolve

    strategy, finetune = arm.split("-")
    lora = {"lr": 0.1, "frozen-segments": ""} if finetune == "lora" else {}  # docs/llm.md's LoRA runs
    return resolve(LLM_RUN, lora, {
        "strategy": strategy, "finetune": finetune, "model": options.model, "seq-len": options.seq,
        "batch-size": options.batch, "local-steps": options.steps, "frozen-dtype": options.frozen_dtype,
        "window": options.window, "lora-rank": options.lora_rank, "optimizer": options.optimizer}, CHAIN)


def measure_arm(name: str, config: Any, timeout: float) -> dict[str, Any]:
    """One arm: its node's process, the strategy's two visits to it, their figures.

    ``config`` (a ``RunConfig`` on ``CHAIN``) is all the arm is: its strategy, and every key its
    node reads, which the node gets as a run's node would (``node_message``).
    """
    from flwr.supercore.task_identity import TaskIdentity

    from snake_flower.config import node_message
    from snake_flower.harness.fresh_node import FreshNode
    from snake_flower.harness.node_process import NodeProcessError

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the server's messages
    node_ids = [1000 + 7 * i for i in range(NODES)]
    workdir = Path(tempfile.mkdtemp(prefix=f"snake-flower-measure-{name}-"))
    spec = {"run_id": 1, "node_id": node_ids[0], "config": node_message(config),
            "node_config": {"partition-id": 0, "num-partitions": NODES, "state-dir": str(workdir / "state")}}
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.WARNING)  # the strategies' round-by-round log is no part of the report
    try:
        node = FreshNode(spec, workdir, timeout)
        _serve(config, node, node_ids, timeout)
        if len(node.hops) != 2:
            raise MeasureError(f"{name}: the measured node was sent {len(node.hops)} train message(s), not 2")
        return arm_figures(node.hops, name)
    except NodeProcessError as err:
        raise MeasureError(f"{name}: {err}") from None
    finally:
        flower.setLevel(level)
        shutil.rmtree(workdir, ignore_errors=True)


def _serve(config: Any, node: Any, node_ids: list[int], timeout: float) -> None:
    """The server's side of ``config.strategy``: the real strategy over ``MeasureGrid``, until the
    node's second visit. Relay is Snake with the whole model as its window (``server_app.run_relay``)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from snake_flower.config import node_message
    from snake_flower.harness.measure_grid import MeasureGrid, VisitsDone
    from snake_flower.server_app import fedavg_download, fedavg_message, snake_download
    from snake_flower.tasks.task import build_model, segment_keys, swept_segment_keys, task_for, transport_state
    from strategies import OrderedFedAvg, SnakeStrategy

    model = build_model(task_for(config), config.seed)
    arrays = ArrayRecord(transport_state(model.state_dict()))
    if config.strategy in ("snake", "relay"):
        segments = swept_segment_keys(model, config)
        del model
        relay = config.strategy == "relay"
        strategy = SnakeStrategy(segments, len(segments) if relay else config.window, sweep=config.sweep,
                                 order=config.order, train_head=config.train_head and not relay,
                                 train_stem=config.train_stem and not relay, sync=config.sync,
                                 payload_dtype=config.payload_dtype, download_dtype=snake_download(config),
                                 seed=config.seed, min_nodes=config.min_nodes)
        grid, rounds = MeasureGrid(node_ids, node, segments), 2 * NODES + 1  # its second visit comes at hop 9
        message = node_message(config)  # (later on a short sweep)
    else:
        names = list(segment_keys(model))
        del model
        strategy = OrderedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=NODES,
                                 min_available_nodes=NODES, download_dtype=fedavg_download(config))
        grid, rounds = MeasureGrid(node_ids, node), 2
        message = fedavg_message(config, names, rounds)
    try:
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, timeout=timeout,
                       train_config=ConfigRecord(message))
    except VisitsDone:  # the node's two visits are in: the rest of the run measures nothing
        pass


def arm_figures(hops: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    """An arm's JSON: each hop's figures (its growth over its own process's baseline), and at
    the top those of the hop that grew more."""
    figures = {}
    for name, hop in zip(HOPS, hops):
        reply = hop["reply"]
        if reply.has_error():
            raise MeasureError(f"{arm}: the node's {name} hop failed: {reply.error.reason.splitlines()[-1]}")
        reported = {k: v for record in reply.content.metric_records.values() for k, v in record.items()}
        if "total-bytes" not in reported:
            raise MeasureError(f"{arm}: the node's {name} hop reported no ledger ({sorted(reported)[:4]})")
        ledger = {key.replace("-", "_"): int(value) for key, value in reported.items()
                  if key.endswith("-bytes") and key != "peak-rss-bytes"}
        baseline = hop["baseline_rss_bytes"]
        grown = hop["peak_rss_bytes"] - baseline
        # the message, then the model: its arrays are released as they are loaded (node_copy.py)
        total = max(ledger["total_bytes"], hop["message_bytes"])
        sent = [name for name in hop["config"].get("segments-sent", []) if name]
        figures[name] = {"peak_rss_bytes": hop["peak_rss_bytes"], "baseline_rss_bytes": baseline,
                         "rss_before_bytes": hop["rss_before_bytes"],
                         "rss_after_bytes": hop["rss_after_bytes"], "rss_file_after_bytes": hop["rss_file_after_bytes"],
                         "grown_bytes": grown, "ledger_bytes": total, "message_bytes": hop["message_bytes"],
                         "ledger_sum_bytes": ledger["total_bytes"] + hop["message_bytes"],
                         "reply_bytes": hop["reply_bytes"], "grown_over_ledger": round(grown / total, 4),
                         "baseline_anon_bytes": hop.get("baseline_anon_bytes"), "peak_anon_bytes": hop.get("peak_anon_bytes"),
                         "train_ledger": ledger, "segments_sent": len(sent),
                         "window": [str(name) for name in hop["config"].get("window", [])],
                         "frozen_dtype": str(hop["config"].get("frozen-dtype")),
                         # what the message told the node to train with (a node falls back to sgd)
                         "optimizer": str(hop["config"].get("optimizer", "sgd")), "seconds": hop["seconds"]}
    top = max(HOPS, key=lambda name: figures[name]["grown_bytes"])
    return {"grown_bytes": figures[top]["grown_bytes"], "peak_rss_bytes": figures[top]["peak_rss_bytes"],
            "baseline_rss_bytes": figures[top]["baseline_rss_bytes"],
            "ledger_bytes": figures[top]["ledger_bytes"], "message_bytes": figures[top]["message_bytes"],
            "measured_in": "clientapp", "top_hop": top, "hops": figures}


def ratios(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Snake's growth and total peak over FedAvg's per hop (full and LoRA), each arm's growth
    over its ledger, and whether the targets (``TARGETS``) are met."""
    out: dict[str, Any] = {"targets": dict(TARGETS)}
    for mode in ("full", "lora"):
        snake, fedavg = arms.get(f"snake-{mode}"), arms.get(f"fedavg-{mode}")
        if snake is None or fedavg is None:
            continue
        out[f"snake_over_fedavg_{mode}"] = {
            hop: {"grown": round(snake["hops"][hop]["grown_bytes"] / fedavg["hops"][hop]["grown_bytes"], 4),
                  "peak_rss": round(snake["hops"][hop]["peak_rss_bytes"] / fedavg["hops"][hop]["peak_rss_bytes"], 4),
                  "ledger": round(snake["hops"][hop]["ledger_bytes"] / fedavg["hops"][hop]["ledger_bytes"], 4)}
            for hop in HOPS}
    met = {}
    if "snake_over_fedavg_full" in out:
        met.update({f"{hop}_growth": out["snake_over_fedavg_full"][hop]["grown"] <= TARGETS[hop] for hop in HOPS})
    met["growth_within_ledger"] = all(abs(hop["grown_over_ledger"] - 1) <= TARGETS["ledger"]
                                      for arm in arms.values() for hop in arm["hops"].values())
    out["met"] = met
    return out
