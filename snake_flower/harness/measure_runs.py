"""``snake-flower memory --measure --config FILE --arms A,B``: an experiment's runs, each measured
with its own settings.

Each run config (a table or strategy of the experiment file, resolved as ``compare`` resolves
it, ``--run-config`` included) is measured as it is: its strategy, model, fine-tuning, LoRA
rank and dropout, gradient checkpointing, optimizer, batch, sequence length, local steps,
frozen dtype, window and frozen segments. Only the measurement's chain (``measure.CHAIN``:
8 nodes in fixed order, two visits of the measured node) replaces the run's own. Snake and
relay are served by ``SnakeStrategy``, FedAvg by ``OrderedFedAvg`` (``measure.measure_arm``);
split learning, whose node trains a bottom per batch, is not measured. ``compare`` measures
a run this way for its ``fit-budget-mb`` (``harness.fit_budget``).
"""

from __future__ import annotations

from typing import Any

from snake_flower.config import ConfigError, RunConfig, resolve
from snake_flower.harness.measure import CHAIN, NODES, MeasureError, flower_state, measure_arm, ratios

MEASURED = ("snake", "relay", "fedavg")
"""The strategies whose node the measurement serves."""


def measure_runs(configs: list[RunConfig], timeout: float = 3600.0) -> dict[str, Any]:
    """Each run's node measured with its own settings: ``measure.measure``'s report, its arms
    named by the runs, each with the run-config it was measured with (``run_config``).

    Raises
    ------
    MeasureError
        If a run cannot be measured (task, strategy, window), or its node's process fails.
    """
    chained = [on_chain(config) for config in configs]  # every run checked before the first is measured
    report: dict[str, Any] = {"nodes": NODES, "flower": flower_state(), "arms": {}}
    for config in chained:
        report["arms"][config.name] = {**measure_arm(config.name, config, timeout), "run_config": config.as_dict()}
    report["ratios"] = ratios(report["arms"])
    return report


def measure_run(config: RunConfig, timeout: float = 3600.0) -> dict[str, Any]:
    """One run's arm of ``measure_runs`` (its top-level ``grown_bytes``: the hop that grew more)."""
    return measure_runs([config], timeout)["arms"][config.name]


def on_chain(config: RunConfig) -> RunConfig:
    """``config`` on the measurement's chain, or a one-line ``MeasureError`` if it cannot be measured."""
    if config.task != "llm":
        raise MeasureError(f"{config.name}: task {config.task!r}: the measurement runs task llm's node")
    if config.strategy not in MEASURED:
        raise MeasureError(f"{config.name}: strategy {config.strategy!r} is not measured "
                           f"(only {', '.join(MEASURED)})")
    if config.strategy == "snake" and config.window == "auto":
        raise MeasureError(f"{config.name}: window \"auto\" depends on the nodes' budgets; "
                           "measure a number of segments (--run-config window=N)")
    try:
        return resolve(config, CHAIN)
    except ConfigError as err:  # e.g. a window wider than the model
        raise MeasureError(f"{config.name}: {err}") from None
