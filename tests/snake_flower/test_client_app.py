"""The ClientApp, called in-process with real Flower messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from snake_flower.config import resolve
from snake_flower.task import TASKS, build_model, segment_keys

TASK = TASKS["synthetic"]


def _hop(window, sent, versions, round_=1, sync="delta"):
    config = resolve({"task": "synthetic", "partitioner": "iid"})
    model = build_model(TASK, config["seed"])
    keys = [k for name in sent for k in segment_keys(model)[name]]
    cfg = ConfigRecord({**config, "server-round": round_, "window": window, "sync": sync,
                        "segments-sent": sent or [""], "segment-versions": versions})
    arrays = ArrayRecord({k: model.state_dict()[k] for k in keys})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=1000,
                   message_type=MessageType.TRAIN), model


def test_reply_is_the_window_and_state_keeps_the_rest(nodes):
    node = nodes(2)
    msg, model = _hop(["conv2", "head"], list(TASK.segment_names), [0] * 5)
    reply = node(msg)
    keys = segment_keys(model)
    assert list(reply["arrays"].keys()) == keys["conv2"] + keys["head"]
    state = node.contexts[1000].state
    held = state["model"].to_torch_state_dict()
    for name in ("conv1", "conv3", "fc1"):  # frozen: bit-identical to what was received
        for key in keys[name]:
            assert torch.equal(held[key], model.state_dict()[key])
    assert not torch.equal(held[keys["conv2"][0]], model.state_dict()[keys["conv2"][0]])
    assert dict(state["versions"]) == {"conv1": 0, "conv2": 1, "conv3": 0, "fc1": 0, "head": 1}
    assert reply["metrics"]["partition-id"] == 0.0


def test_stale_copy_under_delta_sync_fails_the_hop(nodes):
    node = nodes(2)
    msg, _ = _hop(["conv2", "head"], ["conv2"], [3, 3, 3, 3, 3])  # node never synced
    error = node(msg)
    assert "stale" in error.reason


def test_window_sync_trains_on_its_own_copy(nodes):
    node = nodes(2)
    first, _ = _hop(["conv1", "head"], list(TASK.segment_names), [0] * 5, sync="window")
    node(first)
    second, _ = _hop(["fc1", "head"], ["fc1", "head"], [1, 0, 0, 0, 1], round_=2, sync="window")
    reply = node(second)
    assert set(reply["arrays"].keys()) == {k for n in ("fc1", "head") for k in segment_keys(build_model(TASK, 0))[n]}


def test_query_reports_partition_rank(nodes):
    node = nodes(3)
    ctx_id = list(node.contexts)[2]
    msg = Message(RecordDict({"config": ConfigRecord({"ask": "rank"})}), dst_node_id=ctx_id,
                  message_type=MessageType.QUERY)
    assert node(msg)["info"]["rank"] == 2


def test_node_without_partition_config_gets_a_clear_error(nodes):
    node = nodes(1)
    node.contexts[1000].node_config.clear()
    msg, _ = _hop(["conv1", "head"], list(TASK.segment_names), [0] * 5)
    assert "partition-id" in node(msg).reason
