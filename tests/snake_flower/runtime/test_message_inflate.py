"""A received message inflated with its chunks freed as it goes: Flower's objects, half the memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from snake_flower.runtime import flower_patches
from snake_flower.runtime.flower_patches import STOCK_ENV, patch_message_inflate
from snake_flower.runtime.message_inflate import inflate_releasing_children, releasing_children

FLOWER_INFLATE = inflatable_utils.inflate_object_from_contents
MIB = 2**20


@pytest.fixture(autouse=True)
def flower_inflate(monkeypatch):
    """Each test starts from Flower's own function, checked afresh."""
    monkeypatch.delenv(STOCK_ENV, raising=False)
    monkeypatch.setattr(inflatable_utils, "inflate_object_from_contents", FLOWER_INFLATE)
    flower_patches.reset_checks()
    yield
    flower_patches.reset_checks()


def model_message() -> Message:
    """Eight 6 MiB arrays (two 5 MB chunks each), a repeated one and two sharing a chunk of zeros."""
    rng = np.random.default_rng(0)
    arrays = {f"layer{i}": rng.standard_normal(6 * MIB // 4).astype(np.float32) for i in range(8)}
    arrays["tied"] = arrays["layer0"]  # the same Array object id twice in one record
    arrays["zeros_a"] = np.zeros(6 * MIB // 4, np.float32)
    arrays["zeros_b"] = np.concatenate([np.zeros(5_242_880 // 4, np.float32), np.ones(9, np.float32)])
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord({"hop": 3})})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def deflated(message: Message) -> dict[str, bytes]:
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def traced_peak(inflate, message: Message):
    """What ``inflate`` builds from ``message``'s deflated objects, and the most it allocated on
    top of them (bytes): the objects' bytes are made under the trace too, so freeing them counts."""
    tracemalloc.start()
    try:
        contents = deflated(message)
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        obj = inflate(message.object_id, contents)
        assert contents == {}  # every object's bytes left the dict, as with keep_object_contents=False
        return obj, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_the_same_message_as_flowers_with_each_chunk_freed_once_its_array_is_built():
    sent = model_message()
    root = sent.object_id
    theirs, their_peak = traced_peak(FLOWER_INFLATE, sent)
    ours, our_peak = traced_peak(inflate_releasing_children, sent)
    assert ours.object_id == theirs.object_id == root
    for key, array in theirs.content["arrays"].items():
        np.testing.assert_array_equal(ours.content["arrays"][key].numpy(), array.numpy())
    assert ours.content["config"]["hop"] == 3
    message_bytes = sum(len(array.data) for array in theirs.content["arrays"].values())
    # Flower's memo keeps all chunks to the end: the message once more; ours, one array at a time
    assert their_peak > 0.9 * message_bytes
    assert our_peak < 3 * 6 * MIB < 0.4 * message_bytes


def test_the_patch_is_what_a_clientapps_pull_inflates_with():
    sent = model_message()
    contents = deflated(sent)
    assert patch_message_inflate() and patch_message_inflate()  # twice: applied once
    patched = inflatable_utils.inflate_object_from_contents
    assert patched is not FLOWER_INFLATE and patched.releases_children
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0])
        return patched(*args, **kwargs)
    inflatable_utils.inflate_object_from_contents = spy  # the fixture restores Flower's
    got = inflatable_utils.pull_and_inflate_object_from_tree(get_object_tree(sent), contents.__getitem__,
                                                             lambda object_id: None, max_time=5)
    assert calls == [sent.object_id] and got.object_id == sent.object_id


def test_a_caller_that_keeps_contents_or_its_memo_gets_flowers_own_inflation():
    sent = model_message()
    calls = []

    def flower(*args, **kwargs):
        calls.append(kwargs)
        return FLOWER_INFLATE(*args, **kwargs)
    inflate = releasing_children(flower)
    contents = deflated(sent)
    assert inflate(sent.object_id, contents, keep_object_contents=True).object_id == sent.object_id
    assert len(contents) == len(get_all_nested_objects(sent))  # kept, as asked
    assert calls == [{"keep_object_contents": True, "objects": None}]
    assert inflate(sent.object_id, contents).object_id == sent.object_id and len(calls) == 1


def test_stock_flower_keeps_flowers_inflation(monkeypatch):
    monkeypatch.setenv(STOCK_ENV, "1")
    assert not patch_message_inflate()
    assert inflatable_utils.inflate_object_from_contents is FLOWER_INFLATE
