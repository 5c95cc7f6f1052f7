"""One run's record: per-round rows, centralized evaluation, the results file.

Every strategy is recorded alike. Flower calls ``evaluate_fn`` once per round with
the current global model, so that is where a round ends: the model is evaluated
(every ``eval-every`` node visits and on the last round), the Grid's byte tally for the round
is closed, and the strategy-specific ``describe(round)`` adds who trained what.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore import log
from torch import nn

from snake_flower.config import RunConfig
from snake_flower.runtime import results
from snake_flower.runtime.metering import MeteredGrid
from snake_flower.training.loop import evaluate

Describe = Callable[[int, Any], dict[str, Any]]
Score = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, float]]


class RunPruned(Exception):
    """A tuning trial stopped early: below the target after more bytes than the best trial's
    bytes to its sustained target, so it can no longer win (``prune-above-bytes``)."""


class TargetHeld(Exception):
    """A run stopped early: it has held its target for ``stop-after-held`` consecutive evaluations."""


class RunRecorder:
    """Rows, evaluation and the final JSON of one run of one strategy.

    ``started`` is the ``time.time()`` the rows' ``wall_s`` count from (default: now).
    """

    def __init__(self, name: str, config: RunConfig, model: nn.Module,
                 test: tuple[torch.Tensor, torch.Tensor], meter: MeteredGrid, num_rounds: int,
                 visits_per_round: int = 1, score: Score | None = None, started: float | None = None) -> None:
        self.name, self.config, self.model, self.test, self.meter = name, config, model, test, meter
        self.score = score or (lambda model, x, y: evaluate(model, x, y, config.eval_batch_size))
        self.num_rounds, self.visits_per_round = num_rounds, visits_per_round
        self.describe: Describe = lambda server_round, tally: {}
        self.rows: list[dict[str, Any]] = []
        self.evaluated: dict[int, dict[str, float]] = {}
        self.arrays = ArrayRecord(model.state_dict())  # Result.arrays stays empty if nothing merged
        self.started = time.time() if started is None else started  # wall_s counts from here
        self.mode = "cs"  # how bytes are counted (Snake and relay: the run's mode)
        self.pruned: dict[str, Any] | None = None
        self.held: dict[str, Any] | None = None

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's centralized-evaluation hook; also closes the round's record."""
        self.arrays = arrays
        last = server_round == self.num_rounds
        if server_round == 0 or last or self._eval_due(server_round):
            self.model.load_state_dict(arrays.to_torch_state_dict())
            self.evaluated[server_round] = self.score(self.model, *self.test)
        if server_round > 0:
            tally = self.meter.close_round(str(server_round) if self.meter.by_group else None)
            metrics = self.evaluated.get(server_round)
            row = {"round": server_round, **self.describe(server_round, tally),
                   "bytes_down": tally.down.bytes, "bytes_up": tally.up.bytes,
                   "bytes_control": tally.control.bytes,  # node discovery (query messages)
                   "array_bytes_up": tally.up.array_bytes, "raw_bytes_down": tally.down.raw_bytes,
                   "raw_bytes_up": tally.up.raw_bytes,
                   "accuracy": metrics["accuracy"] if metrics else None,
                   "loss": metrics["loss"] if metrics else None,
                   "wall_s": round(time.time() - self.started, 3)}
            row.setdefault("bytes_p2p", row["bytes_down"] + row["bytes_up"])
            row.update({k: v for k, v in (metrics or {}).items() if k not in row})  # an LLM's perplexity
            self.rows.append(row)
            self._progress(row)
            if metrics and server_round < self.num_rounds:
                self._prune(metrics)
                self._stop_if_held()
        return MetricRecord(self.evaluated[server_round]) if server_round in self.evaluated else None

    def state(self) -> dict[str, Any]:
        """Rows, evaluations and elapsed time, for a checkpoint (JSON-able)."""
        return {"rows": self.rows, "evaluated": [[r, m] for r, m in self.evaluated.items()],
                "elapsed": time.time() - self.started}

    def restore(self, state: dict[str, Any], arrays: ArrayRecord) -> None:
        """Continue a run from ``state()``; ``wall_s`` counts on from its elapsed time."""
        self.rows = list(state["rows"])
        self.evaluated = {int(r): dict(m) for r, m in state["evaluated"]}
        self.started = time.time() - float(state["elapsed"])
        self.arrays = arrays

    @contextmanager
    def prunable(self) -> Iterator[None]:
        """Around a strategy's ``start``: a run stopped early (pruned, or its target held) ends
        there and is still written."""
        try:
            yield
        except RunPruned:
            log(INFO, "%s: pruned at round %d (%.2f MB, %s %.4f short of the target): it can no longer "
                "beat the best trial", self.name, self.pruned["round"], self.pruned["bytes"] / 1e6,
                self._metric, self.pruned[self._metric])
        except TargetHeld:
            log(INFO, "%s: stopped at round %d: the target held for %d evaluations in a row (stop-after-held)",
                self.name, self.held["round"], self.held["evaluations"])

    @property
    def _metric(self) -> str:
        """What the run's target is on: the held-out perplexity (``target-perplexity``) or accuracy."""
        return "perplexity" if self.config.target_perplexity > 0 else "accuracy"

    def _meets(self, metrics: dict[str, float]) -> bool:
        """Is an evaluation at the target or better (at or below a perplexity, at or above an accuracy)?"""
        perplexity = self._metric == "perplexity"
        target = self.config.target_perplexity if perplexity else self.config.target_accuracy
        return results.meets_target(metrics[self._metric], target, lower_is_better=perplexity)

    def _prune(self, metrics: dict[str, float]) -> None:
        """Tuning only: stop once short of the target past ``prune-above-bytes``.

        The sustained target is reached at an evaluation from which every later one is at
        the target or better; an evaluation short of it after B bytes puts that point past B,
        so a trial already past the best trial's bytes to target cannot win any more.
        """
        bound = self.config.prune_above_bytes
        moved = results.cumulative_bytes(self.rows, self.mode)[-1]
        if bound and not self._meets(metrics) and moved >= bound:
            self.pruned = {"round": self.rows[-1]["round"], "bytes": moved, self._metric: metrics[self._metric]}
            raise RunPruned(self.name)

    def _stop_if_held(self) -> None:
        """Stop once the last ``stop-after-held`` evaluations all held the target.

        The sustained target of a run stopped here is reached at the first of them: the run
        ends at the target or better, as one that ran on and stayed there would count it.
        """
        needed = self.config.stop_after_held
        scored = [row for row in self.rows if row.get("accuracy") is not None]
        if needed and len(scored) >= needed and all(self._meets(row) for row in scored[-needed:]):
            self.held = {"round": self.rows[-1]["round"], "evaluations": needed}
            raise TargetHeld(self.name)

    def write(self, ledgers: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
        """Assemble design §6's results and write ``<out-dir>/<name>.json``."""
        final_round = max(self.evaluated)
        mode = extra.get("mode", self.mode)
        if self.pruned:
            extra["pruned"] = self.pruned
        if self.held:
            extra["stopped_held"] = self.held
        moved = results.cumulative_bytes(self.rows, mode)[-1] if self.rows else 0
        network = results.cumulative_network_time(self.rows)[-1] if self.rows else 0.0
        payload = {
            "strategy": self.config.strategy, "run_name": self.name, "task": self.config.task,
            "config": self.config.as_dict(),
            "versions": results.versions(), "rounds": self.rows,
            "provenance": extra.pop("provenance", {}), "memory": results.peak_ledger(ledgers),
            "memory_by_node": results.ledgers_by_node(ledgers),
            "failures": extra.pop("failures", []), "rejected_replies": extra.pop("rejected_replies", 0),
            "initial": self.evaluated[0],
            "final": {**self.evaluated[final_round], "round": final_round, "bytes_total": moved,
                      "network_time_s": network,
                      "wall_s": time.time() - self.started,
                      "model_bytes": results.model_bytes(self.arrays),
                      "model_sha256": results.model_sha256(self.arrays)},
            **extra,
        }
        path = results.write_json(Path(self.config.out_dir) / f"{self.name}.json", payload)
        log(INFO, "%s: final accuracy %.4f after %d rounds, %.2f MB moved; results in %s", self.name,
            payload["final"]["accuracy"], len(self.rows), moved / 1e6, path)
        return payload

    def _eval_due(self, server_round: int) -> bool:
        """Did this round's node visits pass a multiple of ``eval-every``?

        Counting visits, not rounds, evaluates every strategy as often per unit of
        work: a FedAvg round of 8 visits is evaluated even when ``eval-every`` is 2.
        """
        every, per_round = self.config.eval_every, self.visits_per_round
        return server_round * per_round // every > (server_round - 1) * per_round // every

    def _progress(self, row: dict[str, Any]) -> None:
        acc = "" if row["accuracy"] is None else f"acc {row['accuracy']:.4f}  "
        what = "+".join(row.get("window", [])) if len(row.get("nodes", [])) == 1 else \
            f"{len(row.get('nodes', []))} nodes"
        log(INFO, "[%s %d/%d] %s%s  %s  down %.1f kB up %.1f kB  %.0fs", self.name, row["round"],
            self.num_rounds, acc, what, row.get("status", ""), row["bytes_down"] / 1e3,
            row["bytes_up"] / 1e3, row["wall_s"])
