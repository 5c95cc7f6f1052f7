"""Ablation of Snake's knobs under IID and non-IID data (docs/ablation.md).

Each variant changes one knob of the main job's Snake run (experiments/fashion-mnist-noniid.toml:
8 nodes, 100 local steps per hop, window 2 + head, KD on for non-IID, clipping 1.0, delta
sync, fp32 payloads and frozen layers), under three partitionings: IID, Dirichlet alpha 0.5
and 0.1. Every run is the same ``snake-flower run`` a user would type, side by side
(``--jobs``), each in its own Ray simulation; runs whose results exist are not run again.

Usage::

    python experiments/ablation.py --out results/ablation --jobs 2 [--rounds 64] [--only dir0.5]
    python experiments/ablation.py --out results/ablation --table   # the table alone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from snake_flower.harness.compare import summarize
from snake_flower.harness.jobs import child_command, run_side_by_side

CONFIG = "experiments/fashion-mnist-noniid.toml"
SETTINGS = {"iid": "partitioner=iid", "dir0.5": "partitioner=dirichlet dirichlet-alpha=0.5",
            "dir0.1": "partitioner=dirichlet dirichlet-alpha=0.1"}
# kd = auto distils on non-IID data only: its variant turns it on for IID and off otherwise
VARIANTS = {"baseline": "", "kd flipped": None, "no clipping": "clip-norm=0", "sync window": "sync=window",
            "payload fp16": "payload-dtype=fp16", "payload int8": "payload-dtype=int8",
            "frozen int8": "frozen-dtype=int8"}


def overrides(setting: str, variant: str, rounds: int | None) -> str:
    """The ``--run-config`` of one run."""
    knob = VARIANTS[variant]
    if knob is None:
        knob = "kd=on" if setting == "iid" else "kd=off"
    extra = f" num-server-rounds={rounds}" if rounds else ""
    return f"{SETTINGS[setting]} {knob}{extra}".strip()


def run_dir(out: Path, setting: str, variant: str) -> Path:
    """Where one run writes ``snake.json``."""
    return out / setting / variant.replace(" ", "-")


def table(out: Path, target: float) -> str:
    """Markdown: one row per run found under ``out``, with its deltas against the baseline."""
    lines = [f"| data | variant | final acc | Δ acc (pts) | hops to {target} | MB to {target} | "
             f"MB / baseline's | network s to {target}* | frozen param bytes (peak hop) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        runs = {v: run_dir(out, setting, v) / "snake.json" for v in VARIANTS}
        found = {v: json.loads(p.read_text()) for v, p in runs.items() if p.exists()}
        if "baseline" not in found:
            continue
        base = summarize(found["baseline"], target)
        for variant, result in found.items():
            s = summarize(result, target)
            ratio = (f"{s['bytes_to_target'] / base['bytes_to_target']:.2f}"
                     if s["bytes_to_target"] and base["bytes_to_target"] else "–")
            mb = f"{s['bytes_to_target'] / 1e6:.2f}" if s["bytes_to_target"] else "not reached"
            network = f"{s['network_time_to_target_s']:.0f}" if s["network_time_to_target_s"] else "–"
            lines.append(f"| {setting} | {variant} | {s['final_accuracy']:.4f} | "
                         f"{100 * (s['final_accuracy'] - base['final_accuracy']):+.2f} | "
                         f"{s['visits_to_target'] or '–'} | {mb} | {ratio} | {network} | "
                         f"{result['memory']['frozen_param_bytes']:,} |")
    lines += ["", "\\* uniform profile: the visits' compute seconds + bytes at 100 Mbit/s. Runs from before "
              "the network time counted CPU seconds carry wall seconds, which on a loaded machine are "
              "mostly waiting for a core."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/ablation")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="hops per run (default: the config's 128)")
    parser.add_argument("--only", default="", help="comma-separated settings (iid, dir0.5, dir0.1)")
    parser.add_argument("--variants", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--table", action="store_true", help="print the table of finished runs only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    settings = [s for s in args.only.split(",") if s] or list(SETTINGS)
    variants = [v for v in args.variants.split(",") if v] or list(VARIANTS)
    unknown = [s for s in settings if s not in SETTINGS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown setting or variant: {', '.join(unknown)}")
    failed: list[str] = []
    if not args.table:
        commands = {f"{s}.{v.replace(' ', '-')}": child_command(CONFIG, overrides(s, v, args.rounds), "snake", 8,
                                                                  str(run_dir(out, s, v)))
                    for s in settings for v in variants
                    if not (run_dir(out, s, v) / "snake.json").exists()}
        codes = run_side_by_side(commands, out / "logs", jobs=args.jobs, every=120.0) if commands else {}
        failed = [name for name, code in codes.items() if code != 0]
        if failed:
            print(f"ablation: {len(failed)} run(s) failed: {', '.join(failed)} (logs in {out / 'logs'})",
                  file=sys.stderr)
    text = table(out, args.target)
    (out / "ablation.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
