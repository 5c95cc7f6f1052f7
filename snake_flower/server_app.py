"""ServerApp: Snake (or a baseline) with centralized evaluation and byte metering.

``flwr run .`` loads ``app`` below (run-config from ``[tool.flwr.app.config]``);
``snake-flower run`` and ``compare`` build the same app around a resolved config.
The ``strategy`` key picks Snake, the full-model relay, Flower's own FedAvg or split
learning; all run the same ClientApp, the same local work and the same metering, and
each row records the visit's local compute (CPU seconds, FLOPs).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from functools import partial
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from snake_flower.config import RunConfig, node_message, resolve
from snake_flower.node_store import NodeStore, run_state_dir
from snake_flower.runtime import results
from snake_flower.runtime.averaging import ModelAverage
from snake_flower.runtime.byzantine import attack_record, gate_fields, gate_record, merge_gate
from snake_flower.runtime.chaos import ChaosGrid
from snake_flower.runtime.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from snake_flower.runtime.flower_patches import patch_object_pulls
from snake_flower.runtime.metering import MeteredGrid, RoundMeter, flower_poll_interval
from snake_flower.runtime.recorder import RunRecorder
from snake_flower.tasks.base import Task
from snake_flower.tasks.data import validation_split
from snake_flower.tasks.task import build_model, segment_keys, swept_segment_keys, task_for, transport_state
from snake_flower.training.capacity import (
    NodeCapacities,
    WindowSizer,
    bottom_step_flops,
    compute_s,
    hop_time_s,
)
from snake_flower.training.loop import LocalWork, SavedActivations, evaluate, memory_ledger, scheduled_lr
from strategies import SnakeStrategy, SplitStrategy
from strategies.nodes import wait_for_nodes
from strategies.robust import fedavg_strategy


DEPLOYED_POLL = 0.05
"""Longest wait between the ServerApp's pulls for a reply from a deployed node (``fast-poll``):
one request to the SuperLink each, while a hop's one reply is awaited."""


