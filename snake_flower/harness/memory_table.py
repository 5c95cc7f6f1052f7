"""``snake-flower memory`` for people: the analytic ledgers as a short table."""

from __future__ import annotations

from typing import Any

from snake_flower.training.memory import GIB

_COLUMNS = (("trainable", "trainable_param_bytes", 10), ("frozen", "frozen_param_bytes", 8),
            ("grads", "grad_bytes", 8), ("optimizer", "optimizer_bytes", 10),
            ("activ.", "activation_bytes", 8), ("total", "total_bytes", 8))


def format_table(report: dict[str, Any]) -> str:
    """The report of ``memory.analyze`` as a table, in GiB (MiB for models under 1 GiB)."""
    opts = report["options"]
    lora = opts["finetune"] == "lora"
    mode = f"LoRA r={opts['lora_rank']} on {'+'.join(opts['lora_targets'])}" if lora else "full fine-tune"
    unit, scale = ("GiB", GIB) if report["fedavg"]["total_bytes"] >= GIB else ("MiB", 2**20)
    source = f"{report['source']}, " if report["source"] != report["model"] else ""
    acts = report.get("activations")
    counted = f"activations of {acts['batch']} x {acts['seq']} tokens in fp32 (Snake's window at " \
              f"the bottom)" if acts else "activations not counted"
    lines = [f"{report['model']} ({source}{report['architecture']}): "
             f"{report['params']:,} parameters{' with the adapters' if lora else ''}, "
             f"{report['decoder_layers']} decoder layers of {report['layer_params']:,}",
             f"per node, {unit}; {mode}; Snake trains {opts['window']} decoder layer(s); frozen "
             f"{opts['frozen_dtype']}; {counted}",
             f"{'':24}" + "".join(f"{title:>{width}}" for title, _, width in _COLUMNS)]

    def row(label: str, memory: dict[str, int]) -> str:
        return f"{label:24}" + "".join(f"{memory[key] / scale:>{width}.2f}" for _, key, width in _COLUMNS)

    lines += [row(f"{s} (exact)", report[s]) for s in ("fedavg", "snake")]
    nominal = report.get("nominal")
    if nominal:
        count = f"{nominal['params']:.3g}".replace("e+0", "e").replace("e+", "e")
        lines += [row(f"{s} ({count} nominal)", nominal[s]) for s in ("fedavg", "snake")]
        paper = report.get("paper_gb")
        if paper:
            lines.append(f"the paper reports {paper['fedavg']} GB (FL) and {paper['snake']} GB (Snake), "
                         "activations excluded")
    return "\n".join(lines)


def format_measured(report: dict[str, Any]) -> str:
    """The report of ``harness.measure.measure`` (or ``measure_runs.measure_runs``) as a short table, in MiB."""
    mib = 2**20
    lines = [*_measured_header(report),
             f"{'':13}{'hop':>10}{'baseline':>10}{'peak':>8}{'grown':>8}{'ledger':>8}{'message':>9}"
             f"{'x ledger':>10}   (MiB)"]
    for arm, got in report["arms"].items():
        for hop, fig in got["hops"].items():
            lines.append(f"{arm:13}{hop:>10}{fig['baseline_rss_bytes'] / mib:>10.0f}{fig['peak_rss_bytes'] / mib:>8.0f}"
                         f"{fig['grown_bytes'] / mib:>8.0f}{fig['ledger_bytes'] / mib:>8.0f}"
                         f"{fig['message_bytes'] / mib:>9.0f}{fig['grown_over_ledger']:>10.2f}")
    for mode in ("full", "lora"):
        ratio = report["ratios"].get(f"snake_over_fedavg_{mode}")
        if ratio:
            lines.append(f"snake-{mode} / fedavg-{mode}: " + "; ".join(
                f"{hop} grown {r['grown']:.2f}, total peak RSS {r['peak_rss']:.2f}, ledger {r['ledger']:.2f}"
                for hop, r in ratio.items()))
    targets, met = report["ratios"]["targets"], report["ratios"]["met"]
    if "delta_growth" in met:
        lines.append(f"targets: snake-full / fedavg-full grown <= {targets['delta']} on the delta hop "
                     f"({'met' if met['delta_growth'] else 'MISSED'}), <= {targets['full-sync']} on the full-sync hop "
                     f"({'met' if met['full-sync_growth'] else 'MISSED'})")
    lines.append(f"every hop's growth within {targets['ledger']:.0%} of its ledger: "
                 f"{'met' if met['growth_within_ledger'] else 'MISSED'}")
    return "\n".join(lines)


def _measured_header(report: dict[str, Any]) -> list[str]:
    """What was measured: the options shared by the arms, or each run's own settings (``--config``)."""
    how = "grown = peak - baseline; ledger = the node's + the received message"
    if "options" in report:
        opts = report["options"]
        return [f"{report['model']}: the ClientApp on two hops per arm ({opts['steps']} {opts['optimizer']} steps on "
                f"{opts['batch']} x {opts['seq']} tokens; a chain of {report['nodes']} nodes), each arm in a fresh "
                f"process; {how}"]
    lines = [f"the ClientApp on two hops per run, each with its own run-config (a chain of {report['nodes']} nodes), "
             f"each hop in a fresh process; {how}"]
    for name, arm in report["arms"].items():
        c = arm["run_config"]
        mode = f"lora r{c['lora-rank']} dropout {c['lora-dropout']:g}" if c["finetune"] == "lora" else "full"
        window = {"fedavg": "", "relay": ", the whole model"}.get(c["strategy"], f", window {c['window']}")
        lines.append(f"  {name}: {c['strategy']}, {c['model']} {mode}{window}, {c['local-steps']} {c['optimizer']} "
                     f"steps on {c['batch-size']} x {c['seq-len']} tokens, frozen {c['frozen-dtype']}"
                     f"{', gradient checkpointing' if c['gradient-checkpointing'] else ''}")
    return lines
