"""Tuning on equal terms: a grid of settings per strategy, scored on a validation slice.

Every strategy gets the same shared grid (e.g. local steps x learning rate) and the same
number of extra points for knobs of its own, each tried on top of the shared winner.
Every point runs the same number of node visits (``tune-visits``) with the validation
slice held out of the training data and evaluated instead of the test set. The winner
moves the fewest bytes to the sustained target on validation (within 0.1 %, a tie: fewer visits, then the
better validation quality: best accuracy or perplexity, final, fewer CPU seconds; grid order
only on an exact tie of all of these); when no point reaches it, the best validation quality wins. A point that is below the target
after more bytes than the best point's bytes to target can no longer win: it is pruned
there (``prune-above-bytes``), which changes no winner and saves most of a grid's CPU.
An interrupted tune reuses the points it finished.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

from snake_flower.config import ConfigError, RunConfig, parse_overrides, resolve
from snake_flower.harness.compare import summarize, whole_rounds
from snake_flower.harness.targets import Target, as_target


def parse_grid(text: str) -> list[dict[str, Any]]:
    """``"local-steps=100,300 lr=0.02,0.05"`` -> the cartesian product, as override dicts."""
    axes = []
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"grid: expected key=v1,v2,..., got {item!r}")
        axes.append([(key, parse_overrides(f"{key}={value}")[key]) for value in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)] if axes else [{}]


def parse_extras(text: str) -> list[dict[str, Any]]:
    """A strategy's own points, each tried on the grid's winner.

    ``"kd-weight=0.3,0.9"`` is two points, one per value; keys joined by ``+`` are one point
    that sets them together, e.g. ``"optimizer=adamw+lr=5e-5"`` (a recipe whose settings only
    make sense as a whole: AdamW at SGD's learning rate would diverge).
    """
    points = []
    for item in text.split():
        parts = re.split(r"\+(?=[a-z])", item)  # 1e+3 is a number, not a join
        if len(parts) > 1:
            if any("," in part for part in parts):
                raise ConfigError(f"extra: a joined point takes one value per key, got {item!r}")
            points.append({k: v for part in parts for k, v in parse_grid(part)[0].items()})
        else:
            points.extend({key: value} for point in parse_grid(item) for key, value in point.items())
    return points


def label(point: dict[str, Any]) -> str:
    """A file-name-safe name of a grid point, e.g. ``local-steps=100_lr=0.05``."""
    return "_".join(f"{k}={v}" for k, v in point.items()) or "defaults"


def score(line: dict[str, Any], run: dict[str, Any]) -> tuple[float, ...]:
    """Sort key of a point (its summary line and its run): lower is better.

    A point that holds the target wins over one that does not; among those that do, fewer
    bytes to the sustained target, then fewer visits. A tie there (common: evaluation is
    every few visits) breaks on validation quality: the best validation accuracy (a language
    model's lowest perplexity), then the final one, then fewer CPU seconds of training
    (measured, so it varies a little from run to run). A point that never reached the target
    is ranked by the same quality. Grid order decides only an exact tie of all of these.
    """
    best, final = _quality(run)
    cpu = sum(float(row.get("train_cpu_s", 0.0)) for row in run["rounds"])
    if line["reached_target"]:
        return (0.0, float(line["bytes_to_target"]), float(line["visits_to_target"]), -best, -final, cpu)
    return (1.0, 0.0, 0.0, -best, -final, cpu)


def _quality(run: dict[str, Any]) -> tuple[float, float]:
    """``(best, final)`` validation quality, higher is better: accuracy, or minus perplexity."""
    scored = [row for row in run["rounds"] if row.get("accuracy") is not None]
    if scored and all(row.get("perplexity") is not None for row in scored):
        return -min(row["perplexity"] for row in scored), -scored[-1]["perplexity"]
    best = max((row["accuracy"] for row in scored), default=0.0)
    final = run["final"].get("accuracy")
    return float(best), float(final if final is not None else 0.0)


# Bytes to target within this fraction of the fewest are a tie: the run-config strings a message
# carries (``lr-decay = "cosine"`` against ``"none"``) change a run's bytes by a few bytes a hop.
BYTES_TIE = 1e-3


def pick(trials: list[tuple[dict[str, Any], dict[str, Any]]], target: float | Target) -> int:
    """Index of the winning ``(point, run results)`` trial (``score``'s order).

    Points whose bytes to target are within ``BYTES_TIE`` of the fewest tie on bytes and go on
    to visits, then validation quality.
    """
    keys = [score(summarize(run, target), run) for _, run in trials]
    fewest = min((key[1] for key in keys if key[0] == 0.0), default=0.0)

    def tied(key: tuple[float, ...]) -> tuple[float, ...]:
        if key[0] == 0.0 and key[1] <= fewest * (1.0 + BYTES_TIE):
            return (key[0], fewest, *key[2:])
        return key

    return min(range(len(trials)), key=lambda i: tied(keys[i]))


def table(strategy: str, trials: list[tuple[dict[str, Any], dict[str, Any]]], target: float | Target,
          winner: int) -> str:
    """A Markdown table of every trial, the winner marked (accuracy or, for a perplexity target,
    perplexity columns)."""
    target = as_target(target)
    lines = [f"| {strategy}: setting | reached {target.label} on validation | MB to target | visits to target "
             f"| best val {target.short} | final val {target.short} |", "|---|---|---|---|---|---|"]
    for i, (point, run) in enumerate(trials):
        s = summarize(run, target)
        mb = "–" if s["bytes_to_target"] is None else f"{s['bytes_to_target'] / 1e6:.2f}"
        reached = "yes" if s["reached_target"] else "no"
        if run.get("pruned"):  # stopped early: it could no longer win
            reached = f"no (pruned at {run['pruned']['bytes'] / 1e6:.2f} MB)"
        lines.append(f"| {'**' if i == winner else ''}{label(point)}{'**' if i == winner else ''} "
                     f"| {reached} | {mb} | {s['visits_to_target'] or '–'} "
                     f"| {target.score(s['best_' + target.metric])} | {target.score(s['final_' + target.metric])} |")
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, name: str, settings: dict[str, Any]) -> None:
    """Set ``settings`` in table ``[name]`` of the experiment TOML at ``path``, keeping the rest.

    Keys already in the table are replaced in place; new ones are added at its end; a
    missing table is appended to the file.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    header = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")
    start = next((i for i, line in enumerate(lines) if (m := header.match(line)) and m.group(1).strip() == name),
                 None)
    if start is None:
        lines += ["", f"[{name}]"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])), len(lines))
    # blank lines and comments above the next header introduce that table, not this one
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    pending = dict(settings)
    for i in range(start + 1, end):
        key = lines[i].split("=", 1)[0].strip()
        if key in pending:
            lines[i] = f"{key} = {_toml(pending.pop(key))}"
    lines[end:end] = [f"{key} = {_toml(value)}" for key, value in pending.items()]
    path.write_text("\n".join(lines) + "\n")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"tune: cannot write {value!r} to TOML")
    return repr(value)


