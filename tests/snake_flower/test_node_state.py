"""A Snake node's copy of the model on its disk (``node_store.py``): restarts, losses, damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from snake_flower.config import resolve
from snake_flower.node import stored_copy
from snake_flower.node_store import NodeStore, node_state_dir
from snake_flower.server_app import run

SEGMENTS = ["conv1", "conv2", "conv3", "fc1", "head"]


def _run(loopback, nodes, tmp_path, name, sync="delta", after_hop=None, hops=9):
    """A synthetic Snake run on 3 in-process nodes; ``after_hop(hop, node_id, nodes)`` runs after
    each reply (the node's copy is on its disk by then). Returns the results."""
    out = tmp_path / name
    config = resolve({"task": "synthetic", "num-server-rounds": hops, "out-dir": str(out), "local-steps": 2,
                      "partitioner": "iid", "sync": sync})
    node = nodes(3)
    replies = []

    def tamper(content, node_id):
        if "arrays" not in content:  # the rank query's reply, or a node asking for a full sync
            return content
        replies.append(node_id)
        if after_hop is not None:
            after_hop(len(replies), node_id, node)
        return content

    node.tamper = tamper
    run(loopback(list(node.contexts), node), config)
    return json.loads((out / "snake.json").read_text()), node


def _directory(node, node_id) -> Path:
    context = node.contexts[node_id]
    return node_state_dir(None, context.run_id, context.node_config["partition-id"], node_id)


def _next_visit(result, hop, node_id, **default):
    """The row of ``node_id``'s first hop after hop ``hop``."""
    return next((row for row in result["rounds"][hop:] if row["nodes"] == [node_id]), *default.values())


def test_a_node_restarts_with_its_state_directory_and_resumes_with_delta_sync(loopback, nodes, tmp_path):
    clean, _ = _run(loopback, nodes, tmp_path, "clean")
    restarted = {}

    def restart(hop, node_id, node):  # a new process: nothing of the old one but its disk
        if hop == 2:
            old = node.contexts[node_id]
            node.contexts[node_id] = Context(run_id=old.run_id, node_id=node_id, node_config=dict(old.node_config),
                                             state=RecordDict(), run_config={})
            restarted["node"] = node_id

    result, _ = _run(loopback, nodes, tmp_path, "restart", after_hop=restart)
    assert result["failures"] == []
    visit = _next_visit(result, 2, restarted["node"])
    assert visit["segments_sent"] == clean["rounds"][visit["round"] - 1]["segments_sent"]  # as if never restarted
    assert any(len(row["segments_sent"]) < len(SEGMENTS) for row in result["rounds"])  # deltas, really
    assert result["final"]["model_sha256"] == clean["final"]["model_sha256"]


def _lose(directory: Path) -> None:
    NodeStore(directory).remove()


def _half_write(directory: Path) -> None:
    """A segment file cut short, as a disk that lost its last blocks leaves it."""
    files = json.loads((directory / "copy.json").read_text())["files"]
    path = directory / files["conv2"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_lose, _half_write])
@pytest.mark.parametrize("sync", ["delta", "window"])
def test_a_lost_or_damaged_copy_costs_one_full_resync(loopback, nodes, tmp_path, damage, sync):
    clean, _ = _run(loopback, nodes, tmp_path, "clean", sync=sync)
    # a hop whose node's next visit is sent less than the whole model: there the loss shows
    hop = next(row["round"] for row in clean["rounds"]
               if len(_next_visit(clean, row["round"], row["nodes"][0], default={}).get("segments_sent", SEGMENTS))
               < len(SEGMENTS))
    damaged = {}

    def hit(done, node_id, node):
        if done == hop:
            damage(_directory(node, node_id))
            damaged["node"] = node_id

    result, node = _run(loopback, nodes, tmp_path, "damaged", sync=sync, after_hop=hit)
    assert result["failures"] == []  # every hop merged: the node said so and was sent everything
    visit = _next_visit(result, hop, damaged["node"])
    more = [row["round"] for row, was in zip(result["rounds"], clean["rounds"]) if row["bytes_down"] != was["bytes_down"]]
    assert more == [visit["round"]]  # one hop sent twice: its delta, then the whole model
    assert visit["segments_sent"] == SEGMENTS
    assert visit["bytes_down"] > clean["rounds"][visit["round"] - 1]["bytes_down"]
    copy = stored_copy(node.contexts[damaged["node"]])
    assert copy is not None and set(copy.versions) == set(SEGMENTS)  # a whole copy again
    if sync == "delta":  # a delta-synced node trains on the model as the server has it: no change
        assert result["final"]["model_sha256"] == clean["final"]["model_sha256"]
    else:  # window sync trains on the node's own copy, which is gone: it trains on the server's
        assert result["final"]["model_sha256"] != clean["final"]["model_sha256"]


def test_two_nodes_and_two_runs_never_share_a_directory(loopback, nodes, tmp_path):
    _, node = _run(loopback, nodes, tmp_path, "run", hops=3)
    directories = {_directory(node, node_id) for node_id in node.contexts}
    assert len(directories) == 3 and all((d / "copy.json").exists() for d in directories)
    copies = [stored_copy(context) for context in node.contexts.values()]
    assert len({json.dumps(copy.versions, sort_keys=True) for copy in copies}) == 3  # each its own hop
    other_run = node_state_dir(None, 2, 0, 1000)
    assert other_run not in directories and other_run.parent != next(iter(directories)).parent
    assert node_state_dir("/x", 1, None, 5) != node_state_dir("/x", 1, None, 6)  # no partition: node id


def test_a_crash_while_writing_leaves_the_old_copy(tmp_path, monkeypatch):
    import torch

    store = NodeStore(tmp_path / "node")
    old = store.write({"a.w": torch.zeros(3), "b.w": torch.ones(2)}, {"a": ["a.w"], "b": ["b.w"]}, {"a": 0, "b": 0})
    real = os.replace

    def crash(src, dst):  # the process dies as the new manifest is put in place
        if str(dst).endswith("copy.json"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write({"a.w": torch.full((3,), 7.0)}, {"a": ["a.w"]}, {"a": 1, "b": 0}, old)
    monkeypatch.setattr(os, "replace", real)
    copy = store.read()
    assert copy.versions == {"a": 0, "b": 0} and torch.equal(copy.tensors["a.w"], torch.zeros(3))
    new = store.write({"a.w": torch.full((3,), 7.0)}, {"a": ["a.w"]}, {"a": 1, "b": 0}, copy)
    assert torch.equal(new.tensors["a.w"], torch.full((3,), 7.0)) and torch.equal(new.tensors["b.w"], torch.ones(2))
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(["copy.json", *new.files.values()])


def test_a_node_builds_its_model_on_the_meta_device_and_loads_what_it_holds(loopback, nodes, tmp_path,
                                                                             monkeypatch):
    import torch

    import snake_flower.client_app as client_app

    devices = []
    real = client_app.build_model
    monkeypatch.setattr(client_app, "build_model",
                        lambda *args: devices.append(torch.get_default_device().type) or real(*args))
    clean, _ = _run(loopback, nodes, tmp_path, "meta", hops=6)
    assert devices == ["meta"] * 6  # no seeded fp32 build on a node: every tensor came from disk or the message
    assert clean["failures"] == []
