"""Issue 36's tables and plots: the LLM head to head against federated LoRA (docs/llm.md).

Usage::

    python experiments/llm_head_to_head.py COMPARE_DIR [--reference DIR] [--memory FILE ...] --out DIR

``COMPARE_DIR`` is a ``compare --seeds N`` folder (``summary.json`` and ``seed-<s>/<run>.json``),
``--reference`` the folder of a run made once (``fedavg``, outside the budget), ``--memory`` the
``snake-flower memory --measure --config ... --json FILE`` reports that give the node growth of
runs ``compare`` did not measure (a run without ``fit-budget-mb``). Writes ``DIR/table.md`` (also
printed), ``DIR/perplexity_vs_mb.png`` (median and range over seeds against cumulative MB) and
``DIR/perplexity_vs_node_growth.png`` (final perplexity against measured node growth, the budget
as a line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from snake_flower.harness.plots import plot_bands  # noqa: E402
from snake_flower.harness.saved_runs import saved_runs, seed_runs  # noqa: E402
from snake_flower.harness.seeds import aggregate  # noqa: E402

MB = 1e6
FIT_KEYS = ("node_growth_bytes", "fit_budget_bytes", "fits")
"""A summary line's ``fit-budget-mb`` verdict (``fit_budget.verdict``): one per run, not per seed."""


def load(folder: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """A comparison folder's ``summary.json`` and its runs, per run name a list over seeds."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"llm_head_to_head: {folder} holds no comparison's summary.json ({err})") from None
    by_seed = list(seed_runs(folder).values()) or [saved_runs(folder)]
    summary["runs"] = {name: as_spreads(line) for name, line in summary["runs"].items()}
    return summary, {name: [runs[name] for runs in by_seed if name in runs] for name in summary["runs"]}


def as_spreads(line: dict[str, Any]) -> dict[str, Any]:
    """A one-seed summary line (``compare`` without ``--seeds``) in the shape of a line over seeds
    (``seeds.aggregate`` over that one seed; the fit verdict stays one per run, as over seeds)."""
    if isinstance(line.get("final_perplexity"), dict):
        return line
    per_seed = {key: value for key, value in line.items() if key not in FIT_KEYS}
    return {**aggregate([per_seed]), **{key: line[key] for key in FIT_KEYS if key in line}}


def measured_growth(paths: list[str]) -> dict[str, int]:
    """Node growth (bytes) per arm of ``memory --measure`` reports (the later file wins)."""
    growth = {}
    for path in paths:
        try:
            arms = json.loads(Path(path).read_text())["arms"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"llm_head_to_head: {path} is no memory --measure report ({err})") from None
        growth.update({name: int(arm["grown_bytes"]) for name, arm in arms.items()})
    return growth


def _spread(figure: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``median [min–max]`` of a summary figure over seeds; ∞ for a seed that never got there."""
    if not figure or all(v is None for v in figure["seeds"]):
        return "never"

    def one(x: float | None) -> str:
        return "∞" if x is None else f"{x / scale:,.{digits}f}"

    if len(figure["seeds"]) == 1:
        return one(figure["median"])
    return f"{one(figure['median'])} [{one(figure['min'])}–{one(figure['max'])}]"


def table(lines: dict[str, dict[str, Any]], levels: list[float], growth: dict[str, int],
          budget: int | None) -> str:
    """The docs table: per run, the cost to the target and to each level, and what a node needs."""
    columns = ["run", "seeds at target", "MB to target", *[f"MB to ppl {lv:g}" for lv in levels],
               "visits to target", "network s to target", "final ppl", "node growth MB", "CPU s / visit",
               "GFLOP / visit"]
    rows = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for name, s in lines.items():
        grown = growth.get(name)
        fits = "" if grown is None or not budget else (" (fits)" if grown <= budget else " (over budget)")
        cells = [name, f"{s['reached_target']['count']}/{len(s['final_perplexity']['seeds'])}",
                 _spread(s["bytes_to_target"], MB),
                 *[_spread(level["bytes_to_level"], MB) for level in s.get("levels", [])],
                 _spread(s["visits_to_target"], 1, 0), _spread(s["network_time_to_target_s"]),
                 _spread(s["final_perplexity"], 1, 2), "–" if grown is None else f"{grown / MB:,.1f}{fits}",
                 _spread(s["cpu_s_per_visit"], 1, 2), _spread(s["flops_per_visit"], 1e9, 1)]
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def plot_growth(lines: dict[str, dict[str, Any]], growth: dict[str, int], budget: int | None,
                target: float | None, path: Path) -> Path:
    """Final perplexity (median, range over seeds) against each run's measured node growth."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, s in lines.items():
        if name not in growth:
            continue
        final = s["final_perplexity"]
        below, above = final["median"] - final["min"], final["max"] - final["median"]
        ax.errorbar([growth[name] / MB], [final["median"]], yerr=[[below], [above]], fmt="o", capsize=4,
                    label=name)
    if target:
        ax.axhline(target, color="grey", linestyle=":", label=f"target-perplexity {target:g}")
    if budget:
        ax.axvline(budget / MB, color="grey", linestyle="--", label=f"fit-budget-mb {budget / MB:g}")
    ax.set(xscale="log", xlabel="node growth on the ClientApp, MB (snake-flower memory --measure), log scale",
           ylabel="final validation perplexity", title="llm: final perplexity against node memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare", help="the compare --seeds folder")
    parser.add_argument("--reference", help="the folder of the run made once, outside the budget")
    parser.add_argument("--memory", nargs="*", default=[], help="memory --measure --json reports")
    parser.add_argument("--out", required=True, help="where the table and plots go")
    args = parser.parse_args(argv)
    summary, runs = load(Path(args.compare))
    lines = dict(summary["runs"])
    if args.reference:
        reference, reference_runs = load(Path(args.reference))
        lines.update(reference["runs"])
        runs.update(reference_runs)
    if any("final_perplexity" not in line for line in lines.values()):
        raise SystemExit("llm_head_to_head: these summaries count to no perplexity target")
    growth = {**measured_growth(args.memory),
              **{name: int(s["node_growth_bytes"]) for name, s in lines.items() if "node_growth_bytes" in s}}
    budgets = {int(s["fit_budget_bytes"]) for s in lines.values() if s.get("fit_budget_bytes")}
    budget = max(budgets) if budgets else None
    if len(budgets) > 1:
        print(f"llm_head_to_head: runs have different budgets ({sorted(budgets)}); the plot shows the largest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = summary.get("target", {}).get("levels", [])
    text = table(lines, levels, growth, budget)
    (out / "table.md").write_text(text)
    print(text, end="")
    plot_bands(runs, out / "perplexity_vs_mb.png", x="megabytes", metric="perplexity")
    plot_growth(lines, growth, budget, summary.get("target", {}).get("value"),
                out / "perplexity_vs_node_growth.png")
    print(f"llm_head_to_head: {out / 'table.md'}, {out / 'perplexity_vs_mb.png'}, "
          f"{out / 'perplexity_vs_node_growth.png'}")


if __name__ == "__main__":
    main()