def _finished(config: RunConfig) -> dict[str, Any] | None:
    """The results a previous run of this configuration left in its folder, if complete.

    The same test as ``compare``'s resume (``resume.finished_run`` and ``resume.differences``:
    the folder may have moved, a key newer than the file counts only if set away from its
    default), except for the pruning bound, which each trial draws from those before it: a
    pruned run counts only if it was below the target past this trial's bound as well.
    """
    from snake_flower.harness import resume
    from snake_flower.simulation import results_path

    result = resume.finished_run(results_path(config))
    if result is None:
        return None
    stored = result.get("config")
    changed = [key for key, _, _ in resume.differences(stored if isinstance(stored, dict) else {}, config)
               if key != "prune-above-bytes"]
    bound, pruned = config.prune_above_bytes, result.get("pruned")
    usable = not pruned or (bound and pruned["bytes"] >= bound)
    return result if not changed and usable else None


def _bound(trials: list[tuple[dict[str, Any], dict[str, Any]]], target: float | Target) -> float:
    """The fewest bytes to the sustained target so far (0: no trial has reached it)."""
    reached = [line["bytes_to_target"] for line in (summarize(run, target) for _, run in trials)
               if line["reached_target"]]
    return float(min(reached)) if reached else 0.0


def run_tuning(args: Any, base: RunConfig) -> int:
    """``snake-flower tune``: every point of the grid, then the extra points on the winner.

    Writes ``<out>/tune-<run>.md`` and ``.json``; with ``--write`` the winner's settings
    go into the experiment file's table of this run.
    """
    from snake_flower.runtime import results
    from snake_flower.simulation import run_one

    name, target, out = base.name, Target.of(base), Path(base.out_dir)
    if base.validation_size == 0:
        raise ConfigError("validation-size: tune needs a slice held out of the training data (e.g. 5000), "
                          "the same that compare holds out")
    # every strategy is scored at the same node visits: multiples of a FedAvg round
    every = whole_rounds(base.eval_every, args.num_supernodes)
    trials: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def trial(point: dict[str, Any]) -> None:
        folder = out / name / label(point)
        # a trial below the target past the best one's bytes to target cannot win: it stops there
        config = resolve(base, point, {"evaluate-on": "validation", "num-server-rounds": base.tune_visits,
                                       "eval-every": every, "out-dir": str(folder), "resume": False,
                                       "prune-above-bytes": _bound(trials, target)})
        result = _finished(config)
        if result is not None:  # an interrupted tune keeps the points it already ran
            print(f"[tune {name} {len(trials) + 1}] {label(point)}: reusing the finished run in {folder}", flush=True)
        else:
            print(f"[tune {name} {len(trials) + 1}] {label(point)} -> {folder}", flush=True)
            result = run_one(config, args.num_supernodes, getattr(args, "parallel", 0), args.ray_address)
        if result is None:
            raise RuntimeError(f"tune: the {name} run at {label(point)} failed; see its log above")
        trials.append((point, result))

    shared = parse_grid(args.grid)
    for point in shared:
        trial(point)
    best = pick(trials, target)
    for extra in parse_extras(args.extra):  # each on the winner
        trial({**trials[best][0], **extra})
    winner = pick(trials, target)
    settings = trials[winner][0]
    (out / f"tune-{name}.md").write_text(table(name, trials, target, winner))
    results.write_json(out / f"tune-{name}.json", {
        "run": name, **target.header(), "visits": base.tune_visits, "winner": settings,
        "trials": [{"settings": p, **summarize(r, target), "pruned": r.get("pruned")} for p, r in trials]})
    print(f"tune {name}: winner {label(settings)} -> {out / f'tune-{name}.md'}")
    if args.write:
        write_table(args.config, name, settings)
        print(f"tune {name}: wrote [{name}] {label(settings)} into {args.config}")
    return 0
