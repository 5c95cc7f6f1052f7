"""Hostile replies, generated: every one is rejected, counted, and the global model is unchanged."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import SnakeStrategy
from strategies.payload import SCALE, encode

SEGMENTS = {"s0": ["s0.w"], "s1": ["s1.w", "s1.b"], "s2": ["s2.w"], "head": ["head.w"]}
ALL_KEYS = [k for keys in SEGMENTS.values() for k in keys]
MAX_NORM = 10.0


def model_sha256(arrays: ArrayRecord) -> str:
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(key.encode() + array.dtype.encode() + str(tuple(array.shape)).encode() + array.data)
    return digest.hexdigest()


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.full((2, 2), i, np.float32)) for i, k in enumerate(ALL_KEYS)})


def one_hop(loopback, hop: int, payload_dtype: str = "fp32"):
    """A strategy that has just sent hop ``hop``: (strategy, its message, the window keys)."""
    strategy = SnakeStrategy(SEGMENTS, 1, seed=0, max_update_norm=MAX_NORM, payload_dtype=payload_dtype)
    grid = loopback([11, 12], lambda msg: RecordDict({"info": MetricRecord({"rank": msg.metadata.dst_node_id})}))
    (msg,) = strategy.configure_train(hop, initial(), ConfigRecord({}), grid)
    keys = [k for name in strategy.hops[-1]["window"] for k in SEGMENTS[name]]
    return strategy, msg, keys


def honest(keys: list[str]) -> dict[str, Array]:
    start = initial()
    return {k: Array(start[k].numpy() + 0.5) for k in keys}


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


# each mutation: (data, window arrays, window keys) -> arrays, or raises nothing; all are hostile
@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["extra", "missing", "shape", "dtype", "nonfinite", "oversized",
                                 "garbage", "norm", "lying-shape"]))
    key_index = draw(st.integers(0, 10))
    return kind, key_index, draw(st.data())


def mutate(arrays: dict[str, Array], keys: list[str], kind: str, key_index: int, data) -> dict[str, Array]:
    arrays = dict(arrays)
    key = keys[key_index % len(keys)]
    base = initial()[key].numpy() + 0.5  # the honest value (arrays[key] may be garbage already)
    if kind == "extra":  # a layer the node was not given, or a key the model does not have
        outside = [k for k in ALL_KEYS if k not in keys]
        name = data.draw(st.one_of(st.sampled_from(outside), st.text(min_size=1, max_size=12)
                                   .filter(lambda t: t not in keys)))
        arrays[name] = Array(np.ones((2, 2), np.float32))
    elif kind == "missing":  # removing every key leaves a reply with no window at all
        arrays.pop(key, None)
    elif kind == "shape":
        shape = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
                          .filter(lambda s: s != (2, 2)))
        arrays[key] = Array(np.ones(shape, np.float32))
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.int64, np.uint8]))
        arrays[key] = Array(base.astype(dtype))
    elif kind == "nonfinite":
        bad = base.copy()
        bad.flat[data.draw(st.integers(0, 3))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[key] = Array(bad)
    elif kind == "oversized":  # declares (2, 2) but carries more
        big = np.ones((data.draw(st.integers(5, 4096)),), np.float32)
        arrays[key] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=_npy(big))
    elif kind == "lying-shape":  # declares (2, 2), carries another shape of the same size
        arrays[key] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray",
                            data=_npy(np.ones((4,), np.float32)))
    elif kind == "garbage":
        junk = data.draw(st.binary(min_size=0, max_size=64))
        arrays[key] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=junk)
    elif kind == "norm":  # finite, right shape, but pushed far in one hop
        scale = data.draw(st.floats(MAX_NORM, 1e30, allow_nan=False))
        arrays[key] = Array((base + scale).astype(np.float32))
    return arrays


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hop=st.integers(1, 12), steps=st.lists(mutations(), min_size=1, max_size=3),
       extra_record=st.booleans())
def test_generated_hostile_replies_are_all_rejected(loopback, hop, steps, extra_record):
    strategy, msg, keys = one_hop(loopback, hop)
    before = model_sha256(strategy._arrays)
    arrays = honest(keys)
    for kind, key_index, data in steps:
        arrays = mutate(arrays, keys, kind, key_index, data)
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})})
    if extra_record:  # a second ArrayRecord smuggled beside the window
        content["more"] = ArrayRecord({"s0.w": Array(np.zeros((2, 2), np.float32))})
    reply = Message(content, reply_to=msg)
    assert reply.metadata.src_node_id == msg.metadata.dst_node_id
    merged, _ = strategy.aggregate_train(hop, [reply])
    assert merged is None
    assert strategy.rejected_replies == 1 and strategy.hops[-1]["status"] == "failed"
    assert strategy.failures[-1]["reason"].startswith("rejected reply: ")
    assert model_sha256(strategy._arrays) == before == model_sha256(initial())
    assert all(v == 0 for v in strategy.versions.values())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hop=st.integers(1, 12))
def test_the_honest_reply_is_merged(loopback, hop):
    """The control: the same harness accepts an honest window, so rejection is not a given."""
    strategy, msg, keys = one_hop(loopback, hop)
    reply = Message(RecordDict({"arrays": ArrayRecord(honest(keys)), "metrics": MetricRecord({})}), reply_to=msg)
    merged, _ = strategy.aggregate_train(hop, [reply])
    assert merged is not None and strategy.rejected_replies == 0
    assert {k for k in ALL_KEYS if not np.array_equal(merged[k].numpy(), initial()[k].numpy())} == set(keys)


# ---- int8 payloads: the encoding itself is attacked ------------------------------
INT8_KINDS = ["missing-scale", "scale-shape", "scale-dtype", "scale-nonfinite", "scale-negative",
              "scale-outside", "stray-scale", "not-int8", "int8-min", "scale-garbage"]


def mutate_int8(arrays: dict[str, Array], keys: list[str], kind: str, key_index: int, data) -> dict[str, Array]:
    arrays = dict(arrays)
    key = keys[key_index % len(keys)]
    scale = key + SCALE
    if kind == "missing-scale":
        arrays.pop(scale, None)
    elif kind == "scale-shape":
        shape = data.draw(st.lists(st.integers(0, 3), max_size=2).map(tuple).filter(lambda s: s != (2,)))
        arrays[scale] = Array(np.ones(shape, np.float32))
    elif kind == "scale-dtype":
        dtype = data.draw(st.sampled_from([np.float64, np.float16, np.int32]))
        arrays[scale] = Array(np.ones(2, dtype))
    elif kind == "scale-nonfinite":
        arrays[scale] = Array(np.array([data.draw(st.sampled_from([np.nan, np.inf, -np.inf])), 1.0], np.float32))
    elif kind == "scale-negative":
        arrays[scale] = Array(np.array([-data.draw(st.floats(1e-6, 1.0)), 0.1], np.float32))
    elif kind == "scale-outside":  # a scaled int8 layer the node was not given
        outside = data.draw(st.sampled_from([k for k in ALL_KEYS if k not in keys]))
        arrays.update({outside: Array(np.ones((2, 2), np.int8)), outside + SCALE: Array(np.ones(2, np.float32))})
        if data.draw(st.booleans()):
            arrays.pop(outside)  # ... or only its scale
    elif kind == "stray-scale":  # a scale for a key that does not exist at all
        arrays[data.draw(st.text(min_size=1, max_size=8)) + SCALE] = Array(np.ones(2, np.float32))
    elif kind == "not-int8":  # the right values, the wrong encoding
        dtype = data.draw(st.sampled_from([np.float32, np.float16, np.int16]))
        arrays[key] = Array((initial()[key].numpy() + 0.5).astype(dtype))
    elif kind == "int8-min":
        arrays[key] = Array(np.full((2, 2), -128, np.int8))
    elif kind == "scale-garbage":
        junk = data.draw(st.binary(max_size=32))
        arrays[scale] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=junk)
    return arrays


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hop=st.integers(1, 12), kind=st.sampled_from(INT8_KINDS), key_index=st.integers(0, 10), data=st.data())
def test_hostile_int8_replies_are_all_rejected(loopback, hop, kind, key_index, data):
    strategy, msg, keys = one_hop(loopback, hop, "int8")
    arrays = mutate_int8(dict(encode(ArrayRecord(honest(keys)), "int8").items()), keys, kind, key_index, data)
    reply = Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({})}), reply_to=msg)
    merged, _ = strategy.aggregate_train(hop, [reply])
    assert merged is None, kind
    assert strategy.rejected_replies == 1 and strategy.failures[-1]["reason"].startswith("rejected reply: ")
    assert model_sha256(strategy._arrays) == model_sha256(initial())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hop=st.integers(1, 12))
def test_the_honest_int8_reply_is_merged_as_fp32(loopback, hop):
    strategy, msg, keys = one_hop(loopback, hop, "int8")
    sent = msg.content["arrays"]
    assert all(sent[k].dtype == "int8" and k + SCALE in sent for k in ALL_KEYS)  # the downlink too
    reply = Message(RecordDict({"arrays": encode(ArrayRecord(honest(keys)), "int8"),
                                "metrics": MetricRecord({})}), reply_to=msg)
    merged, _ = strategy.aggregate_train(hop, [reply])
    assert merged is not None and strategy.rejected_replies == 0
    assert list(merged.keys()) == ALL_KEYS and all(merged[k].dtype == "float32" for k in ALL_KEYS)
    for k in keys:  # the master is fp32, within half a quantization step of the reply
        want = honest(keys)[k].numpy()
        assert np.allclose(merged[k].numpy(), want, atol=np.abs(want).max() / 254 + 1e-7)