def make_server_app(config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp bound to ``config`` (else to the run's own run-config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.time()  # the rows' wall_s count from here, the task's data loading included
        try:
            run(grid, resolve(config if config is not None else context.run_config), started=started)
        finally:
            if not _deployed(grid):  # simulated nodes share this machine's cache: their copies go
                NodeStore(run_state_dir(None, context.run_id)).remove()

    return server_app


def run(grid: Grid, config: RunConfig, started: float | None = None) -> dict[str, Any]:
    """Run ``config.strategy`` and write ``<out-dir>/<run name>.json``.

    ``started``: the ``time.time()`` the rows' ``wall_s`` count from (the ServerApp's start);
    by default, once the model is built and the evaluation set loaded.
    """
    runners = {"snake": run_snake, "relay": run_relay, "fedavg": run_fedavg, "split": run_split}
    return runners[config.strategy](grid, config, started=started)


def _setup(grid: Grid, config: RunConfig, num_rounds: int, poll: float = 0.1,
           visits_per_round: int = 1, started: float | None = None):
    task = task_for(config)
    model = build_model(task, config.seed)
    if config.fast_poll and _deployed(grid):  # reply objects too: not Flower's 1-10 s back-off
        patch_object_pulls()  # (runtime/flower_patches.py)
        poll = min(poll, DEPLOYED_POLL)
    if config.leave_round > 0:  # chaos run: one node leaves for good (see runtime/chaos.py)
        grid = ChaosGrid(grid, config.leave_round, config.leave_partition)
    if config.fast_poll:
        metered = MeteredGrid(grid, poll_interval=poll)
    else:  # Flower's own fixed cadence, to measure what the fast poll saves
        metered = MeteredGrid(grid, poll_interval=flower_poll_interval(grid),
                              first_poll=flower_poll_interval(grid))
    x_test, y_test = _evaluation_set(task, config)
    # a full batch of evaluation inputs stands in for a node's: the ledger and FLOPs depend on shapes only
    # the local work a node does, from what its messages say
    work = LocalWork.from_config(node_message(config), kd=config.kd_enabled)
    sizer = WindowSizer(model, x_test[:config.batch_size], y_test[:config.batch_size], work,
                        config.hop_deadline_s, align=task.align)
    if config.eval_samples:  # the first N test examples, the same for every strategy
        x_test, y_test = x_test[:config.eval_samples], y_test[:config.eval_samples]
    recorder = RunRecorder(config.name, config, model, (x_test, y_test), metered, num_rounds, visits_per_round,
                           score=partial(_score, task, config.eval_batch_size), started=started)
    num_nodes = max(config.min_nodes, len(list(grid.get_node_ids())))
    capacities = NodeCapacities(config.capacity_profile, config.seed, num_nodes, sizer, list(segment_keys(model)))
    return model, metered, recorder, capacities


def _deployed(grid: Grid) -> bool:
    """Is ``grid`` a real deployment's (the ServerApp talks to a SuperLink over HTTP)?"""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


def _evaluation_set(task: Task, config: RunConfig) -> tuple[Any, Any]:
    """The test set, or with ``evaluate-on = "validation"`` the slice held out of the training
    data (tuning picks its settings there and never reads the test set)."""
    x_train, y_train, x_test, y_test = task.load(config.data_dir)
    if config.evaluate_on == "test":
        return x_test, y_test
    labels = task.partition_by(config.data_dir) if task.partition_by else y_train
    held_out = torch.as_tensor(validation_split(labels, config)[1])
    return x_train[held_out], y_train[held_out]


def _score(task: Task, batch_size: int, model, x, y) -> dict[str, float]:
    """Centralized evaluation; an LLM adds its held-out perplexity."""
    if task.max_eval_batch:
        batch_size = min(batch_size, task.max_eval_batch)
    metrics = evaluate(model, x, y, batch_size, align=task.align)
    if task.name == "llm":
        metrics["perplexity"] = math.exp(metrics["loss"])
    return metrics


def _visit_compute(reported: Mapping[str, Any], step_flops: float) -> dict[str, float]:
    """A node visit's local training: its CPU seconds and its FLOPs (one step's x its steps)."""
    return {"train_cpu_s": round(compute_s(reported), 4), "train_flops": step_flops * reported.get("steps", 0.0)}


def run_relay(grid: Grid, config: RunConfig, started: float | None = None) -> dict[str, Any]:
    """Sequential full-model training: Snake without windows, in Snake's chain order.

    One node per round trains every segment and the next node receives the whole
    model; it separates what Snake gains from training sequentially from what it
    gains from its windows.
    """
    return run_snake(grid, config, whole_model=True, started=started)


def run_snake(grid: Grid, config: RunConfig, whole_model: bool = False,
              started: float | None = None) -> dict[str, Any]:
    """One node trains one window per round (hop); only the window travels back.

    The server's state is checkpointed after every hop; ``resume`` continues from it.
    ``whole_model``: every hop's window is every segment (the relay baseline). Each row's
    ``list_s`` is the time its hop spent listing the connected nodes (and asking new ones
    their rank), ``None`` where the hop went on with the last listing.
    """
    model, metered, recorder, capacities = _setup(grid, config, config.num_server_rounds, started=started)
    segments = swept_segment_keys(model, config)
    window = len(segments) if whole_model else config.window
    task = task_for(config)  # the gate scores merges as the run evaluates (a slice of the held-out data)
    gate = merge_gate(config, task, model, partial(_score, task, config.eval_batch_size))
    strategy = SnakeStrategy(segments, window, sweep=config.sweep,
                             order=config.order, train_head=config.train_head and not whole_model,
                             train_stem=config.train_stem and not whole_model, sync=config.sync,
                             sync_tolerance=config.sync_tolerance,
                             max_update_norm=config.max_update_norm, gate=gate,
                             payload_dtype=config.payload_dtype, download_dtype=snake_download(config),
                             min_nodes=config.min_nodes, backoff=config.node_backoff,
                             seed=config.seed, capacity=capacities, misfit=capacities.sizer.misfit,
                             query_timeout=min(60.0, config.hop_timeout),
                             rank_discovery=config.rank_discovery,
                             concurrency=1 if whole_model else config.concurrency,
                             lanes=None if whole_model or not config.lanes else config.lanes)
    metered.by_group = strategy.concurrency > 1  # hops overlap: each row gets its own hop's bytes

    def describe(server_round: int, tally: RoundMeter) -> dict[str, Any]:
        hop = strategy.hops[server_round - 1]
        reported = hop.get("metrics", {})
        # P2P: every segment a node receives comes once, straight from the peer that holds it;
        # CS: the same bytes come down from the server, and the window goes up to it as well
        p2p = tally.down.array_bytes
        moved = p2p if config.mode == "p2p" else tally.down.bytes + tally.up.bytes
        capacity = strategy.capacity_of(hop["node"])
        network = hop_time_s(compute_s(reported), moved, capacity)
        # hops in flight overlap: the model's clock is not the sum of their times
        clock = ({"network_clock_s": results.concurrent_clock(recorder.rows, network, hop["sent_after"]),
                  "sent_after": hop["sent_after"]} if strategy.concurrency > 1 else {})
        return {"nodes": [hop["node"]], "window": hop["window"],
                "partitions": [int(reported["partition-id"])] if "partition-id" in reported else [],
                "segments_sent": hop["segments_sent"], "status": hop["status"],
                "hop_s": round(hop.get("seconds", 0.0), 4), "bytes_p2p": p2p,
                "list_s": None if hop.get("list_s") is None else round(hop["list_s"], 6),
                "train_s": round(float(reported.get("train-seconds", 0.0)), 4),  # the node's, inside hop_s
                "capacity": capacity.as_dict(), "passed_over": hop.get("passed_over", []),
                # a failed hop costs the bytes it moved (its compute, if any, is not reported)
                "network_time_s": network, **clock, **gate_fields(hop),
                **_visit_compute(reported, capacities.sizer.step_flops(hop["window"]) if reported else 0.0)}

    recorder.describe = describe
    if config.window == "auto" and config.capacity_profile == "uniform" and not config.hop_deadline_s:
        log(WARNING, "window auto: no memory budgets (capacity-profile uniform) and no hop-deadline-s; "
            "every node trains the whole model unless its --node-config states memory-budget-mb")
    path, arrays, done = checkpoint_path(config), ArrayRecord(transport_state(model.state_dict())), 0
    average = ModelAverage(config.average_decay) if config.average_decay else None
    if config.resume and path.exists():
        arrays, state = load_checkpoint(path, config)
        strategy.load_state(state["strategy"], state["in-flight"])
        recorder.restore(state["recorder"], state["averaged"] or arrays)
        if average:
            average.load(state["averaged"])
        done = strategy.round_offset
        log(INFO, "resuming from %s after %d of %d hops", path, done, config.num_server_rounds)
    elif config.resume:
        log(INFO, "resume: no checkpoint at %s yet, starting from the first hop", path)

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and done:  # evaluated before the interruption
            return MetricRecord(recorder.evaluated[done]) if done in recorder.evaluated else None
        # with average-decay the average is what is evaluated and returned; nodes get the raw model
        shown = average.update(arrays) if average and server_round > 0 else arrays
        metrics = recorder.evaluate_fn(server_round + done, shown)
        if server_round > 0:
            save_checkpoint(path, arrays, {"config": config.as_dict(), "strategy": strategy.state(),
                                           "recorder": recorder.state()},
                            averaged=average.arrays if average else None,
                            in_flight=strategy.in_flight_arrays(arrays))
        return metrics

    recorder.mode = config.mode
    with recorder.prunable():
        strategy.start(grid=metered, initial_arrays=arrays, num_rounds=config.num_server_rounds - done,
                       timeout=config.hop_timeout, train_config=ConfigRecord(node_message(config)),
                       evaluate_fn=evaluate_and_checkpoint)
    ledgers = [h["metrics"] for h in strategy.hops if "total-bytes" in h.get("metrics", {})]
    return recorder.write(ledgers, provenance=strategy.provenance, failures=strategy.failures,
                          rejected_replies=strategy.rejected_replies, membership=strategy.membership,
                          mode=config.mode, skipped_nodes=[{"node": n, "reason": r}
                                                              for n, r in strategy.skipped.items()],
                          resumed_at_round=done or None, checkpoint=str(path), **gate_record(gate, config),
                          **attack_record(config, len(list(grid.get_node_ids()))))


def run_fedavg(grid: Grid, config: RunConfig, started: float | None = None) -> dict[str, Any]:
    """Flower's FedAvg: every node trains every segment; rounds = hops / nodes (equal visits)."""
    nodes = len(wait_for_nodes(grid, config.min_nodes))
    num_rounds = max(1, math.ceil(config.num_server_rounds / nodes))
    model, metered, recorder, capacities = _setup(grid, config, num_rounds, visits_per_round=nodes, started=started)
    segments = list(segment_keys(model))
    ledgers: list[dict[str, float]] = []

    this_round: list[dict[str, float]] = []  # the replies Flower aggregated in the round now ending
    failures: list[dict[str, Any]] = []  # a node's visit that sent no good reply

    def aggregate_metrics(records: list[RecordDict], weighting: str):
        replies = [dict(r) for rd in records for r in rd.metric_records.values()]
        ledgers.extend(replies)
        this_round[:] = replies
        return aggregate_metricrecords(records, weighting)

    # Flower's FedAvg (or its robust aggregators), averaging in partition order: a run repeats bit for bit
    strategy = fedavg_strategy(config.aggregation, trim_beta=config.trim_beta, krum_malicious=config.krum_malicious,
                               krum_select=config.krum_select, fraction_train=1.0, fraction_evaluate=0.0,
                               min_train_nodes=1,
                               # we waited for min-nodes above; later rounds go on with who is left
                               min_available_nodes=1, train_metrics_aggr_fn=aggregate_metrics,
                               download_dtype=fedavg_download(config))

    def describe(server_round: int, tally: RoundMeter) -> dict[str, Any]:
        replies, this_round[:] = list(this_round), []  # Flower drops error replies before aggregating
        for node, reason in tally.failed_nodes().items():
            failures.append({"round": server_round, "node": node, "reason": reason})
            log(WARNING, "round %d: node %d failed its visit: %s", server_round, node, reason)
        # every node is sent the same model and sends one back: its share of the round's bytes
        share = (tally.down.bytes + tally.up.bytes) / max(len(tally.down_by_node), 1)
        times = [hop_time_s(compute_s(led), share,
                            capacities(led["partition-id"], led)) for led in replies]
        return {"nodes": sorted(tally.up_by_node), "window": segments,
                "status": "merged" if replies else "failed",
                "partitions": sorted(int(led["partition-id"]) for led in replies),
                # the round waits for its straggler (nodes that failed report no compute: not counted)
                "network_time_s": max(times, default=0.0),
                "train_cpu_s": round(sum(compute_s(led) for led in replies), 4),
                "train_flops": step_flops * sum(led.get("steps", 0.0) for led in replies)}

    step_flops = capacities.sizer.step_flops(segments)  # plain cross-entropy: no teacher
    recorder.describe = describe
    train_config = ConfigRecord(fedavg_message(config, segments, num_rounds))
    with recorder.prunable():
        strategy.start(grid=metered, initial_arrays=ArrayRecord(transport_state(model.state_dict())),
                       num_rounds=num_rounds, timeout=config.hop_timeout, train_config=train_config,
                       evaluate_fn=recorder.evaluate_fn)
    return recorder.write([led for led in ledgers if "total-bytes" in led], mode="cs", failures=failures,
                          **attack_record(config, nodes))


def snake_download(config: RunConfig) -> str | None:
    """What Snake's and relay's downloads carry: ``download-dtype``, or with its default
    ``auto`` the ``payload-dtype`` both ways, as before the key existed (``None``)."""
    return None if config.download_dtype == "auto" else config.download_dtype


def fedavg_download(config: RunConfig) -> str:
    """What FedAvg's train messages carry: ``download-dtype``, with ``auto`` Flower's fp32."""
    return "fp32" if config.download_dtype == "auto" else config.download_dtype


def fedavg_message(config: RunConfig, segments: list[str], num_rounds: int) -> dict[str, Any]:
    """The config of FedAvg's messages: the run's node keys, the whole model as the window.

    The same ClientApp as Snake's: the window is every segment and nothing is stale.
    FedAvg trains as its community does: plain cross-entropy, never Snake's distillation;
    its lr decays over its own rounds (``lr-rounds``; Snake's and split's over
    num-server-rounds); Flower's FedAvg averages what it is sent as it is, so replies
    stay fp32 whatever ``payload-dtype`` says (``download-dtype`` may encode what it sends).
    """
    return {**node_message(config), "payload-dtype": "fp32", "kd": "off", "window": segments, "sync": "window",
            "lr-rounds": num_rounds, "segments-sent": segments, "segment-versions": [0] * len(segments)}


def run_split(grid: Grid, config: RunConfig, started: float | None = None) -> dict[str, Any]:
    """Relay split learning: per batch, activations up and gradients down; bottoms relayed."""
    # One round trip per batch: poll the Grid often, or waiting dominates the run.
    model, metered, recorder, capacities = _setup(grid, config, config.num_server_rounds,
                                                  poll=0.005, started=started)
    names = list(segment_keys(model))
    top = copy.deepcopy(model[config.cut:])  # the server's part, same seeded weights
    bottom_flops = bottom_step_flops(model[:config.cut], capacities.sizer.x)
    strategy = SplitStrategy(segment_keys(model), config.cut, top, config.local_steps,
                             lr=config.lr, momentum=config.momentum,
                             lr_at=lambda visit: scheduled_lr(config.lr, visit, config.num_server_rounds,
                                                              config.lr_decay, config.lr_floor),
                             weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                             order=config.order, seed=config.seed, min_nodes=config.min_nodes,
                             query_timeout=min(60.0, config.hop_timeout),
                             message_timeout=config.hop_timeout, activation_meter=SavedActivations)

    def describe(server_round: int, tally: RoundMeter) -> dict[str, Any]:
        visit = strategy.visits[-1]
        reported = visit.get("metrics", {})
        # the node's rank, not partition 0's, when a failed visit reported nothing
        capacity = capacities(strategy.node_ranks.get(visit["node"], float("inf")), reported)
        # the node's compute at its speed, the server's at the reference speed, every batch's transfer
        # a failed visit costs the bytes it moved and the server's compute (the node's is not reported)
        network = (hop_time_s(reported.get("compute-seconds", 0.0), tally.down.bytes + tally.up.bytes, capacity)
                   + visit.get("server-seconds", 0.0))
        return {"nodes": [visit["node"]], "window": names[:config.cut], "status": visit["status"],
                "partitions": [int(reported["partition-id"])] if "partition-id" in reported else [],
                "steps": visit["steps"], "capacity": capacity.as_dict(), "network_time_s": network,
                "train_cpu_s": round(reported.get("compute-seconds", 0.0), 4),
                "train_flops": bottom_flops * reported.get("steps", 0.0)}

    recorder.describe = describe
    with recorder.prunable():
        strategy.start(grid=metered, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=config.num_server_rounds, timeout=config.hop_timeout,
                       train_config=ConfigRecord(node_message(config)), evaluate_fn=recorder.evaluate_fn)
    ledgers = [v["metrics"] for v in strategy.visits if "total-bytes" in v.get("metrics", {})]
    server = []  # the server side of split learning: the top, trained in this process
    if strategy.server_optimizer is not None:
        server = [memory_ledger(top, list(top.parameters()), strategy.server_optimizer,
                                strategy.server_activation_peak)]
    return recorder.write(ledgers, failures=strategy.failures, cut=config.cut, mode="cs",
                          memory_server=results.peak_ledger(server))


app = make_server_app()
