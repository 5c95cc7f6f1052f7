"""What the merge gate costs a hop: gated and ungated runs of the default task, side by side.

Each repeat runs ``snake-flower run`` twice on the default task (Fashion-MNIST CNN, 8 nodes,
100 local steps, Snake), once ungated and once with ``merge-gate = "loss"`` and a tolerance that
rejects nothing, so both make the same hops; both hold out the same ``validation-size`` slice
and evaluate only at the end. The order alternates between repeats. A hop's wall time is the
time between two rows (``wall_s``), the first and last rows left out (start-up, evaluation);
it includes the gate's scoring and the update norm the gate records beside it.
Prints and stores per run the median hop, the gated run's median ``gate_s`` and ``gate_cpu_s``,
and over the repeats the gate's share of a gated hop (median ``gate_s`` ÷ median hop) and the
gated median hop ÷ the ungated one.

    python experiments/bench_gate.py --hops 64 --repeats 2 --json experiments/results/bench-gate-2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from snake_flower.runtime.results import cpu

GATED = "merge-gate='loss' gate-tolerance=1e9"


def one_run(hops: int, gated: bool, validation_size: int, extra: str) -> dict[str, Any]:
    """One ``snake-flower run``: its median hop and, gated, the gate's median seconds."""
    overrides = (f"num-server-rounds={hops + 2} eval-every={hops + 2} validation-size={validation_size} "
                 f"{GATED if gated else ''} {extra}")
    with tempfile.TemporaryDirectory() as out:
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-m", "snake_flower.cli", "run", "--run-config", overrides.strip(),
                               "--out", out], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bench_gate: the run failed ({done.returncode}):\n{done.stderr[-2000:]}")
        result = json.loads((Path(out) / "snake.json").read_text())
    rows = result["rounds"]
    if any(r["status"] != "merged" for r in rows):
        raise SystemExit("bench_gate: a hop was not merged; the two arms would not make the same hops")
    # hop i's wall time: from the row before it to its own; the first row (start-up) and the last
    # (the evaluation) are left out
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip(rows[:-1], rows[1:-1])]
    run = {"gated": gated, "hops": len(walls), "median_hop_s": statistics.median(walls),
           "median_train_s": statistics.median(r["train_s"] for r in rows[1:-1]),
           "model_sha256": result["final"]["model_sha256"], "load_before": load, "load_after": os.getloadavg()[0]}
    if gated:
        run["median_gate_s"] = statistics.median(r["gate_s"] for r in rows[1:-1])
        run["median_gate_cpu_s"] = statistics.median(r["gate_cpu_s"] for r in rows[1:-1])
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=64, help="measured hops per run (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="gated and ungated pairs (default 2)")
    parser.add_argument("--validation-size", type=int, default=5000, help="held out in both arms (default 5000)")
    parser.add_argument("--run-config", default="", help="more overrides for both arms")
    parser.add_argument("--json", help="write every run and the ratios here")
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    started = time.time()
    for repeat in range(args.repeats):
        for gated in ((False, True) if repeat % 2 == 0 else (True, False)):
            run = one_run(args.hops, gated, args.validation_size, args.run_config)
            runs.append(run)
            gate = f", gate {run['median_gate_s']:.3f} s" if gated else ""
            print(f"repeat {repeat + 1} {'gated' if gated else 'ungated'}: median hop {run['median_hop_s']:.3f} s"
                  f"{gate} (load {run['load_before']:.2f} -> {run['load_after']:.2f})", flush=True)
    gated = [r for r in runs if r["gated"]]
    plain = [r for r in runs if not r["gated"]]
    share = statistics.median(r["median_gate_s"] / r["median_hop_s"] for r in gated)
    ratio = statistics.median(r["median_hop_s"] for r in gated) / statistics.median(r["median_hop_s"] for r in plain)
    same = len({r["model_sha256"] for r in runs}) == 1
    print(f"gate share of a gated hop: {share:.3f}; gated hop / ungated hop: {ratio:.3f}; "
          f"same model in every run: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d", time.gmtime(started)), "cpu": cpu(),
             "hops": args.hops, "repeats": args.repeats, "runs": runs, "gate_share": share,
             "gated_over_ungated": ratio, "same_model": same}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
