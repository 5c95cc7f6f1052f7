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
    """The report of ``measure.measure`` as a short table, in MiB."""
    opts, mib = report["options"], 2**20
    snake = report["snake"]
    lines = [f"{report['model']}: one hop of {opts['steps']} {opts['optimizer']} steps on {opts['batch']} x "
             f"{opts['seq']} tokens, each strategy in a fresh process (random weights)",
             f"Snake trains {'+'.join(snake['window'])}, frozen layers held and kept in "
             f"{snake['frozen_dtype']} (payload {snake['payload_dtype']}); FedAvg trains everything in fp32",
             f"{'':8}{'baseline':>10}{'peak':>10}{'peak-base':>11}{'ledger':>10}{'ratio':>7}   (MiB)"]
    for arm in ("fedavg", "snake"):
        got = report[arm]
        grown = got["peak_rss_bytes"] - got["baseline_rss_bytes"]
        lines.append(f"{arm:8}{got['baseline_rss_bytes'] / mib:>10.0f}{got['peak_rss_bytes'] / mib:>10.0f}"
                     f"{grown / mib:>11.0f}{got['total_bytes'] / mib:>10.0f}{grown / got['total_bytes']:>7.2f}")
    ratio = report.get("snake_over_fedavg")
    if ratio:
        lines.append(f"Snake / FedAvg: {ratio['measured']:.2f} measured (peak - baseline), "
                     f"{ratio['ledger']:.2f} by the ledger")
    return "\n".join(lines)
