"""ServerApp: run Snake Learning with centralized evaluation and byte metering.

``flwr run .`` loads ``app`` below (run-config from ``[tool.flwr.app.config]``);
``snake-flower run`` builds the same app around an already resolved config.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from strategies import SnakeStrategy

from . import results
from .config import resolve
from .metering import MeteredGrid, RoundMeter
from .task import TASKS, build_model, segment_keys
from .training import evaluate


def make_server_app(config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp bound to ``config`` (else to the run's own run-config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_snake(grid, resolve(config if config is not None else context.run_config))

    return server_app


def run_snake(grid: Grid, config: dict[str, Any]) -> dict[str, Any]:
    """Run the configured number of hops and write ``<out-dir>/snake.json``."""
    task = TASKS[config["task"]]
    model = build_model(task, config["seed"])
    segments = segment_keys(model)
    metered = MeteredGrid(grid)
    strategy = SnakeStrategy(segments, config["window"], sweep=config["sweep"], order=config["order"],
                             train_head=config["train-head"], train_stem=config["train-stem"],
                             sync=config["sync"], min_nodes=config["min-nodes"], seed=config["seed"],
                             query_timeout=min(60.0, config["hop-timeout"]))
    _, _, x_test, y_test = task.load(config["data-dir"])
    rows: list[dict[str, Any]] = []
    evaluated: dict[int, dict[str, float]] = {}
    final = {"arrays": ArrayRecord()}  # Result.arrays stays empty if no hop ever merged
    t0 = time.time()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        final["arrays"] = arrays
        last = server_round == config["num-server-rounds"]
        if server_round == 0 or last or server_round % config["eval-every"] == 0:
            model.load_state_dict(arrays.to_torch_state_dict())
            evaluated[server_round] = evaluate(model, x_test, y_test, config["eval-batch-size"])
        if server_round > 0:
            rows.append(_round_row(server_round, strategy.hops[-1], metered.close_round(),
                                   evaluated.get(server_round), time.time() - t0))
            _progress(rows[-1], config["num-server-rounds"])
        return MetricRecord(evaluated[server_round]) if server_round in evaluated else None

    strategy.start(grid=metered, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=config["num-server-rounds"], timeout=config["hop-timeout"],
                   train_config=ConfigRecord(dict(config)), evaluate_fn=evaluate_fn)
    ledgers = [hop["metrics"]["memory"] for hop in strategy.hops if "memory" in hop.get("metrics", {})]
    final_round = max(evaluated)
    payload = {
        "strategy": "snake", "task": config["task"], "config": dict(config),
        "versions": results.versions(), "rounds": rows, "provenance": strategy.provenance,
        "memory": results.peak_ledger(ledgers), "failures": strategy.failures,
        "rejected_replies": strategy.rejected_replies, "initial": evaluated[0],
        "final": {**evaluated[final_round], "round": final_round,
                  "bytes_total": sum(r["bytes_down"] + r["bytes_up"] + r["bytes_control"] for r in rows),
                  "wall_s": time.time() - t0, "model_bytes": results.model_bytes(final["arrays"]),
                  "model_sha256": results.model_sha256(final["arrays"])},
    }
    path = results.write_json(Path(config["out-dir"]) / "snake.json", payload)
    log(INFO, "snake: final accuracy %.4f after %d hops, %.2f MB moved; results in %s",
        payload["final"]["accuracy"], len(rows), payload["final"]["bytes_total"] / 1e6, path)
    return payload


def _round_row(server_round: int, hop: dict[str, Any], tally: RoundMeter, metrics: dict[str, float] | None,
               wall_s: float) -> dict[str, Any]:
    reported = hop.get("metrics", {}).get("metrics", {})
    return {"round": server_round, "nodes": [hop["node"]],
            "partitions": [int(reported["partition-id"])] if "partition-id" in reported else [],
            "window": hop["window"],
            "segments_sent": hop["segments_sent"], "status": hop["status"],
            "bytes_down": tally.down.bytes, "bytes_up": tally.up.bytes,
            "bytes_control": tally.control.bytes,  # node discovery (query messages)
            "bytes_p2p": tally.up.array_bytes,  # P2P: the window goes once, node to next node
            "array_bytes_up": tally.up.array_bytes, "raw_bytes_down": tally.down.raw_bytes,
            "raw_bytes_up": tally.up.raw_bytes,
            "accuracy": metrics["accuracy"] if metrics else None,
            "loss": metrics["loss"] if metrics else None, "wall_s": round(wall_s, 3)}


def _progress(row: dict[str, Any], total: int) -> None:
    acc = "" if row["accuracy"] is None else f"acc {row['accuracy']:.4f}  "
    log(INFO, "[hop %d/%d] %s%s  %s  down %.1f kB up %.1f kB  %.0fs", row["round"], total, acc,
        "+".join(row["window"]), row["status"], row["bytes_down"] / 1e3, row["bytes_up"] / 1e3,
        row["wall_s"])


app = make_server_app()
