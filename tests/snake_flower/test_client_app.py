"""The ClientApp, called in-process with real Flower messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from snake_flower.config import resolve
from snake_flower.node import stored_copy
from snake_flower.tasks.task import TASKS, build_model, segment_keys

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
    copy = stored_copy(node.contexts[1000])
    held = copy.tensors
    for name in ("conv1", "conv3", "fc1"):  # frozen: bit-identical to what was received
        for key in keys[name]:
            assert torch.equal(held[key], model.state_dict()[key])
    assert not torch.equal(held[keys["conv2"][0]], model.state_dict()[keys["conv2"][0]])
    assert copy.versions == {"conv1": 0, "conv2": 1, "conv3": 0, "fc1": 0, "head": 1}
    assert reply["metrics"]["partition-id"] == 0.0


@pytest.mark.parametrize("sync", ["delta", "window"])
def test_a_node_without_the_copy_the_message_assumes_asks_for_a_full_sync(nodes, sync):
    node = nodes(2)
    msg, _ = _hop(["conv2", "head"], ["conv2", "head"], [3, 3, 3, 3, 3], sync=sync)  # node never synced
    reply = node(msg)
    assert reply["metrics"]["full-sync-needed"] == 1.0
    assert "holds no copy" in reply["full-sync-needed"]["reason"]
    assert "arrays" not in reply


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


def test_int8_payload_is_3x_smaller_on_the_wire_and_the_node_keeps_what_the_server_merges(loopback, nodes):
    from flwr.common.serde import array_record_to_proto

    from snake_flower.runtime.metering import MeteredGrid
    from strategies.payload import decode, encode

    window, names = ["conv3", "fc1", "head"], list(TASK.segment_names)
    up = {}
    for payload in ("fp32", "int8"):
        node = nodes(2)
        msg, model = _hop(window, names, [0] * 5)
        msg.content["config"]["payload-dtype"] = payload
        msg.content["arrays"] = encode(msg.content["arrays"], payload)
        grid = MeteredGrid(loopback(list(node.contexts), node))
        (reply,) = grid.send_and_receive([msg], timeout=60)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        arrays = reply.content["arrays"]
        assert grid.close_round().up.array_bytes == array_record_to_proto(arrays).ByteSize()
        up[payload] = array_record_to_proto(arrays).ByteSize()
        held = stored_copy(node.contexts[1000]).tensors
        merged = decode(arrays, payload).to_torch_state_dict()  # what the server merges
        assert all(torch.equal(held[key], value) for key, value in merged.items())
        if payload == "int8":  # the frozen segments: the decoded int8 the node received
            sent = decode(msg.content["arrays"], "int8").to_torch_state_dict()
            assert all(torch.equal(held[k], sent[k]) for k in segment_keys(model)["conv1"])
    # the synthetic model has ~2k parameters: per-array framing is a large share (6197 vs 3068 B)
    assert up["fp32"] / up["int8"] >= 1.9, up


@pytest.mark.parametrize("window,ratio", [(["conv1", "conv2", "head"], 3.1), (["conv2", "conv3", "head"], 3.5),
                                          (["conv3", "fc1", "head"], 3.8)])
def test_int8_windows_of_the_fashion_mnist_cnn_are_over_3x_smaller(window, ratio):
    # What the metering counts (the serialized ArrayRecord, checked above), for the main job's model
    from flwr.common.serde import array_record_to_proto

    from snake_flower.tasks.task import small_cnn
    from strategies.payload import encode

    model = small_cnn()
    keys = segment_keys(model)
    record = ArrayRecord({k: v for name in window for k, v in model.state_dict().items() if k in keys[name]})
    fp32, int8 = (array_record_to_proto(encode(record, p)).ByteSize() for p in ("fp32", "int8"))
    assert fp32 / int8 >= ratio  # 3.18, 3.60, 3.82


STOCK_CLIENTAPP = """
from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp
flower = (inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"], inflatable_utils.inflate_object_from_contents,
          run_clientapp.install_from_fab, start_client_internal.time)
import snake_flower.client_app  # what a stock flwr-clientapp loads, once per message
after = (inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"], inflatable_utils.inflate_object_from_contents,
         run_clientapp.install_from_fab, start_client_internal.time)
print(flower == after)
"""


def test_loading_the_clientapp_patches_nothing_in_a_stock_flower_process():
    """A stock node (``flower-supernode``) runs stock Flower with this app: only the launcher,
    the ServerApp (``fast-poll``) and the simulation patch Flower (``bench_deploy.py``'s arms)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("SNAKE_FLOWER_STOCK_FLOWER", "SNAKE_FLOWER_WARM")}
    done = subprocess.run([sys.executable, "-c", STOCK_CLIENTAPP], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
