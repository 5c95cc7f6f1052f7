"""payload-dtype: encode and decode ArrayRecords as fp32, fp16 or per-channel int8."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.payload import SCALE, PayloadError, decode, dequantize, encode, quantize


def _record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({"conv.weight": Array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
                        "conv.bias": Array(rng.standard_normal(8).astype(np.float32)),
                        "fc.weight": Array((rng.standard_normal((10, 32)) * 1e-3).astype(np.float32)),
                        "bn.num_batches_tracked": Array(np.array(7, np.int64))})


@pytest.mark.parametrize("payload,rtol", [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1 / 127)])
def test_round_trip_restores_float32_under_the_original_keys(payload, rtol):
    record = _record()
    back = decode(encode(record, payload), payload, reference=record)
    assert list(back.keys()) == list(record.keys())
    for key in record.keys():
        want, got = record[key].numpy(), back[key].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.allclose(got, want, rtol=0, atol=rtol * np.abs(want).max()), key


def test_int8_wire_format():
    wire = encode(_record(), "int8")
    assert list(wire.keys()) == ["conv.weight", "conv.weight" + SCALE, "conv.bias", "fc.weight",
                                 "fc.weight" + SCALE, "bn.num_batches_tracked"]
    assert [wire[k].dtype for k in wire.keys()] == ["int8", "float32", "float16", "int8", "float32", "int64"]
    assert wire["conv.weight" + SCALE].shape == (8,)
    assert all(v.dtype == "float16" for v in encode(_record(), "fp16").values() if v.dtype != "int64")


def test_requantizing_a_decoded_int8_tensor_reproduces_it_exactly():
    rng = np.random.default_rng(1)
    for _ in range(500):
        w = (rng.standard_normal((6, 5)) * 10.0 ** rng.uniform(-8, 4)).astype(np.float32)
        q, scale = quantize(w)
        assert (np.abs(q).max(axis=1) == 127).all()  # each channel's max maps to 127
        once = dequantize(q, scale)
        q2, scale2 = quantize(once)
        assert np.array_equal(q2, q) and np.array_equal(scale2, scale)
        assert np.array_equal(dequantize(q2, scale2), once)


def test_an_all_zero_channel_stays_zero():
    w = np.zeros((2, 3), np.float32)
    w[1] = [1.0, -2.0, 0.5]
    q, scale = quantize(w)
    assert scale[0] == 0 and not q[0].any() and np.array_equal(dequantize(q, scale)[0], w[0])


def _tamper(key: str, value: Array | None) -> ArrayRecord:
    wire = dict(encode(_record(), "int8").items())
    if value is None:
        wire.pop(key)
    else:
        wire[key] = value
    return ArrayRecord(wire)


@pytest.mark.parametrize("wire,match", [
    (_tamper("fc.weight" + SCALE, None), "without its scale"),
    (_tamper("fc.weight" + SCALE, Array(np.ones(3, np.float32))), "shape"),
    (_tamper("fc.weight" + SCALE, Array(np.ones(10, np.float64))), "float32"),
    (_tamper("fc.weight" + SCALE, Array(np.full(10, np.nan, np.float32))), "finite"),
    (_tamper("fc.weight", None), "scale without"),
    (_tamper("fc.weight", Array(np.ones((10, 32), np.float16))), "expected int8"),
    (_tamper("conv.bias", Array(np.ones(8, np.float32))), "expected float16"),
    (_tamper("nobody" + SCALE, Array(np.ones(2, np.float32))), "scale without"),
])
def test_malformed_int8_payloads_raise_payload_error(wire, match):
    with pytest.raises(PayloadError, match=match):
        decode(wire, "int8", reference=_record())


def test_a_scale_under_another_payload_dtype_is_refused():
    with pytest.raises(PayloadError, match="scale without"):
        decode(encode(_record(), "int8"), "fp16")
