"""download-dtype: what the server sends a node, never what its master holds (issue 33, item 2).

End to end over the in-process Grid: Snake's frozen segments stay bit for bit the initial
weights in the master while every node holds them within the quantization error; fewer bytes
go down and the same go up; FedAvg's and relay's models are still the merges of their fp32
replies; a run that leaves the key alone sends what it sent before the key existed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from snake_flower.config import resolve
from snake_flower.node import stored_copy
from snake_flower.runtime.metering import raw_tensor_bytes
from snake_flower.runtime.results import model_sha256
from snake_flower.server_app import run
from snake_flower.tasks.task import build_model, segment_keys, task_for, transport_state
from strategies import OrderedFedAvg
from strategies.payload import decode, encode, quantize


def _run(loopback, nodes, out, strategy="snake", hops=2, **overrides):
    """A short run on the synthetic task: the config, its nodes, its Grid (``sent``), the replies and results."""
    config = resolve({"task": "synthetic", "strategy": strategy, "num-server-rounds": hops, "out-dir": str(out),
                      "local-steps": 3, "window": 1, **overrides})
    node, replies = nodes(3), []

    def answer(msg: Message):
        content = node(msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            replies.append((msg.metadata.dst_node_id, content))
        return content

    grid = loopback(list(node.contexts), answer)
    return config, node, grid, replies, run(grid, config)


def _initial(config) -> ArrayRecord:
    return ArrayRecord(transport_state(build_model(task_for(config), config.seed).state_dict()))


def _master(config) -> ArrayRecord:
    """The server's model after the last hop (the checkpoint Snake writes after every hop)."""
    return ArrayRecord(torch.load(f"{config.out_dir}/{config.name}.ckpt", weights_only=True)["arrays"])


def _train_messages(grid) -> list[Message]:
    return [msg for msg in grid.sent if msg.metadata.message_type == MessageType.TRAIN]


def _dtypes(record: ArrayRecord) -> set[str]:
    return {array.dtype for array in record.values()}


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_snakes_frozen_segments_stay_bit_identical_in_the_master_and_nodes_hold_them_quantized(
        loopback, nodes, tmp_path, dtype):
    config, node, _, _, result = _run(loopback, nodes, tmp_path, **{"download-dtype": dtype})
    assert [row["status"] for row in result["rounds"]] == ["merged", "merged"]
    initial, master = _initial(config), _master(config)
    keys = segment_keys(build_model(task_for(config), config.seed))
    trained = {name for row in result["rounds"] for name in row["window"]}
    frozen = [key for name in keys if name not in trained for key in keys[name]]
    assert len(frozen) >= 4  # two of the five segments at least: never in a window of the run
    for key in frozen:  # sending them quantized left the master's values as they were
        assert master[key].numpy().tobytes() == initial[key].numpy().tobytes(), key
    received = decode(encode(initial, dtype), dtype)
    copies = [copy for context in node.contexts.values() if (copy := stored_copy(context)) is not None]
    assert len(copies) == 2  # one node per hop, each sent every segment on its first visit
    for copy in copies:
        for key in frozen:
            held, exact = copy.tensors[key].numpy(), initial[key].numpy()
            assert held.tobytes() == received[key].numpy().tobytes(), key  # as received, dequantized
            if dtype == "int8" and exact.ndim >= 2:  # round to nearest: half a step per channel
                step = quantize(exact)[1].reshape(-1, *[1] * (exact.ndim - 1))
                assert (np.abs(held - exact) <= step / 2 * (1 + 1e-6)).all(), key
            else:  # fp16 (int8's 1-D arrays travel in fp16 too)
                assert np.array_equal(held, exact.astype(np.float16).astype(np.float32)), key
    assert any(copies[0].tensors[key].numpy().tobytes() != initial[key].numpy().tobytes() for key in frozen)


