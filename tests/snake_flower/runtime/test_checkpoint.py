"""Checkpoints: atomic, complete, and refused for a different run."""

from __future__ import annotations

import random

import pytest
import torch
from flwr.app import ArrayRecord

from snake_flower.config import ConfigError, resolve
from snake_flower.runtime.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from snake_flower.runtime.results import model_sha256
from snake_flower.tasks.task import TASKS, build_model


def _saved(tmp_path, **overrides):
    config = resolve({"task": "synthetic", "out-dir": str(tmp_path), **overrides})
    arrays = ArrayRecord(build_model(TASKS["synthetic"], 3).state_dict())
    path = checkpoint_path(config)
    save_checkpoint(path, arrays, {"config": config.as_dict(), "strategy": {"rounds-done": 4}, "recorder": {}})
    return config, arrays, path


def test_round_trip_keeps_model_state_and_random_state(tmp_path):
    config, arrays, path = _saved(tmp_path)
    assert path == tmp_path / "snake.ckpt" and not path.with_name("snake.ckpt.tmp").exists()
    expected_random, expected_torch = random.random(), torch.rand(3)
    random.random(), torch.rand(5)  # move both streams on
    random.seed(0)
    # num-server-rounds is free on resume, like hop-timeout and out-dir
    loaded, state = load_checkpoint(path, config.replace(num_server_rounds=200))
    assert model_sha256(loaded) == model_sha256(arrays)
    assert state["strategy"]["rounds-done"] == 4
    # the random state saved before the draws above is back
    assert random.random() == expected_random and torch.equal(torch.rand(3), expected_torch)


def test_a_different_run_config_is_refused_in_one_line(tmp_path):
    config, _, path = _saved(tmp_path)
    with pytest.raises(ConfigError, match=r"^resume: .* written with lr=0.05, this run has lr=0.1"):
        load_checkpoint(path, config.replace(lr=0.1))
    with pytest.raises(ConfigError, match="num-server-rounds: 3 is fewer than the 4 rounds"):
        load_checkpoint(path, config.replace(num_server_rounds=3))


def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default(tmp_path):
    config = resolve({"task": "synthetic", "out-dir": str(tmp_path)})
    older = {k: v for k, v in config.items() if k not in ("concurrency", "lanes", "crash-round")}
    save_checkpoint(checkpoint_path(config), ArrayRecord(build_model(TASKS["synthetic"], 3).state_dict()),
                    {"config": older, "strategy": {"rounds-done": 4}, "recorder": {}})
    assert load_checkpoint(checkpoint_path(config), config)[1]["strategy"]["rounds-done"] == 4
    # ... but not when this run sets the new key otherwise
    with pytest.raises(ConfigError, match="written with concurrency=1, this run has concurrency=2"):
        load_checkpoint(checkpoint_path(config), config.replace(concurrency=2))


def test_a_torn_checkpoint_is_refused_in_one_line(tmp_path):
    config, _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="^resume: .* is not a readable checkpoint"):
        load_checkpoint(path, config)


def test_resume_is_for_snake_only():
    with pytest.raises(ConfigError, match="resume: only strategies snake and relay"):
        resolve({"strategy": "fedavg", "resume": True})
