"""The CLI's verdict on a finished run: a run in which every round failed is an error."""

from __future__ import annotations

import json

from flwr.app import Error, RecordDict

from snake_flower.config import resolve
from snake_flower.server_app import run
from snake_flower.simulation import load_results


def test_a_run_whose_every_hop_failed_exits_with_a_one_line_error(loopback, nodes, tmp_path, capsys):
    config = resolve({"task": "synthetic", "num-server-rounds": 3, "out-dir": str(tmp_path), "node-backoff": 0})
    node = nodes(2)

    def crash(content: RecordDict, node_id: int) -> RecordDict | Error:
        return Error(code=1, reason="RuntimeError: out of memory") if "arrays" in content else content

    node.tamper = crash
    run(loopback(list(node.contexts), node), config)
    result = json.loads((tmp_path / "snake.json").read_text())
    assert [row["status"] for row in result["rounds"]] == ["failed"] * 3
    assert load_results(config) is None
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "the snake run failed: all 3 rounds failed (first: error reply: RuntimeError: out of memory)" in err


def test_a_run_with_one_merged_hop_is_not_an_error(loopback, nodes, tmp_path, capsys):
    config = resolve({"task": "synthetic", "num-server-rounds": 3, "out-dir": str(tmp_path), "node-backoff": 0})
    node = nodes(2)
    calls = []

    def crash_after_first(content: RecordDict, node_id: int) -> RecordDict | Error:
        if "arrays" in content:
            calls.append(node_id)
            if len(calls) > 1:
                return Error(code=1, reason="RuntimeError: boom")
        return content

    node.tamper = crash_after_first
    run(loopback(list(node.contexts), node), config)
    assert load_results(config) is not None
    assert "2 FAILED rounds" in capsys.readouterr().out
