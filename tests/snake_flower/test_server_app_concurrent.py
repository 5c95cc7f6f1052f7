"""Concurrent snakes through the real ServerApp and ClientApp (in-process Grid, no Ray)."""

from __future__ import annotations

import json

import pytest
from flwr.common.serde import array_record_to_proto

from snake_flower.config import resolve
from snake_flower.server_app import run
from snake_flower.tasks.task import TASKS, build_model, segment_keys

CONCURRENT = {"task": "synthetic", "concurrency": 2, "window": 1, "train-head": False, "local-epochs": 1,
              "eval-every": 1}


def _run(loopback, nodes, out, hops=8, node_ids=1000, **overrides):
    config = resolve({**CONCURRENT, "num-server-rounds": hops, "out-dir": str(out), **overrides})
    node = nodes(3, first_id=node_ids)
    run(loopback(list(node.contexts), node), config)
    return json.loads((out / "snake.json").read_text())


def _raw_bytes(segments: list[str]) -> int:
    model = build_model(TASKS["synthetic"], 0)
    keys, state = segment_keys(model), model.state_dict()
    return sum(state[k].numel() * state[k].element_size() for name in segments for k in keys[name])


def _window_bytes(segments: list[str]) -> int:
    from flwr.app import ArrayRecord

    model = build_model(TASKS["synthetic"], 0)
    keys, state = segment_keys(model), model.state_dict()
    return array_record_to_proto(ArrayRecord({k: state[k] for name in segments for k in keys[name]})).ByteSize()


def test_each_row_meters_its_own_hop_though_hops_overlap(loopback, nodes, tmp_path):
    result = _run(loopback, nodes, tmp_path)
    rows = result["rounds"]
    assert [r["status"] for r in rows] == ["merged"] * 8
    assert all(set(a["window"]).isdisjoint(b["window"]) for a, b in zip(rows, rows[1:]))
    for row in rows:  # the hop's own download and upload, not its neighbour's
        assert row["raw_bytes_down"] == _raw_bytes(row["segments_sent"])
        assert row["array_bytes_up"] == _window_bytes(row["window"])
    # the network-time model overlaps the hops: its clock runs slower than their sum
    k = CONCURRENT["concurrency"]
    assert [r["sent_after"] for r in rows] == [max(0, i - k + 1) for i in range(8)]  # nodes enough: K out
    clocks = [r["network_clock_s"] for r in rows]
    assert clocks == sorted(clocks) and clocks[-1] < sum(r["network_time_s"] for r in rows)
    assert result["final"]["network_time_s"] == clocks[-1]


def test_a_run_stopped_with_hops_in_flight_resumes_to_the_same_model(loopback, nodes, tmp_path):
    whole = _run(loopback, nodes, tmp_path / "whole")

    Stopping = loopback.stopping_at(6)  # the server dies as it sends hop 6 (hop 4 merged, hop 5 in flight)

    out = tmp_path / "stopped"
    with pytest.raises(Stopping.Stopped):
        _run(Stopping, nodes, out)
    resumed = _run(loopback, nodes, out, node_ids=5000, resume=True)  # new node ids, empty copies
    assert resumed["resumed_at_round"] == 4
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 9))
    assert [r["window"] for r in resumed["rounds"]] == [r["window"] for r in whole["rounds"]]
    assert resumed["final"]["model_sha256"] == whole["final"]["model_sha256"]
