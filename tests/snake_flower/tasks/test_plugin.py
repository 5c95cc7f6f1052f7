"""Task plugins (``task = "package.module:factory"``) through the real ServerApp and ClientApp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snake_flower.config import ConfigError, resolve
from snake_flower.server_app import run

PLUGIN = "task_plugin.task:make_synthetic_task"


@pytest.fixture(autouse=True)
def _plugin_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "examples" / "task-plugin"))


def test_plugin_runs_with_nested_segments_and_a_frozen_nested_segment(loopback, nodes, tmp_path):
    config = resolve({"task": PLUGIN, "num-server-rounds": 5, "out-dir": str(tmp_path), "local-steps": 3,
                      "window": 1, "frozen-segments": "stages.0.0"})
    node = nodes(2)
    run(loopback(list(node.contexts), node), config)
    result = json.loads((tmp_path / "snake.json").read_text())
    assert [row["status"] for row in result["rounds"]] == ["merged"] * 5
    windows = [name for row in result["rounds"] for name in row["window"]]
    assert "stages.0.1" in windows and "stages.0.0" not in windows
    assert "stages.0.0" not in result["provenance"]


def test_plugin_errors_are_one_line():
    with pytest.raises(ConfigError, match="frozen-segments: stages.9 not among the segments"):
        resolve({"task": PLUGIN, "frozen-segments": "stages.9"})
    with pytest.raises(ConfigError, match="split learning runs the built-in tasks only"):
        resolve({"task": PLUGIN, "strategy": "split"})
    with pytest.raises(ConfigError, match=r"task: cannot load 'task_plugin.task:nope': AttributeError"):
        resolve({"task": "task_plugin.task:nope"})
