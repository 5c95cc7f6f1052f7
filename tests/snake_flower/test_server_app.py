"""The ServerApp end to end over an in-process Grid: results, metering, rejection."""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.serde import array_record_to_proto

from snake_flower.config import NODE_KEYS, resolve
from snake_flower.runtime.metering import content_bytes
from snake_flower.runtime.results import LEDGER_KEYS
from snake_flower.server_app import run
from snake_flower.tasks.task import TASKS, build_model, segment_keys

TOP_KEYS = {"strategy", "task", "config", "versions", "rounds", "provenance", "memory",
            "failures", "rejected_replies", "final"}
ROW_KEYS = {"round", "nodes", "window", "bytes_down", "bytes_up", "bytes_p2p", "accuracy",
            "loss", "wall_s"}
MEMORY_KEYS = {"trainable_param_bytes", "frozen_param_bytes", "grad_bytes", "optimizer_bytes",
               "activation_bytes", "total_bytes", "peak_rss_bytes"}


def _run(loopback, nodes, tmp_path, hops=6, tamper=None, **overrides):
    config = resolve({"task": "synthetic", "num-server-rounds": hops, "out-dir": str(tmp_path),
                      "local-epochs": 1, **overrides})
    node = nodes(3)
    node.tamper = tamper
    run(loopback(list(node.contexts), node), config)
    return json.loads((tmp_path / f"{config['strategy']}.json").read_text())


def test_wall_s_counts_from_the_server_apps_start_and_rows_time_the_node_listing(loopback, nodes, tmp_path):
    config = resolve({"task": "synthetic", "num-server-rounds": 3, "out-dir": str(tmp_path), "local-epochs": 1})
    node, before = nodes(3), time.time()
    run(loopback(list(node.contexts), node), config, started=before - 100.0)  # as if started 100 s ago
    rows = json.loads((tmp_path / "snake.json").read_text())["rounds"]
    assert 100.0 <= rows[0]["wall_s"] <= 100.0 + time.time() - before
    assert all(row["list_s"] >= 0.0 for row in rows)  # 3 nodes: listed at every hop


def _window_arrays(window: list[str]) -> ArrayRecord:
    model = build_model(TASKS["synthetic"], 0)
    keys = segment_keys(model)
    state = model.state_dict()
    return ArrayRecord({k: state[k] for name in window for k in keys[name]})


def test_results_follow_the_contract(loopback, nodes, tmp_path):
    result = _run(loopback, nodes, tmp_path)
    assert TOP_KEYS <= set(result) and result["strategy"] == "snake"
    assert [r["round"] for r in result["rounds"]] == list(range(1, 7))
    assert all(ROW_KEYS <= set(r) for r in result["rounds"])
    assert set(result["memory"]) == MEMORY_KEYS and result["memory"]["total_bytes"] > 0
    assert result["final"]["model_bytes"] == array_record_to_proto(_window_arrays(
        list(TASKS["synthetic"].segment_names))).ByteSize()
    assert len(result["final"]["model_sha256"]) == 64
    assert set(result["provenance"]) <= set(TASKS["synthetic"].segment_names)
    assert result["config"]["num-server-rounds"] == 6 and "flwr" in result["versions"]
    assert result["versions"]["cpu"] and "cpu-flags" in result["versions"]  # auto frozen dtypes depend on it


def test_each_upload_is_the_window_alone(loopback, nodes, tmp_path):
    result = _run(loopback, nodes, tmp_path, window=1)
    # proto3 leaves zero doubles out, so stand-in values must be non-zero (size is fixed then)
    metrics = MetricRecord({k: 1.0 for k in ("train-loss", "steps", "num-examples", "train-seconds", "train-cpu-seconds",
                                              *LEDGER_KEYS, "partition-id")})
    for row in result["rounds"]:
        window = _window_arrays(row["window"])
        assert row["array_bytes_up"] == array_record_to_proto(window).ByteSize()
        assert row["bytes_up"] == content_bytes(RecordDict({"arrays": window, "metrics": metrics}))
        assert row["bytes_up"] < result["final"]["model_bytes"] / 2


