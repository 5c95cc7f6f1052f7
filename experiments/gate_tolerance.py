"""Print honest hops' gate-loss changes (and update norms) from gated runs, and the bounds they suggest.

``gate-tolerance`` is fixed once, before any attack is run, from clean gated runs: a gated run
whose tolerance rejects nothing (``gate-tolerance = 1e9``) scores every hop and merges every
one, so it trains exactly as the ungated run does while its rows record each hop's
``gate_loss_change`` and ``update_norm``. A high percentile of the changes is the tolerance: at
the 95th, about 5 % of honest hops would be rolled back (docs/reliability.md, "Fixing
gate-tolerance"); the same percentile of the norms is a ``max-update-norm`` fixed alike.

    python experiments/gate_tolerance.py results/byzantine-calibrate/snake-calibrate.json [more.json ...] \\
        --percentile 95

Hops of the partitions that attacked (``byzantine_partitions``) are left out, and so are hops
the gate did not score. Several files (seeds) are pooled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SHOWN = (50, 90, 95, 99)
FIGURES = {"gate_loss_change": "gate-tolerance", "update_norm": "max-update-norm"}


def honest(result: dict, field: str) -> list[float]:
    """``field`` of every scored hop of an honest partition in one run's results, in hop order."""
    attackers = set(result.get("byzantine_partitions", []))
    return [row[field] for row in result["rounds"]
            if field in row and not attackers.intersection(row.get("partitions", []))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results files (<run>.json) of gated runs")
    parser.add_argument("--percentile", type=float, default=95.0, help="the percentile to suggest (default 95)")
    parser.add_argument("--all", action="store_true", help="also print every honest hop's loss change")
    args = parser.parse_args(argv)
    runs = [json.loads(Path(path).read_text()) for path in args.results]
    for path, result in zip(args.results, runs):
        if not honest(result, "gate_loss_change"):
            print(f"gate_tolerance: {path} has no scored honest hop (was merge-gate = \"loss\"?)", file=sys.stderr)
            return 1
        if args.all:
            print(f"{path}: " + " ".join(f"{c:.4g}" for c in honest(result, "gate_loss_change")))
    for field, key in FIGURES.items():
        values = np.asarray([v for result in runs for v in honest(result, field)])
        print(f"{field}: {len(values)} honest hops from {len(runs)} run(s); min {values.min():.4g}, "
              f"max {values.max():.4g}, {np.mean(values > 0):.1%} above 0")
        for q in sorted({*SHOWN, args.percentile}):
            print(f"  {q:g}th percentile: {np.percentile(values, q):.4g}")
        suggested = float(np.percentile(values, args.percentile))
        if suggested <= 0:
            print(f"{key}: the {args.percentile:g}th percentile is not above 0; take a higher one", file=sys.stderr)
            return 1
        print(f"{key} = {suggested:.4g}   # the {args.percentile:g}th percentile of honest hops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
