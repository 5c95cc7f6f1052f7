"""Head to head: ``summary.json``, ``report.md`` and plots from the runs' JSON files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snake_flower.harness.fit_budget import add_to_summary, report_notes, report_rows
from snake_flower.harness.plots import plot_accuracy, plot_memory
from snake_flower.harness.targets import Target, as_target, at_row, level_figures, metric_figures, score_of
from snake_flower.runtime import results


def whole_rounds(visits: int, num_nodes: int) -> int:
    """The fewest node visits, at least ``visits``, that end a FedAvg round of ``num_nodes``:
    the visits at which every strategy can be evaluated alike."""
    return -(-visits // num_nodes) * num_nodes


def summarize(run: dict[str, Any], target: float | Target) -> dict[str, Any]:
    """One run's line of ``summary.json``: to-target figures follow the sustained definition.

    ``target``: a ``Target``, or a plain number for an accuracy target. A perplexity target
    adds ``final_perplexity`` and ``best_perplexity``, counts the to-target figures on the
    perplexity, and with levels adds ``levels`` (``targets.level_figures``).
    """
    target = as_target(target)
    rows = run["rounds"]
    cumulative = results.cumulative_bytes(rows, run.get("mode", "cs"))
    network = results.cumulative_network_time(rows)
    visits = results.cumulative_visits(rows)
    accuracies = [r["accuracy"] for r in rows]
    scores = [score_of(r, target.metric) for r in rows]
    reached, touched = target.reached(scores)
    raw = sum(r.get("raw_bytes_down", 0) + r.get("raw_bytes_up", 0) for r in rows)
    counted = sum(r["bytes_down"] + r["bytes_up"] for r in rows)
    node_visits = visits[-1] if visits else 0
    seed = run.get("config", {}).get("seed")
    return {**({"seed": seed} if seed is not None else {}),
            "final_accuracy": run["final"]["accuracy"],
            "best_accuracy": max((a for a in accuracies if a is not None), default=None),
            **metric_figures(run, target, scores),
            "reached_target": reached is not None,
            "bytes_total": run["final"]["bytes_total"],
            "bytes_to_target": at_row(cumulative, reached),
            "bytes_to_first_target": at_row(cumulative, touched),
            "mode": run.get("mode", "cs"),
            "network_time_s": network[-1] if network else 0.0,
            "network_time_to_target_s": at_row(network, reached),
            "visits_to_target": at_row(visits, reached),
            "visits_to_first_target": at_row(visits, touched),
            "round_to_target": rows[reached]["round"] if reached is not None else None,
            "node_peak_memory_bytes": run["memory"]["total_bytes"],
            # the paper's computation savings: local training per node visit
            "cpu_s_per_visit": sum(r.get("train_cpu_s", 0.0) for r in rows) / max(node_visits, 1),
            "flops_per_visit": sum(r.get("train_flops", 0.0) for r in rows) / max(node_visits, 1),
            "wall_s": run["final"]["wall_s"], "rounds": len(rows), "node_visits": node_visits,
            "failed_rounds": sum(1 for r in rows if r.get("status") == "failed"),
            # counted bytes / raw bytes of the tensors carried (framing, configs, metrics)
            "payload_efficiency": counted / raw if raw else None, **_gate_summary(rows),
            **_attack_summary(rows, run.get("byzantine_partitions") or []),
            **level_figures(target, scores, cumulative, visits, network)}


def _gate_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A gated run's rounds rolled back by the merge gate and its CPU seconds per scored hop."""
    scored = [r["gate_cpu_s"] for r in rows if "gate_cpu_s" in r]
    if not scored:
        return {}
    return {"gate_rejected_rounds": sum(1 for r in rows if r.get("status") == "rejected"),
            "gate_cpu_s_per_hop": sum(scored) / len(scored)}


def _attack_summary(rows: list[dict[str, Any]], attackers: list[int]) -> dict[str, Any]:
    """A run with attacking partitions: the rounds an attacker took part in, those whose merge
    took its reply in, and the rounds of honest partitions only that were not merged (rolled back
    by the gate or failed).

    A FedAvg round lists the partitions it aggregated (MultiKrum: the replies it kept). A hop
    that failed without a reply names no partition; its node's partition is taken from the
    run's other hops.
    """
    if not attackers:
        return {}
    partition_of = {r["nodes"][0]: r["partitions"][0] for r in rows
                    if len(r.get("nodes", [])) == 1 and len(r.get("partitions", [])) == 1}

    def partitions(row: dict[str, Any]) -> set[int]:
        return set(row.get("partitions") or [partition_of[n] for n in row.get("nodes", []) if n in partition_of])

    attacking = set(attackers)
    attacked = [bool(partitions(r) & attacking) for r in rows]
    return {"attacker_rounds": sum(attacked),
            "attacker_rounds_merged": sum(a and r.get("status") == "merged" for a, r in zip(attacked, rows)),
            "honest_rounds_not_merged": sum(not a and r.get("status") != "merged"
                                            for a, r in zip(attacked, rows))}


