"""The simulation engine: one function runs a run's ServerApp and ClientApp in Flower's Ray engine.

``run_simulation`` is marked deprecated in flwr 1.41; it is called here and nowhere else, so
that replacing it is one change (and a Ray cluster's address goes in one place).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from snake_flower.config import RunConfig


def simulate(config: RunConfig, num_supernodes: int, parallel: int = 0, ray_address: str = "") -> None:
    """Run the ServerApp and ClientApp in Flower's Ray simulation engine.

    ``parallel`` ClientApps train at once (0: one per core, at most one per node).
    ``ray_address``: attach to that running Ray cluster (``ray start --head``) instead of
    starting a private one on this machine; the cluster's nodes bring their own cores.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Without an address ray.init joins the newest `ray start` cluster on the machine (its
    # address is in /tmp/ray/ray_current_cluster), which then refuses our num_cpus: start our own
    os.environ.setdefault("RAY_ADDRESS", "local")
    from flwr.simulation import run_simulation

    from snake_flower.client_app import app as client_app
    from snake_flower.runtime.flower_patches import patch_pickup, patch_ray_actors, patches_on
    from snake_flower.server_app import make_server_app

    if patches_on("pickup", "ray-actors"):  # else stock Flower, after one warning line (runtime/flower_patches.py)
        patch_pickup()  # split learning waits on every batch's round trip
        patch_ray_actors()  # a ClientApp actor that dies costs its hop, not every later one

    if ray_address:  # an attaching ray.init takes no resources: the cluster has them
        init_args: dict[str, Any] = {"address": ray_address, "logging_level": "ERROR"}
    else:
        init_args = {"num_cpus": parallel or max(1, min(os.cpu_count() or 1, num_supernodes)),
                     "num_gpus": 0, "logging_level": "ERROR"}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}
    run_simulation(server_app=make_server_app(config), client_app=client_app,
                   num_supernodes=num_supernodes, backend_config=backend)


def run_one(config: RunConfig, num_supernodes: int, parallel: int = 0,
            ray_address: str = "") -> dict[str, Any] | None:
    """Simulate one strategy; return its results (``None`` if none were written)."""
    results_path(config).unlink(missing_ok=True)  # never report a previous run's file as this one's
    simulate(config, num_supernodes, parallel, ray_address)
    return load_results(config)


def results_path(config: RunConfig) -> Path:
    """``<out-dir>/<run name>.json``."""
    return Path(config.out_dir) / f"{config.name}.json"


def load_results(config: RunConfig, code: int = 0) -> dict[str, Any] | None:
    """A finished run's results, with its one-line summary; ``None`` (and why) if it failed."""
    path, name = results_path(config), config.name
    if code != 0 or not path.exists():
        where = f"see {path.with_suffix('.log')}" if code != 0 else f"it wrote no {path}"
        print(f"snake-flower: error: the {name} run failed (exit {code}); {where}", file=sys.stderr)
        return None
    result = json.loads(path.read_text())
    rounds = result.get("rounds", [])
    if rounds and not any(row.get("status") == "merged" for row in rounds):  # nothing was learnt
        first = (result.get("failures") or [{"reason": "no reason recorded"}])[0]["reason"]
        print(f"snake-flower: error: the {name} run failed: all {len(rounds)} rounds failed "
              f"(first: {first}); see {path}", file=sys.stderr)
        return None
    final = result["final"]
    failed = len(result.get("failures", []))
    what = "visits" if result.get("strategy") == "fedavg" else "rounds"  # FedAvg: a node's failed visit
    print(f"{name}: accuracy {final['accuracy']:.4f}, {final['bytes_total'] / 1e6:.2f} MB moved, "
          f"{final['wall_s']:.0f} s{f', {failed} FAILED {what}' if failed else ''} -> {path}", flush=True)
    return result
