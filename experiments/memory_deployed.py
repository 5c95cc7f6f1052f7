"""Peak memory of a deployed node during real LLM hops: its SuperNode and its ClientApp processes.

A ``LoopbackDeployment`` (``flower-superlink`` and 8 nodes on loopback) runs the ``snake-full``
arm of ``snake-flower memory --measure`` (the same run-config: SmolLM2-135M,
``experiments/llm.toml``'s hop, 8 nodes in a fixed chain) for 9 hops, so that the node of
partition 0 makes the two hops that command measures: its first visit (full sync) and, after
the 7 others made one hop each, its second (delta). The nodes are the node launcher's
(``snake-flower supernode``: each ClientApp forked from a warm forkserver that preloaded the
app, the tokenizer and the node's tokenized partition for this run-config, with the patches
``memory --measure``'s node runs with), or with ``--stock`` stock ``flower-supernode`` processes
(one fresh ``flwr-clientapp`` per message, no patch). While the run goes, every process under
that node's SuperNode is read from ``/proc`` every 20 ms: its peak resident set (``VmHWM``),
kept per process. Prints the SuperNode's peak and each ClientApp process's, in the order they
started: the first answered the chain's rank query, and the two largest of the others its two
train messages.

Growth is a peak less a baseline, and a deployed ClientApp process has no moment that is
"after imports and data, before the message" to read; so this prints the peaks, and the
growth over the peak of the same node's query ClientApp (a process that holds Flower, torch
and the app, and answered without loading a model), beside ``memory --measure``'s figures for
the same hops when given its JSON (``--in-process``). Each process's anonymous resident
memory (``RssAnon``, read at the same 20 ms) is kept too, at its largest: a ClientApp forked
from a launcher's forkserver starts with the forkserver's anonymous pages (torch's and the
app's heap, the preloaded data) in its resident set but none of its file-backed ones (the
pages of torch's libraries), which count as they are touched, during the hop; a fresh
process has touched them before its baseline is read. The anonymous growth, here and in
``memory --measure``, leaves those pages out on both sides.

    python experiments/memory_deployed.py --in-process experiments/memory/smol-sgd.json \\
        --json experiments/memory/smol-deployed.json
    SNAKE_FLOWER_STOCK_FLOWER=1 snake-flower memory --measure --model smollm2-135m --json > stock.json
    python experiments/memory_deployed.py --stock --in-process stock.json --json deployed-stock.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from snake_flower.deploy.loopback import LoopbackDeployment
from snake_flower.deploy.processes import _process_table
from snake_flower.harness.measure import NODES, MeasureOptions, run_config
from snake_flower.runtime.results import cpu

MIB = 2**20


class PeakSampler(threading.Thread):
    """Reads ``VmHWM`` of every process under ``root`` every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks: dict[tuple[int, int], dict[str, Any]] = {}  # (pid, start time) -> figures
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            table = _process_table()
            for pid, (ppid, _, started) in table.items():
                if not _descends(pid, self.root, table):
                    continue
                status = _status(pid)
                if status is None:
                    continue
                entry = self.peaks.setdefault((pid, started), {"pid": pid, "ppid": ppid, "started": started,
                                                               "command": _command(pid), "peak_rss_bytes": 0,
                                                               "peak_anon_bytes": 0})
                entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], status["VmHWM"])
                entry["peak_anon_bytes"] = max(entry["peak_anon_bytes"], status["RssAnon"])
            time.sleep(self.interval)

    def stop(self) -> list[dict[str, Any]]:
        self._stop_event.set()
        self.join()
        return sorted(self.peaks.values(), key=lambda e: e["started"])


