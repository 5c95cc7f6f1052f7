"""What a comparison counts "to target": test accuracy, higher is better, or, for task llm with
``target-perplexity > 0``, the held-out perplexity, lower is better; and the perplexity levels
of the cost curve (``perplexity-levels``).

A target is reached at the evaluation from which every later one, to the run's last, is at
the target or better (``sustained``); ``first_touch`` is the first evaluation there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from snake_flower.config import perplexity_levels
from snake_flower.runtime.results import meets_target

# a level's figures in a summary line; a level never reached has None (over seeds: +inf)
LEVEL_FIGURES = ("bytes_to_level", "visits_to_level", "network_time_to_level_s")


def score_of(row: Mapping[str, Any], metric: str) -> float | None:
    """A row's (or ``final``'s) ``metric``, ``None`` where it was not evaluated.

    LLM rows written before they carried their perplexity have only their loss: perplexity
    is exp(loss).
    """
    if metric == "perplexity" and row.get("perplexity") is None and row.get("loss") is not None:
        return math.exp(row["loss"])
    return row.get(metric)


def first_touch(scores: Sequence[float | None], target: float, lower_is_better: bool = False) -> int | None:
    """The first row whose evaluation reaches ``target`` (``None`` if none does); see ``sustained``."""
    return next((i for i, s in enumerate(scores) if s is not None and meets_target(s, target, lower_is_better)), None)


def sustained(scores: Sequence[float | None], target: float, lower_is_better: bool = False) -> int | None:
    """The row from which every evaluation, to the run's last, is at or above ``target``
    (at or below it with ``lower_is_better``: a perplexity).

    A curve that touches the target and falls back has reached it only where it stays;
    a run whose last evaluation misses the target has not reached it at all.

    Parameters
    ----------
    scores : sequence of float or None
        One per row of the run; ``None`` where the row was not evaluated (skipped).
    target : float
        The accuracy (or perplexity) to reach.
    lower_is_better : bool
        ``False`` for an accuracy, ``True`` for a perplexity.

    Returns
    -------
    int or None
        The row's index, ``None`` if the run never reached the target for good.
    """
    evaluated = [(i, s) for i, s in enumerate(scores) if s is not None]
    reached = None
    for i, score in reversed(evaluated):
        if not meets_target(score, target, lower_is_better):
            break
        reached = i
    return reached


def at_row(series: Sequence[Any], row: int | None) -> Any:
    """``series[row]``, or ``None`` for a target never reached."""
    return None if row is None else series[row]


@dataclass(frozen=True)
class Target:
    """What "to target" counts to, with the accuracy target kept whatever the metric.

    ``perplexity > 0`` makes the held-out perplexity the metric (``accuracy`` is then only
    written back as ``target_accuracy``, for readers of older summaries); ``levels`` are
    the perplexities of the cost curve.
    """

    accuracy: float
    perplexity: float = 0.0
    levels: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.levels and not self.lower_is_better:  # a summary names its levels with a perplexity target only
            raise ValueError(f"perplexity levels {self.levels} need a perplexity target")

    @classmethod
    def of(cls, config: Mapping[str, Any], accuracy: float | None = None,
           perplexity: float | None = None) -> Target:
        """The target of a run.

        Parameters
        ----------
        config : Mapping
            A ``RunConfig`` or a results file's ``config`` (kebab-case keys).
        accuracy, perplexity : float, optional
            Replace the run's ``target-accuracy`` / ``target-perplexity`` (``report --target-*``);
            a perplexity of 0 counts to the accuracy target.

        Returns
        -------
        Target
            With the run's ``perplexity-levels`` when the target is a perplexity.
        """
        # results files written before perplexity targets have neither key
        perplexity = config.get("target-perplexity", 0.0) if perplexity is None else perplexity
        return cls(accuracy=config["target-accuracy"] if accuracy is None else accuracy, perplexity=perplexity,
                   levels=perplexity_levels(config) if perplexity > 0 else ())  # levels: a perplexity's curve

    @classmethod
    def of_summary(cls, summary: Mapping[str, Any]) -> Target:
        """The target a ``summary.json`` was made for (no ``target`` key: accuracy)."""
        named = summary.get("target") or {}
        if named.get("metric") != "perplexity":
            return cls(summary["target_accuracy"])
        return cls(summary["target_accuracy"], named["value"], tuple(named.get("levels", ())))

    @property
    def metric(self) -> str:
        """``"perplexity"`` or ``"accuracy"``: the summary's ``final_<metric>``, ``best_<metric>``."""
        return "perplexity" if self.lower_is_better else "accuracy"

    @property
    def value(self) -> float:
        """The figure to reach, of ``metric``."""
        return self.perplexity if self.lower_is_better else self.accuracy

    @property
    def lower_is_better(self) -> bool:
        """A perplexity target: reached at or below it."""
        return self.perplexity > 0

    @property
    def label(self) -> str:
        """How reports name the target: ``0.85`` (an accuracy, as ever) or ``perplexity 7.5``."""
        return f"perplexity {self.value}" if self.lower_is_better else f"{self.value}"

    @property
    def short(self) -> str:
        """The metric in a table's header: ``acc`` or ``ppl``."""
        return "ppl" if self.lower_is_better else "acc"

    @property
    def side(self) -> str:
        """Where a reached target's later evaluations stay: at or ``above`` / ``below`` it."""
        return "below" if self.lower_is_better else "above"

    @property
    def digits(self) -> int:
        """Decimals a table prints the metric with."""
        return 2 if self.lower_is_better else 4

    def score(self, value: float | None) -> str:
        """A figure of the metric as tables print it (``–`` where there is none)."""
        return "–" if value is None else f"{value:.{self.digits}f}"

    def header(self) -> dict[str, Any]:
        """``summary.json``'s keys naming the target: ``target_accuracy`` as ever, and for a
        perplexity ``target: {"metric", "value", "levels"}``. An accuracy summary is as it was
        before perplexity targets (no ``target`` key)."""
        if not self.lower_is_better:
            return {"target_accuracy": self.accuracy}
        return {"target_accuracy": self.accuracy,
                "target": {"metric": "perplexity", "value": self.perplexity, "levels": list(self.levels)}}

    def reached(self, scores: Sequence[float | None]) -> tuple[int | None, int | None]:
        """The rows of the sustained target and of its first touch in ``scores``."""
        return (sustained(scores, self.value, self.lower_is_better),
                first_touch(scores, self.value, self.lower_is_better))


