"""Issue 36's fixed levels from the fedavg-lora reference run (docs/llm.md, "Head to head").

Usage: ``python experiments/llm_reference.py RUN.json``. Prints the target perplexity, the
validation perplexity the run holds over the last quarter of its node visits (the highest
evaluation there), and the cost curve's levels, what it holds from 8, 16 and 32 visits on (the
highest evaluation from that visit to the end of the run: the level it has reached and stays at
or below), each rounded up to 0.5.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from snake_flower.runtime import results

LEVEL_VISITS = (8, 16, 32)


def up_to_half(x: float) -> float:
    """``x`` rounded up to a multiple of 0.5."""
    return math.ceil(x * 2) / 2


def held_from(curve: list[tuple[int, float]], visits: int) -> float:
    """The highest perplexity evaluated at or after ``visits``: what the run holds from there on."""
    later = [ppl for v, ppl in curve if v >= visits]
    if not later:
        raise SystemExit(f"llm_reference: no evaluation at or after {visits} visits")
    return max(later)


def main(path: str) -> None:
    try:
        run = json.loads(Path(path).read_text())
        rows = run["rounds"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"llm_reference: {path} is no run's results file ({err})") from None
    visits = results.cumulative_visits(rows)
    curve = [(v, r["perplexity"]) for v, r in zip(visits, rows) if r.get("perplexity") is not None]
    total = visits[-1]
    last_quarter = held_from(curve, total - total // 4)
    print(f"{run.get('run_name') or run['strategy']}: {total} visits, evaluated at "
          + ", ".join(f"{v}: {p:.3f}" for v, p in curve))
    print(f"held over the last quarter (from visit {total - total // 4}): {last_quarter:.3f} "
          f"-> target-perplexity = {up_to_half(last_quarter)}")
    levels = [up_to_half(held_from(curve, v)) for v in LEVEL_VISITS]
    print("held from visits " + ", ".join(map(str, LEVEL_VISITS)) + ": "
          + ", ".join(f"{held_from(curve, v):.3f}" for v in LEVEL_VISITS)
          + f" -> perplexity-levels = \"{','.join(str(x) for x in levels)}\"")


if __name__ == "__main__":
    main(sys.argv[1])
