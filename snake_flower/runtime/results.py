"""The results contract (design §6): one JSON file per run, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_to_proto

LEDGER_KEYS = ("trainable-param-bytes", "frozen-param-bytes", "grad-bytes", "optimizer-bytes",
               "activation-bytes", "total-bytes", "peak-rss-bytes")


def model_sha256(arrays: ArrayRecord) -> str:
    """Hash of the arrays' names, dtypes, shapes and values, in key order."""
    digest = hashlib.sha256()
    for key, array in arrays.items():
        values = np.ascontiguousarray(array.numpy())
        digest.update(f"{key}|{values.dtype}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def model_bytes(arrays: ArrayRecord) -> int:
    """Serialized size of the whole model, as FedAvg sends it to one node."""
    return array_record_to_proto(arrays).ByteSize()


def cpu() -> dict[str, str]:
    """The CPU's model name and flags (``/proc/cpuinfo``): speed depends on them, e.g. whether
    bf16 or fp16 is native (``frozen-dtype = "auto"``). Empty where there is no ``/proc``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or platform.machine()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "flags") and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return {"cpu": fields.get("model name", platform.machine()), "cpu-flags": fields.get("flags", "")}


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on, and the CPU it ran on."""
    out = {"python": platform.python_version(), **cpu()}
    for dist in ("flwr", "torch", "torchvision", "numpy", "flwr-datasets", "datasets", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_ledger(ledgers: list[dict[str, float]]) -> dict[str, int]:
    """The per-node ledger with the largest total, in the design's snake_case keys."""
    top = max(ledgers, key=lambda led: led.get("total-bytes", 0.0), default={})
    return {key.replace("-", "_"): int(top.get(key, 0.0)) for key in LEDGER_KEYS}


def ledgers_by_node(ledgers: list[dict[str, float]]) -> dict[str, dict[str, int]]:
    """The peak ledger of each node, keyed by the partition id it reported."""
    by_node: dict[str, list[dict[str, float]]] = {}
    for ledger in ledgers:
        if "partition-id" in ledger:
            by_node.setdefault(str(int(ledger["partition-id"])), []).append(ledger)
    return {node: peak_ledger(group) for node, group in sorted(by_node.items(), key=lambda kv: int(kv[0]))}


def meets_target(score: float, target: float, lower_is_better: bool = False) -> bool:
    """Is ``score`` at the target or better: at or above an accuracy, at or below a perplexity
    (``lower_is_better``)? Equal counts as reached, either way."""
    return score <= target if lower_is_better else score >= target


def cumulative_bytes(rows: list[dict[str, Any]], mode: str = "cs") -> list[int]:
    """Bytes moved up to each row: down + up + control in client-server mode, and in
    peer-to-peer mode each transfer once (``bytes_p2p``) + control."""
    if mode == "p2p":
        return list(accumulate(r["bytes_p2p"] + r.get("bytes_control", 0) for r in rows))
    return list(accumulate(r["bytes_down"] + r["bytes_up"] + r.get("bytes_control", 0) for r in rows))


def cumulative_network_time(rows: list[dict[str, Any]]) -> list[float]:
    """The network-time model's seconds up to each row (``training/capacity.py``); 0 for old rows.

    One hop (or round) after the other, the clock is the sum of their times; rows of hops
    that overlapped (``concurrency > 1``) carry their own clock, ``network_clock_s``.
    """
    clock, clocks = 0.0, []
    for row in rows:
        clock = float(row["network_clock_s"]) if "network_clock_s" in row else clock + float(
            row.get("network_time_s", 0.0))
        clocks.append(clock)
    return clocks


def concurrent_clock(previous: list[dict[str, Any]], seconds: float, sent_after: int) -> float:
    """When the hop after ``previous`` merges, in the network-time model, with hops in flight:
    it was sent once the first ``sent_after`` hops had merged (with K in flight and nodes
    enough, all but the K - 1 before it), takes ``seconds``, and merges once it is back and
    the hop before it has merged."""
    clocks = cumulative_network_time(previous)
    sent = clocks[sent_after - 1] if sent_after > 0 else 0.0
    return max(sent + seconds, clocks[-1] if clocks else 0.0)


def cumulative_visits(rows: list[dict[str, Any]]) -> list[int]:
    """Node visits up to and including each round (a Snake hop is one, a FedAvg round N)."""
    return list(accumulate(max(1, len(r.get("nodes", []))) for r in rows))


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
