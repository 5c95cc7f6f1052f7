"""Print the markdown table of the LLM runs (docs/llm.md).

Usage: ``python experiments/llm_table.py results/llm`` after the four runs wrote
``results/llm/<strategy>-<finetune>/<strategy>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = (("snake", "full"), ("fedavg", "full"), ("snake", "lora"), ("fedavg", "lora"))


def _row(result: dict, fedavg_full_peak: int | None) -> str:
    peak = result["memory"]["total_bytes"]
    ratio = f" ({peak / fedavg_full_peak:.2f}×)" if fedavg_full_peak else ""
    up = max(r["array_bytes_up"] / max(1, len(r["nodes"])) for r in result["rounds"])  # per node visit
    moved = result["final"]["bytes_total"]
    return (f"| {result['strategy']} {result['config']['finetune']} | {result['initial']['perplexity']:.2f} | "
            f"**{result['final']['perplexity']:.2f}** | {len(result['rounds'])} | {moved / 1e6:,.1f} | "
            f"{up / 1e6:,.2f} | {peak / 1e6:,.0f}{ratio} | {result['final']['wall_s']:.0f} |")


def main(root: str) -> None:
    results = {}
    for strategy, finetune in RUNS:
        path = Path(root) / f"{strategy}-{finetune}" / f"{strategy}.json"
        if path.exists():
            results[(strategy, finetune)] = json.loads(path.read_text())
    base = results.get(("fedavg", "full"))
    base_peak = base["memory"]["total_bytes"] if base else None
    print("| run | pretrained ppl | final ppl | rounds | MB moved | upload per node visit (MB, largest round) | "
          "node peak ledger (MB, × FedAvg full) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, result in results.items():
        print(_row(result, base_peak))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/llm")