def as_target(target: float | Target) -> Target:
    """A plain number is an accuracy target (tuning, and callers from before perplexity)."""
    return target if isinstance(target, Target) else Target(target)


def metric_figures(run: Mapping[str, Any], target: Target, scores: Sequence[float | None]) -> dict[str, Any]:
    """A perplexity run's ``final_perplexity`` and ``best_perplexity`` (the lowest evaluated);
    nothing for accuracy, whose figures every summary line carries."""
    if not target.lower_is_better:
        return {}
    return {"final_perplexity": score_of(run["final"], "perplexity"),
            "best_perplexity": min((s for s in scores if s is not None), default=None)}


def level_figures(target: Target, scores: Sequence[float | None], cumulative: Sequence[int],
                  visits: Sequence[int], network: Sequence[float]) -> dict[str, Any]:
    """``levels``: per level of the cost curve, the bytes, visits and network seconds to where the
    perplexity gets down to it for good (``sustained``), ``None`` if never; nothing without levels."""
    if not target.levels:
        return {}
    rows = [sustained(scores, level, lower_is_better=True) for level in target.levels]
    return {"levels": [{"level": level, "bytes_to_level": at_row(cumulative, row),
                        "visits_to_level": at_row(visits, row), "network_time_to_level_s": at_row(network, row)}
                       for level, row in zip(target.levels, rows)]}