@pytest.mark.parametrize("dtype,ratio", [("fp16", 0.5), ("int8", 0.35)])
def test_fewer_bytes_go_down_and_the_same_go_up(loopback, nodes, tmp_path, dtype, ratio):
    config, _, _, _, plain = _run(loopback, nodes, tmp_path / "fp32")
    _, _, _, _, low = _run(loopback, nodes, tmp_path / dtype, **{"download-dtype": dtype})
    # the first hop sends every segment: the whole model, encoded
    assert low["rounds"][0]["raw_bytes_down"] == raw_tensor_bytes(encode(_initial(config), dtype))
    for fp32, row in zip(plain["rounds"], low["rounds"], strict=True):
        assert row["window"] == fp32["window"] and row["segments_sent"] == fp32["segments_sent"]
        assert row["raw_bytes_down"] <= ratio * fp32["raw_bytes_down"]
        assert row["bytes_down"] < fp32["bytes_down"]
        assert (row["array_bytes_up"], row["raw_bytes_up"]) == (fp32["array_bytes_up"], fp32["raw_bytes_up"])


def test_fedavg_sends_int8_and_its_model_is_flowers_mean_of_the_replies(loopback, nodes, tmp_path):
    config, _, grid, replies, result = _run(loopback, nodes, tmp_path, "fedavg", hops=3,
                                            **{"download-dtype": "int8"})
    sent = _train_messages(grid)
    assert len(sent) == 3 and all(msg.content["config"]["download-dtype"] == "int8" for msg in sent)
    assert all("int8" in _dtypes(msg.content["arrays"]) for msg in sent)
    assert all(_dtypes(content["arrays"]) == {"float32"} for _, content in replies)  # the replies: fp32
    assert not result["failures"] and len(replies) == 3
    messages = []
    for node_id, content in replies:  # Flower's own mean of the replies, as they came back
        out = next(msg for msg in sent if msg.metadata.dst_node_id == node_id)
        reply = Message(RecordDict(dict(content.items())), reply_to=out)
        reply.metadata.__dict__["_src_node_id"] = node_id
        messages.append(reply)
    mean, _ = OrderedFedAvg().aggregate_train(1, messages)
    assert result["final"]["model_sha256"] == model_sha256(mean)


def test_relays_model_is_its_last_fp32_reply(loopback, nodes, tmp_path):
    config, _, grid, replies, result = _run(loopback, nodes, tmp_path, "relay", **{"download-dtype": "int8"})
    assert [row["status"] for row in result["rounds"]] == ["merged", "merged"]
    sent = _train_messages(grid)
    assert all("int8" in _dtypes(msg.content["arrays"]) for msg in sent)  # the whole model, int8
    last = replies[-1][1]["arrays"]
    assert _dtypes(last) == {"float32"}
    master = _master(config)
    assert all(master[key].numpy().tobytes() == last[key].numpy().tobytes() for key in last)


@pytest.mark.parametrize("strategy,payload", [("snake", "fp32"), ("snake", "int8"), ("relay", "fp16"),
                                              ("fedavg", "fp32")])
def test_a_run_without_download_dtype_sends_what_it_sent_before(loopback, nodes, tmp_path, strategy, payload):
    _, _, grid, _, result = _run(loopback, nodes, tmp_path, strategy, hops=3, **{"payload-dtype": payload})
    assert not result["failures"] and not result.get("rejected_replies")
    sent = _train_messages(grid)
    assert sent and all("download-dtype" not in msg.content["config"] for msg in sent)
    # Snake and relay download in payload-dtype, as before; FedAvg in fp32
    wire = {"fp32": {"float32"}, "fp16": {"float16"}, "int8": {"int8", "float16", "float32"}}
    assert all(_dtypes(msg.content["arrays"]) == wire[payload] for msg in sent)


def test_snake_downloads_and_uploads_in_their_own_dtypes(loopback, nodes, tmp_path):
    _, _, grid, replies, result = _run(loopback, nodes, tmp_path, **{"download-dtype": "fp16",
                                                                      "payload-dtype": "int8"})
    assert result["rejected_replies"] == 0 and not result["failures"]
    assert all(_dtypes(msg.content["arrays"]) == {"float16"} for msg in _train_messages(grid))
    assert all("int8" in _dtypes(content["arrays"]) for _, content in replies)


def test_auto_keeps_the_old_downloads_and_fp32_is_fp32_whatever_the_payload():
    from snake_flower.server_app import fedavg_download, snake_download

    assert snake_download(resolve({"payload-dtype": "int8"})) is None  # auto: the payload's, both ways
    assert fedavg_download(resolve({"strategy": "fedavg"})) == "fp32"
    assert snake_download(resolve({"payload-dtype": "int8", "download-dtype": "fp32"})) == "fp32"
    assert fedavg_download(resolve({"strategy": "fedavg", "download-dtype": "int8"})) == "int8"
