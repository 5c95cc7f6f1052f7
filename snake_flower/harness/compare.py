"""Head to head: ``summary.json``, ``report.md`` and plots from the runs' JSON files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snake_flower.harness.plots import plot_accuracy, plot_memory
from snake_flower.runtime import results


def whole_rounds(visits: int, num_nodes: int) -> int:
    """The fewest node visits, at least ``visits``, that end a FedAvg round of ``num_nodes``:
    the visits at which every strategy can be evaluated alike."""
    return -(-visits // num_nodes) * num_nodes


def first_touch(scores: list[float | None], target: float) -> int | None:
    """The first row whose evaluation reaches ``target`` (``None`` if none does)."""
    return next((i for i, a in enumerate(scores) if a is not None and a >= target), None)


def sustained(scores: list[float | None], target: float) -> int | None:
    """The row from which every evaluation, to the run's last, is at or above ``target``.

    A curve that touches the target and dips again has reached it only where it stays;
    a run whose last evaluation is below the target has not reached it at all.
    """
    evaluated = [(i, a) for i, a in enumerate(scores) if a is not None]
    reached = None
    for i, accuracy in reversed(evaluated):
        if accuracy < target:
            break
        reached = i
    return reached


def summarize(run: dict[str, Any], target: float) -> dict[str, Any]:
    """One run's line of ``summary.json``: to-target figures follow the sustained definition."""
    rows = run["rounds"]
    cumulative = results.cumulative_bytes(rows, run.get("mode", "cs"))
    network = results.cumulative_network_time(rows)
    visits = results.cumulative_visits(rows)
    scores = [r["accuracy"] for r in rows]
    reached, touched = sustained(scores, target), first_touch(scores, target)
    raw = sum(r.get("raw_bytes_down", 0) + r.get("raw_bytes_up", 0) for r in rows)
    counted = sum(r["bytes_down"] + r["bytes_up"] for r in rows)
    node_visits = visits[-1] if visits else 0
    seed = run.get("config", {}).get("seed")
    return {**({"seed": seed} if seed is not None else {}),
            "final_accuracy": run["final"]["accuracy"],
            "best_accuracy": max((a for a in scores if a is not None), default=None),
            "reached_target": reached is not None,
            "bytes_total": run["final"]["bytes_total"],
            "bytes_to_target": cumulative[reached] if reached is not None else None,
            "bytes_to_first_target": cumulative[touched] if touched is not None else None,
            "mode": run.get("mode", "cs"),
            "network_time_s": network[-1] if network else 0.0,
            "network_time_to_target_s": network[reached] if reached is not None else None,
            "visits_to_target": visits[reached] if reached is not None else None,
            "visits_to_first_target": visits[touched] if touched is not None else None,
            "round_to_target": rows[reached]["round"] if reached is not None else None,
            "node_peak_memory_bytes": run["memory"]["total_bytes"],
            # the paper's computation savings: local training per node visit
            "cpu_s_per_visit": sum(r.get("train_cpu_s", 0.0) for r in rows) / max(node_visits, 1),
            "flops_per_visit": sum(r.get("train_flops", 0.0) for r in rows) / max(node_visits, 1),
            "wall_s": run["final"]["wall_s"], "rounds": len(rows), "node_visits": node_visits,
            "failed_rounds": sum(1 for r in rows if r.get("status") == "failed"),
            # counted bytes / raw bytes of the tensors carried (framing, configs, metrics)
            "payload_efficiency": counted / raw if raw else None, **_gate_summary(rows),
            **_attack_summary(rows, run.get("byzantine_partitions") or [])}


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


def write_comparison(out: str | Path, runs: dict[str, dict[str, Any]], target: float,
                     side_by_side: bool = False) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md`` and the PNG plots into ``out``.

    ``side_by_side``: the runs shared the machine (``compare --jobs``), so their wall
    times include waiting for the CPU.
    """
    out = Path(out)
    summary = {"target_accuracy": target, "side_by_side": side_by_side,
               "runs": {name: summarize(run, target) for name, run in runs.items()}}
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


def report(summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the comparison, with plain statements of who reached the target."""
    target = summary["target_accuracy"]
    task = next(iter(runs.values()))["task"] if runs else ""
    lines = [f"# {task}: {', '.join(runs)}", "",
             f"Target accuracy: {target}. Bytes count every message's serialized content, both ways "
             "(Snake in P2P mode: each transfer once). Network s: the network-time model, compute time "
             "/ node speed + bytes / node link, summed along chains; a FedAvg round waits for its "
             "slowest node.", "",
             "A target is reached where the accuracy gets to it **and stays at or above it at every later "
             "evaluation**; the first touch is shown beside it.", "",
             "| run | mode | final acc | best acc | reached target | visits to target | MB to target "
             "| MB to first touch | MB total | network s to target | network s total | CPU s / visit "
             "| GFLOP / visit | node peak memory (MB) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["runs"].items():
        lines.append(f"| {name} | {s.get('mode', 'cs')} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
                     f"{'yes' if s['reached_target'] else 'no'} | {s['visits_to_target'] or '–'} | "
                     f"{_mb(s['bytes_to_target'])} | {_mb(s.get('bytes_to_first_target'))} | "
                     f"{_mb(s['bytes_total'])} | "
                     f"{_seconds(s.get('network_time_to_target_s'))} | {_seconds(s.get('network_time_s'))} | "
                     f"{s.get('cpu_s_per_visit', 0.0):.2f} | {s.get('flops_per_visit', 0.0) / 1e9:.1f} | "
                     f"{s['node_peak_memory_bytes'] / 1e6:.2f} | {s['wall_s']:.0f} |")
    lines.append("")
    for name, s in summary["runs"].items():
        if s["reached_target"]:
            lines.append(f"- {name} reached {target} for good at round {s['round_to_target']} "
                         f"({s['visits_to_target']} node visits, {_mb(s['bytes_to_target'])} MB).")
        elif s.get("bytes_to_first_target") is not None:
            lines.append(f"- {name} touched {target} ({_mb(s['bytes_to_first_target'])} MB) but did **not** "
                         f"stay there (final {s['final_accuracy']:.4f}).")
        else:
            lines.append(f"- {name} did **not** reach {target} (best {s['best_accuracy']:.4f}).")
        if s.get("failed_rounds"):
            lines.append(f"- **{name}: {s['failed_rounds']} of {s['rounds']} rounds failed** "
                         f"(reasons under `failures` in {name}.json); its figures are not those of a clean run.")
    reached = {n: s["bytes_to_target"] for n, s in summary["runs"].items() if s["reached_target"]}
    if "snake" in reached and "fedavg" in reached:
        lines.append(f"- Snake / FedAvg bytes to the sustained target: {reached['snake'] / reached['fedavg']:.2f}.")
    if summary.get("side_by_side"):
        lines.append("- The runs were made side by side (`--jobs`), so each wall time includes waiting "
                     "for the CPU; compare wall times only between runs made one at a time.")
    lines += ["", "![accuracy vs node visits](accuracy_vs_round.png)",
              "![accuracy vs MB](accuracy_vs_mb.png)",
              "![accuracy vs network time](accuracy_vs_network_time.png)",
              "![memory per node](memory_per_node.png)", ""]
    return "\n".join(lines)