def write_comparison(out: str | Path, runs: dict[str, dict[str, Any]], target: float | Target,
                     side_by_side: bool = False, fit: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md`` and the PNG plots into ``out``.

    ``target``: a ``Target`` (``Target.of(config)``), or a plain number for an accuracy target.
    ``side_by_side``: the runs shared the machine (``compare --jobs``), so their wall
    times include waiting for the CPU. ``fit``: the runs' ``fit-budget-mb`` verdicts
    (``fit_budget.check``), those that do not fit shown as such.
    """
    out, target = Path(out), as_target(target)
    summary = add_to_summary({**target.header(), "side_by_side": side_by_side,
                              "runs": {name: summarize(run, target) for name, run in runs.items()}}, fit or {})
    results.write_json(out / "summary.json", summary)
    plot_accuracy(runs, out / "accuracy_vs_round.png", x="visits")
    plot_accuracy(runs, out / "accuracy_vs_mb.png", x="megabytes")
    plot_accuracy(runs, out / "accuracy_vs_network_time.png", x="network")
    plot_memory(runs, out / "memory_per_node.png")
    (out / "report.md").write_text(report(summary, runs))
    return summary


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}"


def level_columns(target: Target) -> list[str]:
    """The table columns of the cost curve, one per perplexity level: ``MB to ppl 9``."""
    return [f"MB to ppl {level:g}" for level in target.levels]


def report(summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the comparison, with plain statements of who reached the target.

    A perplexity target shows final and best perplexity instead of accuracy, and the MB to
    each perplexity level beside the MB to the target.
    """
    target = Target.of_summary(summary)
    metric, short = target.metric, target.short
    task = next(iter(runs.values()))["task"] if runs else ""
    columns = ["run", "mode", f"final {short}", f"best {short}", "reached target", "visits to target",
               "MB to target", "MB to first touch", *level_columns(target), "MB total", "network s to target",
               "network s total", "CPU s / visit", "GFLOP / visit", "node peak memory (MB)", "wall s"]
    lines = [f"# {task}: {', '.join(runs)}", "",
             f"Target {metric}: {target.value}. Bytes count every message's serialized content, both ways "
             "(Snake in P2P mode: each transfer once). Network s: the network-time model, compute time "
             "/ node speed + bytes / node link, summed along chains; a FedAvg round waits for its "
             "slowest node.", "",
             f"A target is reached where the {metric} gets to it **and stays at or {target.side} it at every "
             "later evaluation**; the first touch is shown beside it.", "",
             f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for name, s in summary["runs"].items():
        levels = "".join(f"{_mb(level['bytes_to_level'])} | " for level in s.get("levels", []))
        lines.append(f"| {name} | {s.get('mode', 'cs')} | {target.score(s[f'final_{metric}'])} | "
                     f"{target.score(s[f'best_{metric}'])} | "
                     f"{'yes' if s['reached_target'] else 'no'} | {s['visits_to_target'] or '–'} | "
                     f"{_mb(s['bytes_to_target'])} | {_mb(s.get('bytes_to_first_target'))} | {levels}"
                     f"{_mb(s['bytes_total'])} | "
                     f"{_seconds(s.get('network_time_to_target_s'))} | {_seconds(s.get('network_time_s'))} | "
                     f"{s.get('cpu_s_per_visit', 0.0):.2f} | {s.get('flops_per_visit', 0.0) / 1e9:.1f} | "
                     f"{s['node_peak_memory_bytes'] / 1e6:.2f} | {s['wall_s']:.0f} |")
    lines += [*report_rows(summary, len(columns)), ""]
    label = target.label
    for name, s in summary["runs"].items():
        if s["reached_target"]:
            lines.append(f"- {name} reached {label} for good at round {s['round_to_target']} "
                         f"({s['visits_to_target']} node visits, {_mb(s['bytes_to_target'])} MB).")
        elif s.get("bytes_to_first_target") is not None:
            lines.append(f"- {name} touched {label} ({_mb(s['bytes_to_first_target'])} MB) but did **not** "
                         f"stay there (final {target.score(s[f'final_{metric}'])}).")
        else:
            lines.append(f"- {name} did **not** reach {label} (best {target.score(s[f'best_{metric}'])}).")
        if s.get("failed_rounds"):
            lines.append(f"- **{name}: {s['failed_rounds']} of {s['rounds']} rounds failed** "
                         f"(reasons under `failures` in {name}.json); its figures are not those of a clean run.")
    lines += report_notes(summary)
    reached = {n: s["bytes_to_target"] for n, s in summary["runs"].items() if s["reached_target"]}
    if "snake" in reached and "fedavg" in reached:
        lines.append(f"- Snake / FedAvg bytes to the sustained target: {reached['snake'] / reached['fedavg']:.2f}.")
    if summary.get("side_by_side"):
        lines.append("- The runs were made side by side (`--jobs`), so each wall time includes waiting "
                     "for the CPU; compare wall times only between runs made one at a time.")
    lines += ["", f"![{metric} vs node visits](accuracy_vs_round.png)",
              f"![{metric} vs MB](accuracy_vs_mb.png)",
              f"![{metric} vs network time](accuracy_vs_network_time.png)",
              "![memory per node](memory_per_node.png)", ""]
    return "\n".join(lines)
