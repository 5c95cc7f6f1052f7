"""The edge of the run-config: ``--run-config`` text and experiment TOML files, as plain layers.

What these return is not validated yet: ``resolve`` fuses the layers into a ``RunConfig``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snake_flower.config.run_config import ConfigError
from snake_flower.config.validation import CHOICES

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
