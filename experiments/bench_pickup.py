"""Split learning's visit time with Flower's 0.1 s message pickup and with ``snake_flower.runtime.flower_patches``.

Runs the same short split-learning simulation twice, in two fresh processes (Ray starts
once per process): once as ``snake-flower run`` does it (quicker pickup) and once with
Flower's own pickup loop. Each visit is ``--steps`` round trips. Prints each side's
median seconds per visit (the first visit, which pays for start-up, and the last, which
carries the final evaluation, are left out) and their ratio. Bytes and the final model
are the same both ways; the script checks the hash.

    python experiments/bench_pickup.py --visits 6 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import os, sys
from snake_flower import cli
from snake_flower.runtime.flower_patches import STOCK_ENV
if sys.argv[1] == "flower":
    os.environ[STOCK_ENV] = "1"  # keep Flower's own loop
sys.exit(cli.main(["run", "--run-config", sys.argv[2], "--out", sys.argv[3]]))
"""


def visit_times(mode: str, visits: int, steps: int, out: Path) -> tuple[list[float], str]:
    """Seconds per visit of one simulated split-learning run, and its model hash."""
    overrides = f"strategy=split num-server-rounds={visits} local-steps={steps} eval-every={visits}"
    subprocess.run([sys.executable, "-c", CHILD, mode, overrides, str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads((out / "split.json").read_text())
    walls = [row["wall_s"] for row in result["rounds"]]
    return [b - a for a, b in zip(walls, walls[1:])][:-1], result["final"]["model_sha256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if args.visits < 4:
        parser.error("--visits must be >= 4 (the first and last visits are left out)")
    with tempfile.TemporaryDirectory() as tmp:
        quick, quick_sha = visit_times("quick", args.visits, args.steps, Path(tmp) / "quick")
        flower, flower_sha = visit_times("flower", args.visits, args.steps, Path(tmp) / "flower")
    if quick_sha != flower_sha:
        sys.exit(f"the two runs ended with different models: {quick_sha[:12]} != {flower_sha[:12]}")
    q, f = statistics.median(quick), statistics.median(flower)
    print(f"split learning, {args.steps} round trips per visit, medians over {len(quick)} visits:")
    print(f"  quick pickup (snake-flower): {q:.2f} s per visit  {[round(t, 2) for t in quick]}")
    print(f"  Flower's 0.1 s pickup:       {f:.2f} s per visit  {[round(t, 2) for t in flower]}")
    print(f"  ratio quick / Flower: {q / f:.2f}; same final model ({quick_sha[:12]})")


if __name__ == "__main__":
    main()