def test_same_seed_same_model(loopback, nodes, tmp_path):
    a = _run(loopback, nodes, tmp_path / "a")
    b = _run(loopback, nodes, tmp_path / "b")
    c = _run(loopback, nodes, tmp_path / "c", seed=7)
    assert a["final"]["model_sha256"] == b["final"]["model_sha256"] != c["final"]["model_sha256"]


def _nan_from_node_1007(content, node):
    if node == 1007 and "arrays" in content:
        key = next(iter(content["arrays"].keys()))
        content["arrays"][key] = Array(content["arrays"][key].numpy() * float("nan"))
    return content


def test_hostile_node_is_rejected_and_the_run_goes_on(loopback, nodes, tmp_path):
    clean = _run(loopback, nodes, tmp_path / "clean", hops=4)
    result = _run(loopback, nodes, tmp_path / "bad", hops=4, tamper=_nan_from_node_1007)
    bad_rounds = [f["round"] for f in result["failures"]]
    assert bad_rounds and result["rejected_replies"] == len(bad_rounds)
    assert all(f["node"] == 1007 and "non-finite" in f["reason"] for f in result["failures"])
    for row in result["rounds"]:
        assert row["status"] == ("failed" if row["round"] in bad_rounds else "merged")
    assert all(p["node"] != 1007 for p in result["provenance"].values())
    assert result["final"]["model_sha256"] != clean["final"]["model_sha256"]


def _no_training_reply(content, node):
    return None if "arrays" in content else content


@pytest.mark.parametrize("hops", [1])
def test_all_hops_failing_leaves_the_initial_model(loopback, nodes, tmp_path, hops):
    result = _run(loopback, nodes, tmp_path, hops=hops, tamper=_no_training_reply, **{"hop-timeout": 0.1})
    from snake_flower.runtime.results import model_sha256
    initial = ArrayRecord(build_model(TASKS["synthetic"], 42).state_dict())
    assert result["final"]["model_sha256"] == model_sha256(initial)
    assert result["failures"][0]["reason"] == "no reply before the hop timeout"


def test_fedavg_runs_the_same_client_on_the_whole_model(loopback, nodes, tmp_path):
    snake = _run(loopback, nodes, tmp_path / "s", hops=6)
    fedavg = _run(loopback, nodes, tmp_path / "f", hops=6, strategy="fedavg")
    assert fedavg["initial"] == snake["initial"]  # same seeded initial weights
    assert [r["round"] for r in fedavg["rounds"]] == [1, 2]  # 6 visits / 3 nodes
    model = fedavg["final"]["model_bytes"]
    for row in fedavg["rounds"]:
        assert len(row["nodes"]) == 3 and sorted(row["partitions"]) == [0, 1, 2]
        assert 3 * model < row["bytes_up"] < 3 * model * 1.05  # whole model, from every node
    # FedAvg never distils (plain cross-entropy): no teacher copy, every parameter trains
    params = sum(p.numel() * 4 for p in build_model(TASKS["synthetic"], 0).parameters())
    assert fedavg["memory"]["frozen_param_bytes"] == 0 and fedavg["memory"]["trainable_param_bytes"] == params
    # Snake (kd = "auto" distils on these Dirichlet partitions): the model outside its window,
    # plus its teacher's copy of the window, is frozen
    assert snake["memory"]["frozen_param_bytes"] == params
    assert set(fedavg["memory_by_node"]) == {"0", "1", "2"}


def test_evaluation_cadence_counts_node_visits(loopback, nodes, tmp_path):
    # eval-every = 4 visits: Snake hops 4 and 8 (and the last, 9); FedAvg's rounds of 3
    # visits pass 4 and 8 in rounds 2 and 3 (visits 6 and 9), never in round 1.
    snake = _run(loopback, nodes, tmp_path / "s", hops=9, **{"eval-every": 4})
    fedavg = _run(loopback, nodes, tmp_path / "f", hops=9, strategy="fedavg", **{"eval-every": 4})
    assert [r["round"] for r in snake["rounds"] if r["accuracy"] is not None] == [4, 8, 9]
    assert [r["round"] for r in fedavg["rounds"] if r["accuracy"] is not None] == [2, 3]