def _clientapps(processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ClientApp processes among ``processes``: stock ``flwr-clientapp`` ones, or the children
    of a launcher's forkserver (whose command line they inherit)."""
    forkservers = {p["pid"] for p in processes if "multiprocessing.forkserver" in p["command"]}
    return [p for p in processes if "flwr-clientapp" in p["command"] or p["ppid"] in forkservers]


def _descends(pid: int, root: int, table: dict[int, tuple[int, int, int]]) -> bool:
    while pid in table and pid != root:
        pid = table[pid][0]
    return pid == root


def _status(pid: int) -> dict[str, int] | None:
    """``VmHWM`` (the kernel's peak resident set) and ``RssAnon`` (anonymous resident now), bytes."""
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return None
    return fields if len(fields) == 2 else None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-process", help="memory --measure's JSON for the same options, to print beside")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--stock", action="store_true",
                        help="stock flower-supernode nodes (a fresh flwr-clientapp per message) instead of the launcher's")
    args = parser.parse_args()
    options = MeasureOptions()  # SGD: a run's nodes train with it (adam is a message key of memory --measure only)
    config = dict(run_config("snake-full", options))
    overrides = {**{k: v for k, v in config.items() if k in _RUN_KEYS}, "eval-every": NODES + 1,
                 "eval-samples": 16, "validation-size": 0}
    with tempfile.TemporaryDirectory() as work, LoopbackDeployment(Path(work), num_nodes=NODES,
                                                                   launcher=not args.stock, in_memory=True,
                                                                   warm_config=overrides) as deployment:
        node = deployment.family.popens["supernode-0"].pid
        sampler = PeakSampler(node)
        sampler.start()
        started = time.monotonic()
        result = deployment.run(overrides, timeout=3600.0)
        processes = sampler.stop()
        seconds = time.monotonic() - started
    supernode = next(p for p in processes if p["pid"] == node)
    clientapps = _clientapps(processes)
    report = {"command": "python experiments/memory_deployed.py" + (" --stock" if args.stock else ""),
              "node": "stock flower-supernode" if args.stock else "snake-flower supernode (launcher)",
              "date": time.strftime("%Y-%m-%d"),
              "cpu": cpu()["cpu"], "options": vars(args), "run_seconds": round(seconds, 1),
              "model_sha256": result["final"].get("model_sha256"),
              "supernode_peak_rss_bytes": supernode["peak_rss_bytes"],
              "clientapps": [{"peak_rss_bytes": p["peak_rss_bytes"]} for p in clientapps]}
    print(f"SuperNode of partition 0: peak {supernode['peak_rss_bytes'] / MIB:,.0f} MiB")
    for i, p in enumerate(clientapps):
        print(f"ClientApp process {i + 1}: peak {p['peak_rss_bytes'] / MIB:,.0f} MiB")
    query = clientapps[0]  # the chain's rank query comes before any hop
    train = sorted(clientapps[1:], key=lambda p: -p["peak_rss_bytes"])[:2]
    train.sort(key=lambda p: p["started"])  # its two train messages: first visit, then the delta one
    report["query_peak_rss_bytes"] = query["peak_rss_bytes"]
    report["hops"] = {}
    measured = (json.loads(Path(args.in_process).read_text())["arms"]["snake-full"]["hops"]
                if args.in_process else {})
    report["query_peak_anon_bytes"] = query["peak_anon_bytes"]
    for hop, p in zip(("full-sync", "delta"), train):
        grown = p["peak_rss_bytes"] - query["peak_rss_bytes"]
        grown_anon = p["peak_anon_bytes"] - query["peak_anon_bytes"]
        row = {"peak_rss_bytes": p["peak_rss_bytes"], "grown_over_query_bytes": grown,
               "peak_anon_bytes": p["peak_anon_bytes"], "anon_grown_over_query_bytes": grown_anon}
        line = (f"{hop}: deployed peak {p['peak_rss_bytes'] / MIB:,.0f} MiB, {grown / MIB:,.0f} over the query's; "
                f"anonymous {grown_anon / MIB:,.0f} over the query's")
        if hop in measured:
            inside = measured[hop]
            row["in_process_peak_rss_bytes"] = inside["peak_rss_bytes"]
            row["in_process_grown_bytes"] = inside["peak_rss_bytes"] - inside["baseline_rss_bytes"]
            row["peak_ratio"] = round(p["peak_rss_bytes"] / inside["peak_rss_bytes"], 3)
            line += (f"; in process: peak {inside['peak_rss_bytes'] / MIB:,.0f} MiB, grown "
                     f"{row['in_process_grown_bytes'] / MIB:,.0f} (peak ratio {row['peak_ratio']:.2f})")
            if inside.get("peak_anon_bytes") is not None:
                row["in_process_anon_grown_bytes"] = inside["peak_anon_bytes"] - inside["baseline_anon_bytes"]
                row["anon_grown_ratio"] = round(grown_anon / row["in_process_anon_grown_bytes"], 3)
                line += (f", anonymous grown {row['in_process_anon_grown_bytes'] / MIB:,.0f} "
                         f"(deployed / in process {row['anon_grown_ratio']:.2f})")
        report["hops"][hop] = row
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


_RUN_KEYS = ("task", "finetune", "partitioner", "window", "train-head", "frozen-segments", "frozen-dtype",
             "lr", "momentum", "clip-norm", "kd", "strategy", "model", "seq-len", "batch-size", "local-steps",
             "lora-rank", "order", "num-server-rounds", "min-nodes", "seed")
"""The run-config keys of ``memory --measure``'s arm that shape the hops (the rest are defaults)."""


if __name__ == "__main__":
    main()
