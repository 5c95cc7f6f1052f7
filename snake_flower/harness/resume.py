"""``compare`` resumes: a run whose results file is finished and holds its settings is not made again.

Run a comparison, stop it, run the same command again: only the missing runs are made.
A results file (``<out-dir>/<run name>.json``) is

- *finished* when it parses and has ``rounds`` and ``final`` (the recorder writes it whole,
  atomically, at a run's end); its run is skipped if its ``config`` is this run's;
- *unfinished* otherwise (what an interrupted run leaves, or a torn copy): the run is made again;
- a *conflict* when it is finished with other settings: nothing is run, nothing is overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from snake_flower.config import DEFAULTS, RunConfig
from snake_flower.simulation import results_path

FINISHED, UNFINISHED = "finished", "unfinished"

IGNORED = ("out-dir", "fit-budget-mb")
"""Keys that may differ between a stored run and this one: the folder may have been moved, and
``fit-budget-mb`` decides whether a run is made, not what it does."""

TARGETS = ("target-accuracy", "target-perplexity", "perplexity-levels")
"""Keys that may differ too while nothing stops a run on them (``stop-after-held`` and
``prune-above-bytes`` 0 in both): the report reads the rows against today's target. A run
that stopped on its target is another run under another one."""
STOPS = ("stop-after-held", "prune-above-bytes")

SHOWN = 5
"""Differences the conflict line names before it says how many more there are."""


class OtherSettings(Exception):
    """A finished results file of the same run name holds a run with other settings."""


def finished_run(path: Path) -> dict[str, Any] | None:
    """The results in ``path`` if they are a finished run's, else ``None``.

    A run all of whose rounds failed is not finished: ``load_results`` would refuse it, and
    skipping it would stop every later ``compare`` at the same place.
    """
    try:
        run = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(run, dict) and "final" in run and "rounds" in run):
        return None
    rows = run["rounds"]
    return run if not rows or any(row.get("status") == "merged" for row in rows) else None


def differences(stored: Mapping[str, Any], config: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, value now)`` for every key on which the two settings differ.

    Both sides go through JSON first, as the stored one did (a tuple is a list there, and
    ``1.0 == 1``), so only what a results file can tell apart differs. A key the stored run
    does not have (a file from before the key existed) differs only if it is now set away from
    its default: a new key's default keeps what runs did before it existed. A key stored but
    unknown now differs, its value now ``None``.
    """
    now = as_json(config.as_dict())
    before = as_json(dict(stored))
    keys = [*now, *(key for key in before if key not in now)]
    stops = any(side.get(key) for side in (before, now) for key in STOPS)
    ignored = IGNORED if stops else IGNORED + TARGETS
    return [(key, before.get(key), now.get(key)) for key in keys
            if key not in ignored and _differs(key, before, now)]


def _differs(key: str, before: dict[str, Any], now: dict[str, Any]) -> bool:
    if key not in before:
        return now[key] != as_json({key: DEFAULTS.get(key)})[key]
    return key not in now or before[key] != now[key]


def survey(configs: Iterable[RunConfig]) -> dict[Path, str]:
    """Each existing results file of ``configs``: ``FINISHED`` (same settings) or ``UNFINISHED``.

    Raises ``OtherSettings`` (its message one line) at the first finished file whose settings
    are not its run's, before any run starts: a comparison must not mix the two.
    """
    found: dict[Path, str] = {}
    for config in configs:
        path = results_path(config)
        if not path.exists():
            continue
        run = finished_run(path)
        if run is None:
            found[path] = UNFINISHED
            continue
        stored = run.get("config")
        changed = differences(stored if isinstance(stored, dict) else {}, config)
        if changed:
            raise OtherSettings(f"{path} holds a {config.name} run with other settings "
                                f"({_listed(changed)}); remove it or choose another --out")
        found[path] = FINISHED
    return found


def announce(config: RunConfig, state: str | None) -> None:
    """One line for a run whose results file is already there (none for a new run)."""
    path = results_path(config)
    if state == FINISHED:
        print(f"compare: {config.name} seed {config.seed}: finished run in {path}, skipped", flush=True)
    elif state == UNFINISHED:
        print(f"compare: {config.name} seed {config.seed}: {path} holds no finished run "
              f"(interrupted?), it is made again", flush=True)


def as_json(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as a results file stores them (tuples as lists, ``1.0 == 1``)."""
    return json.loads(json.dumps(values))


def _listed(changed: list[tuple[str, Any, Any]]) -> str:
    """``lr: 0.05 -> 0.02, window: 2 -> 1`` (values as JSON: strings quoted, ``null`` for missing)."""
    shown = [f"{key}: {json.dumps(before)} -> {json.dumps(now)}" for key, before, now in changed[:SHOWN]]
    more = len(changed) - SHOWN
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "")