def test_split_learning_through_the_server_app(loopback, nodes, tmp_path):
    split = _run(loopback, nodes, tmp_path, hops=3, strategy="split", cut=2, **{"local-steps": 3})
    assert [r["status"] for r in split["rounds"]] == ["merged"] * 3
    assert all(r["window"] == ["conv1", "conv2"] and r["steps"] == 3 for r in split["rounds"])
    assert sorted(p for r in split["rounds"] for p in r["partitions"]) == [0, 1, 2]
    # per batch: activations and labels up, gradients down, plus the relayed bottom both ways
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in split["rounds"])
    assert split["cut"] == 2 and split["memory"]["frozen_param_bytes"] == 0
    # the server's side, reported apart: the top (conv3, fc1, head), its gradients and momentum
    model = build_model(TASKS["synthetic"], 42)
    top_bytes = sum(p.numel() * 4 for p in model[2:].parameters())
    server = split["memory_server"]
    assert server["trainable_param_bytes"] == server["grad_bytes"] == server["optimizer_bytes"] == top_bytes
    assert server["activation_bytes"] > 0 and server["frozen_param_bytes"] == 0
    assert split["memory"]["trainable_param_bytes"] == sum(p.numel() * 4 for p in model[:2].parameters())


def test_sync_tolerance_sends_less_and_the_clients_agree(loopback, nodes, tmp_path):
    strict = _run(loopback, nodes, tmp_path / "strict", hops=9)
    lax = _run(loopback, nodes, tmp_path / "lax", hops=9, **{"sync-tolerance": 0.5})
    assert [r["status"] for r in lax["rounds"]] == ["merged"] * 9  # no node saw a stale copy
    assert sum(r["bytes_down"] for r in lax["rounds"]) < sum(r["bytes_down"] for r in strict["rounds"])


def test_int8_payloads_and_frozen_layers_run_end_to_end(loopback, nodes, tmp_path):
    plain = _run(loopback, nodes, tmp_path / "fp32")
    quant = _run(loopback, nodes, tmp_path / "int8", **{"payload-dtype": "int8", "frozen-dtype": "int8"})
    assert quant["rejected_replies"] == 0 and not quant["failures"]
    assert sum(r["bytes_up"] + r["bytes_down"] for r in quant["rounds"]) < \
        sum(r["bytes_up"] + r["bytes_down"] for r in plain["rounds"])
    assert quant["memory"]["frozen_param_bytes"] < plain["memory"]["frozen_param_bytes"]
    # the synthetic task's accuracy moves in steps of 1/300: within 5 test examples of fp32
    assert abs(quant["final"]["accuracy"] - plain["final"]["accuracy"]) <= 5 / 300 + 1e-9


# what the strategies add to a node's message beside the run-config's NODE_KEYS
STRATEGY_KEYS = {"server-round", "window", "segments-sent", "segment-versions", "lr-rounds",
                 "split-batch", "split-steps", "split-cut"}


@pytest.mark.parametrize("strategy", ["snake", "fedavg", "split"])
def test_a_nodes_message_bytes_do_not_depend_on_out_dir(loopback, nodes, tmp_path, strategy):
    rows, sent = [], []
    for out in (tmp_path / "a", tmp_path / ("a-much-longer-folder-name" * 8)):
        node = nodes(3)
        grid = loopback(list(node.contexts), node)
        config = resolve({"task": "synthetic", "strategy": strategy, "num-server-rounds": 3, "local-steps": 2,
                          "out-dir": str(out)})
        rows.append([(r["bytes_down"], r["bytes_up"]) for r in run(grid, config)["rounds"]])
        sent.append([set(msg.content["config"]) for msg in grid.sent if "config" in msg.content.config_records
                     and "server-round" in msg.content["config"]])
    assert rows[0] == rows[1] and all(down > 0 for down, _ in rows[0])
    # a node is sent the keys it reads (NODE_KEYS) and what the strategy adds per message, no other
    assert sent[0] and all(set(NODE_KEYS) <= keys and keys - set(NODE_KEYS) <= STRATEGY_KEYS for keys in sent[0])
