"""Reply validation and window merging on plain ArrayRecords."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies import check_window, merge_window, select


@pytest.fixture
def model() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({"a.weight": Array(rng.normal(size=(3, 2)).astype(np.float32)),
                        "a.bias": Array(np.zeros(3, np.float32)),
                        "b.weight": Array(rng.normal(size=(2, 3)).astype(np.float32)),
                        "b.steps": Array(np.array(4, dtype=np.int64))})


def _window(model: ArrayRecord, **changes: np.ndarray) -> ArrayRecord:
    out = {k: model[k].numpy().copy() for k in ("b.weight", "b.steps")}
    out.update(changes)
    return ArrayRecord({k: Array(v) for k, v in out.items()})


def test_merge_replaces_only_the_window(model):
    window = _window(model, **{"b.weight": np.ones((2, 3), np.float32)})
    merged = merge_window(model, window)
    assert list(merged.keys()) == list(model.keys())
    np.testing.assert_array_equal(merged["b.weight"].numpy(), np.ones((2, 3)))
    for key in ("a.weight", "a.bias", "b.steps"):
        np.testing.assert_array_equal(merged[key].numpy(), model[key].numpy())
    assert not np.array_equal(model["b.weight"].numpy(), np.ones((2, 3)))  # input untouched


def test_merge_refuses_keys_outside_the_model(model):
    with pytest.raises(KeyError):
        merge_window(model, ArrayRecord({"z": Array(np.zeros(1, np.float32))}))


def test_valid_window_passes(model):
    assert check_window(_window(model), model, ["b.weight", "b.steps"]) is None


@pytest.mark.parametrize("make,why", [
    (lambda m: ArrayRecord({**{k: m[k] for k in ("b.weight", "b.steps")}, "a.bias": m["a.bias"]}), "extra keys"),
    (lambda m: select(m, ["b.weight"]), "missing keys"),
    (lambda m: _window(m, **{"b.weight": np.ones((3, 2), np.float32)}), "shape"),
    (lambda m: _window(m, **{"b.weight": np.ones((2, 3), np.float64)}), "dtype"),
    (lambda m: _window(m, **{"b.weight": np.full((2, 3), np.nan, np.float32)}), "non-finite"),
    (lambda m: _window(m, **{"b.weight": np.full((2, 3), np.inf, np.float32)}), "non-finite"),
    (lambda m: None, "no ArrayRecord"),
])
def test_bad_windows_are_refused(model, make, why):
    reason = check_window(make(model), model, ["b.weight", "b.steps"])
    assert reason is not None and why in reason


def test_lying_array_header_is_refused(model):
    fake = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"not an array")
    reply = ArrayRecord({"b.weight": fake, "b.steps": model["b.steps"]})
    assert "b.weight" in check_window(reply, model, ["b.weight", "b.steps"])


def test_relative_drift(model):
    from strategies.window import relative_drift

    moved = ArrayRecord({**{k: model[k] for k in model.keys()},
                         "b.weight": Array(model["b.weight"].numpy() * 1.1)})
    assert relative_drift(model, model, ["a.weight", "b.weight"]) == 0.0
    assert abs(relative_drift(moved, model, ["b.weight"]) - 0.1) < 1e-6
    both = relative_drift(moved, model, ["a.weight", "b.weight"])
    assert 0.0 < both < 0.1
    assert relative_drift(moved, model, ["b.steps"]) == 0.0  # integers are not compared
