"""Heterogeneous nodes through the ServerApp: auto windows, network time, P2P and CS metering."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_to_proto

from snake_flower.config import resolve
from snake_flower.harness.compare import report, summarize
from snake_flower.server_app import run
from snake_flower.tasks.task import TASKS, build_model, segment_keys


def _run(loopback, nodes, tmp_path, count=3, **overrides):
    config = resolve({"task": "synthetic", "num-server-rounds": 8, "out-dir": str(tmp_path),
                      "local-steps": 5, "min-nodes": count, **overrides})
    node = nodes(count)
    run(loopback(list(node.contexts), node), config)
    return json.loads((tmp_path / f"{config['strategy']}.json").read_text())


def test_every_auto_window_fits_its_nodes_budget(loopback, nodes, tmp_path):
    result = _run(loopback, nodes, tmp_path, count=6, window="auto", **{"capacity-profile": "mixed",
                  "num-server-rounds": 16, "hop-deadline-s": 0.005})
    budgets = {row["partitions"][0]: row["capacity"]["memory-budget-mb"] for row in result["rounds"]}
    assert max(budgets.values()) / min(budgets.values()) == pytest.approx(4.0, rel=1e-3)
    assert len(budgets) >= 4  # the chain is not one node doing every hop
    sizes = {len(row["window"]) for row in result["rounds"]}
    assert len(sizes) > 1  # nodes of different capacity train windows of different size
    for partition, ledger in result["memory_by_node"].items():
        assert ledger["total_bytes"] / 1e6 <= budgets[int(partition)]  # the node's peak hop


def test_every_strategy_reports_network_time(loopback, nodes, tmp_path):
    for strategy in ("snake", "fedavg", "split"):
        result = _run(loopback, nodes, tmp_path / strategy, strategy=strategy, **{"capacity-profile": "mixed"})
        rows = result["rounds"]
        assert all(row["network_time_s"] > 0 for row in rows)
        assert result["final"]["network_time_s"] == pytest.approx(sum(r["network_time_s"] for r in rows))
        summary = summarize(result, target=0.05)
        reached = summary["round_to_target"]
        assert summary["network_time_to_target_s"] == pytest.approx(
            sum(r["network_time_s"] for r in rows if r["round"] <= reached))
        assert "network s to target" in report({"target_accuracy": 0.05, "runs": {strategy: summary}},
                                               {strategy: result})


def test_fedavg_rounds_wait_for_their_slowest_node(loopback, nodes, tmp_path):
    config = resolve({"task": "synthetic", "strategy": "fedavg", "num-server-rounds": 3, "min-nodes": 3,
                      "out-dir": str(tmp_path), "local-steps": 5})
    node = nodes(3)
    links = {0: 1.0, 1: 2.0, 2: 1e6}  # Mbit/s; compute so fast that the links decide
    for context in node.contexts.values():
        context.node_config.update({"compute": 1e9, "link-mbps": links[context.node_config["partition-id"]]})
    run(loopback(list(node.contexts), node), config)
    for row in json.loads((tmp_path / "fedavg.json").read_text())["rounds"]:
        share = (row["bytes_down"] + row["bytes_up"]) / 3
        # the round lasts as long as its slowest node (1 Mbit/s), not the sum of the nodes' times
        assert row["network_time_s"] == pytest.approx(8 * share / 1e6, rel=1e-3)


def test_p2p_counts_one_transfer_of_the_window_and_cs_the_relay_both_ways(loopback, nodes, tmp_path):
    runs = {mode: _run(loopback, nodes, tmp_path / mode, window=1, sync="window", mode=mode)
            for mode in ("cs", "p2p")}
    cs, p2p = runs["cs"]["rounds"], runs["p2p"]["rounds"]
    for a, b in zip(cs, p2p):
        assert a["bytes_p2p"] == b["bytes_p2p"] and a["window"] == b["window"]
    model = build_model(TASKS["synthetic"], 0)
    keys, state = segment_keys(model), model.state_dict()
    for row in cs[3:]:  # every node has had its first, whole-model visit
        window = ArrayRecord({k: state[k] for name in row["window"] for k in keys[name]})
        # sync=window: the node receives exactly its window, once, from the peer that holds it...
        assert row["bytes_p2p"] == array_record_to_proto(window).ByteSize()
        # ... while CS counts it down from the server and up to it (with configs and metrics)
        assert row["array_bytes_up"] == row["bytes_p2p"]
        assert row["bytes_down"] + row["bytes_up"] > 2 * row["bytes_p2p"]
    total = {mode: run["final"]["bytes_total"] for mode, run in runs.items()}
    assert total["cs"] == sum(r["bytes_down"] + r["bytes_up"] + r["bytes_control"] for r in cs)
    assert total["p2p"] == sum(r["bytes_p2p"] + r["bytes_control"] for r in p2p)
    assert runs["p2p"]["mode"] == "p2p" and summarize(runs["p2p"], 0.05)["mode"] == "p2p"



def test_a_nodes_stated_capacities_win_over_the_profile(loopback, nodes, tmp_path):
    config = resolve({"task": "synthetic", "num-server-rounds": 4, "out-dir": str(tmp_path), "local-steps": 5,
                      "min-nodes": 2, "capacity-profile": "mixed", "order": "capacity"})
    node = nodes(2)
    for context in node.contexts.values():  # flower-supernode --node-config "... compute=3 link-mbps=7"
        partition = context.node_config["partition-id"]
        context.node_config.update({"compute": 1.0 + partition, "link-mbps": 7.0})
    run(loopback(list(node.contexts), node), config)
    rows = json.loads((tmp_path / "snake.json").read_text())["rounds"]
    assert [row["partitions"][0] for row in rows] == [1, 0, 1, 0]  # compute 2 before compute 1
    assert {(row["capacity"]["compute"], row["capacity"]["link-mbps"]) for row in rows} == {(1.0, 7.0), (2.0, 7.0)}
