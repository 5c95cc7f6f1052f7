"""Checkpoints: the server's whole state after every hop, written atomically.

A checkpoint holds the full model, the strategy's state (schedule position,
segment versions, provenance, failures, node backoff), the recorder's rows and
meters, and the random state. ``resume = true`` continues from it with the same
result as a run that was never stopped; a run killed while writing leaves the
previous checkpoint whole, because the new one replaces it only once complete.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from snake_flower.config import DEFAULTS, ConfigError, RunConfig

# Keys that may change between a run and its resumption: none alters the training.
FREE_ON_RESUME = ("resume", "out-dir", "hop-timeout", "fast-poll", "num-server-rounds", "min-nodes")


def checkpoint_path(config: RunConfig) -> Path:
    """``<out-dir>/<run name>.ckpt`` (the run name: ``run-name``, else the strategy)."""
    return Path(config.out_dir) / f"{config.name}.ckpt"


def save_checkpoint(path: Path, arrays: ArrayRecord, state: Mapping[str, Any],
                    averaged: ArrayRecord | None = None,
                    in_flight: Mapping[str, ArrayRecord] | None = None) -> None:
    """Write ``arrays``, the JSON-able ``state``, the moving average and the arrays of hops in
    flight (``SnakeStrategy.in_flight_arrays``), if any, to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arrays": arrays.to_torch_state_dict(), "torch-rng": torch.get_rng_state(),
               "averaged": averaged.to_torch_state_dict() if averaged is not None else {},
               "in-flight": {hop: record.to_torch_state_dict() for hop, record in (in_flight or {}).items()},
               "state": json.dumps({**state, "python-rng": random.getstate()})}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: RunConfig) -> tuple[ArrayRecord, dict[str, Any]]:
    """The model and state saved at ``path``, after checking they belong to ``config``'s run.

    Restores the random state. Raises ``ConfigError`` (one line) for an unreadable
    file or a run-config that differs in a key that alters the training.
    """
    try:
        payload = torch.load(path, weights_only=True)
        state = json.loads(payload["state"])
    except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({type(err).__name__})") from None
    # a key the checkpoint lacks came after it was written: that run had the key's default
    saved, wanted = {**DEFAULTS, **state["config"]}, config.as_dict()
    changed = sorted(k for k in wanted if k not in FREE_ON_RESUME and saved.get(k) != wanted[k])
    if changed:
        key = changed[0]
        raise ConfigError(f"resume: {path} was written with {key}={saved.get(key)!r}, this run has "
                          f"{key}={wanted[key]!r} ({len(changed)} key(s) differ)")
    done = state["strategy"]["rounds-done"]
    if config.num_server_rounds < done:
        raise ConfigError(f"num-server-rounds: {config.num_server_rounds} is fewer than the "
                          f"{done} rounds the checkpoint {path} has done")
    torch.set_rng_state(payload["torch-rng"])
    version, internal, gauss = state.pop("python-rng")
    random.setstate((version, tuple(internal), gauss))
    state["averaged"] = ArrayRecord(payload["averaged"]) if payload.get("averaged") else None
    state["in-flight"] = {hop: ArrayRecord(arrays) for hop, arrays in payload.get("in-flight", {}).items()}
    return ArrayRecord(payload["arrays"]), state
