"""``make_client_app`` with a model that is not in our registry, under SnakeStrategy and FedAvg.

The nodes run in-process behind a LoopbackGrid (tests/conftest.py): the real ClientApp,
real Flower messages and ``Strategy.start``, no Ray.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snake_flower import SnakeStrategy, make_client_app, segment_model

NODES = 3


class Blocks(nn.Module):
    """Nested blocks with BatchNorm: segments get dotted names like ``body.1``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 24)
        self.body = nn.ModuleList([nn.Sequential(nn.Linear(24, 24), nn.BatchNorm1d(24), nn.ReLU())
                                   for _ in range(3)])
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for block in self.body:
            x = block(x)
        return self.head(x)


def _data(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 12, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, 4, (n,), generator=gen)
    return centres[y] + torch.randn(n, 12, generator=gen), y


def _train_data(context: Context) -> DataLoader:
    x, y = _data(int(context.node_config["partition-id"]))
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


class Nodes:
    """NODES nodes running one ClientApp, each with its own context."""

    def __init__(self, app) -> None:
        self.app = app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": NODES})
                         for i in range(NODES)}
        self.calls: list[tuple[str, int]] = []
        self.downloads: list[list[str]] = []  # the keys of each train message's arrays, as received

    def __call__(self, msg: Message) -> RecordDict | Error:
        node = msg.metadata.dst_node_id
        self.calls.append((msg.metadata.message_type, node))
        if msg.metadata.message_type == MessageType.TRAIN:  # the node releases them once loaded
            self.downloads.append([key for record in msg.content.array_records.values() for key in record])
        try:
            return self.app(msg, self.contexts[node]).content
        except Exception as err:  # noqa: BLE001 - a crashing ClientApp is an error reply in Flower
            return Error(code=1, reason=f"{type(err).__name__}: {err}")


def _central_eval():
    x, y = _data(1234, 512)
    model = Blocks()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            return MetricRecord({"loss": float(F.cross_entropy(model(x), y))})

    return evaluate


def _initial() -> tuple[nn.Module, ArrayRecord]:
    torch.manual_seed(0)
    model = Blocks()
    return model, ArrayRecord(model.state_dict())


def test_snake_trains_a_nested_model_every_hop_merged_and_loss_falls(loopback):
    model, arrays = _initial()
    segments = segment_model(model)
    assert any("." in name for name in segments)  # nested names reach the client
    nodes = Nodes(make_client_app(Blocks, _train_data, lr=0.05, local_steps=8))
    strategy = SnakeStrategy(segments, window=1, seed=0, query_timeout=1.0)
    result = strategy.start(grid=loopback(nodes.contexts, nodes), initial_arrays=arrays, num_rounds=8,
                            evaluate_fn=_central_eval())
    assert [hop["status"] for hop in strategy.hops] == ["merged"] * 8
    losses = [result.evaluate_metrics_serverapp[r]["loss"] for r in sorted(result.evaluate_metrics_serverapp)]
    assert losses[-1] < 0.7 * losses[0], losses
    # delta sync from the second visit on: a node gets less than the whole model (no "Missing key(s)")
    assert any(0 < len(hop["segments_sent"]) < len(segments) for hop in strategy.hops[NODES:])
    assert {node for kind, node in nodes.calls if kind == "query"} == set(nodes.contexts)


def test_fedavg_through_the_same_client_replies_with_every_key(loopback):
    model, arrays = _initial()
    nodes = Nodes(make_client_app(Blocks, _train_data, lr=0.05, local_steps=8))
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=NODES)
    result = strategy.start(grid=loopback(nodes.contexts, nodes), initial_arrays=arrays, num_rounds=3,
                            evaluate_fn=_central_eval())
    assert list(result.arrays.keys()) == list(arrays.keys())
    assert len(result.train_metrics_clientapp) == 3  # every round aggregated: no error reply
    losses = [result.evaluate_metrics_serverapp[r]["loss"] for r in sorted(result.evaluate_metrics_serverapp)]
    assert losses[-1] < 0.7 * losses[0], losses


def _snake_message(window: list[str], segments, arrays: ArrayRecord, **extra) -> Message:
    cfg = ConfigRecord({"server-round": 1, "window": window, "sync": "delta", "payload-dtype": "fp32",
                        "segments-sent": list(segments), "segment-versions": [0] * len(segments), **extra})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=100, message_type=MessageType.TRAIN)


def test_kd_follows_kd_for_snake_and_relay_and_never_for_fedavg(loopback, monkeypatch):
    import snake_flower.node as node_module

    seen = []
    real = node_module.train_window
    monkeypatch.setattr(node_module, "train_window",
                        lambda *a, **kw: seen.append(kw["work"].kd_weight) or real(*a, **kw))
    model, arrays = _initial()
    segments = segment_model(model)
    nodes = Nodes(make_client_app(Blocks, _train_data, local_steps=1, kd_weight=0.5))
    window = [next(iter(segments))]
    nodes(_snake_message(window, segments, arrays))
    nodes(_snake_message(list(segments), segments, arrays, strategy="relay"))  # relay distils per kd
    nodes(_snake_message(list(segments), segments, arrays, strategy="relay", kd="off"))
    nodes(_snake_message(window, segments, arrays, kd="auto", partitioner="iid"))  # auto: non-IID only
    nodes(_snake_message(window, segments, arrays, kd="auto"))  # a plugin's message names no partitioner
    nodes(_snake_message(list(segments), segments, arrays, strategy="fedavg"))  # never for FedAvg
    fedavg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "kd-weight": 0.5})}),
                     dst_node_id=101, message_type=MessageType.TRAIN)
    reply = nodes(fedavg)  # Flower's own FedAvg: no window
    assert seen == [0.5, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0]
    assert list(reply["arrays"].keys()) == list(arrays.keys()) and reply["metrics"]["num-examples"] == 32  # one step of 32


def test_window_or_segments_that_differ_from_the_server_get_one_line_errors():
    model, arrays = _initial()
    segments = segment_model(model)
    nodes = Nodes(make_client_app(Blocks, _train_data, local_steps=1))
    error = nodes(_snake_message(["nope"], segments, arrays))
    assert isinstance(error, Error) and "not among this node's segments" in error.reason
    cfg_short = _snake_message([next(iter(segments))], segments, arrays)
    cfg_short.content["config"]["segment-versions"] = [0]
    error = nodes(cfg_short)
    assert isinstance(error, Error) and "segments SnakeStrategy was given" in error.reason
    with pytest.raises(TypeError, match="unknown option 'learning_rate'"):
        make_client_app(Blocks, _train_data, learning_rate=0.1)


def test_strategy_refuses_bad_segments_in_one_line(caplog):
    with pytest.raises(ValueError, match="segment 'relu' has no state_dict keys"):
        SnakeStrategy({"a": ["w"], "relu": [], "b": ["v"]})
    with pytest.raises(ValueError, match="key 'w' is in both 'a' and 'b'"):
        SnakeStrategy({"a": ["w"], "b": ["w", "v"], "c": ["u"]})
    with pytest.raises(ValueError, match="none given"):
        SnakeStrategy({})
    with caplog.at_level(logging.WARNING):
        strategy = SnakeStrategy({"a": ["w"], "b": ["v"]})
    assert "only 2 segment(s)" in caplog.text
    _, arrays = _initial()
    with pytest.raises(ValueError, match=r"1 key\(s\) not in initial_arrays, e.g. \['v'\]"):
        strategy.start(grid=None, initial_arrays=ArrayRecord({"w": arrays["head.bias"]}), num_rounds=1)


def test_a_reply_without_the_window_says_what_a_node_must_send(loopback):
    model, arrays = _initial()
    segments = segment_model(model)
    strategy = SnakeStrategy(segments, window=1, query_timeout=1.0)
    contexts = {7: None}

    def handler(msg: Message) -> RecordDict:
        if msg.metadata.message_type == MessageType.QUERY:
            return RecordDict({"info": MetricRecord({"rank": 0.0})})
        return RecordDict({"metrics": MetricRecord({"num-examples": 1.0})})  # no ArrayRecord

    strategy.start(grid=loopback(contexts, handler), initial_arrays=arrays, num_rounds=1)
    reason = strategy.failures[0]["reason"]
    assert "a node must reply with one ArrayRecord holding exactly the state_dict keys" in reason
    assert strategy.rejected_replies == 1


class TiedLM(nn.Module):
    """Embeddings and an output head that share one weight, as most language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mix = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(1)
        for layer in self.mix:
            x = torch.relu(layer(x))
        return self.head(x)


def _tokens(context: Context) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    x = torch.randint(0, 16, (64, 4), generator=gen)
    return [(x[i:i + 16], x[i:i + 16, 0]) for i in range(0, 64, 16)]


def test_a_tied_weight_is_never_sent_and_its_alias_follows_the_owner(loopback):
    torch.manual_seed(0)
    model = TiedLM()
    segments = segment_model(model)
    assert "head.weight" not in [k for keys in segments.values() for k in keys]
    arrays = ArrayRecord(model.state_dict())  # still holds the alias
    nodes = Nodes(make_client_app(TiedLM, _tokens, lr=0.5, local_steps=4))
    strategy = SnakeStrategy(segments, window=1, train_head=False, sweep="forward", seed=0, query_timeout=1.0)
    grid = loopback(nodes.contexts, nodes)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=4)
    assert [hop["status"] for hop in strategy.hops] == ["merged"] * 4
    assert strategy.aliases == {"head.weight": "embed.weight"}
    assert nodes.downloads and not any("head.weight" in keys for keys in nodes.downloads)
    final = result.arrays
    assert final["head.weight"].numpy().tobytes() == final["embed.weight"].numpy().tobytes()
    assert final["embed.weight"].numpy().tobytes() != arrays["embed.weight"].numpy().tobytes()  # it trained


@pytest.mark.parametrize(("node_config", "says"), [
    ({"partition-id": "first", "num-partitions": 3}, "partition-id must be a whole number"),
    ({"partition-id": -1, "num-partitions": 3}, "partition-id must be a whole number >= 0"),
    ({"partition-id": 1.5, "num-partitions": 3}, "partition-id must be a whole number"),
    ({"partition-id": 3, "num-partitions": 3}, "partition-id 3 must be below num-partitions 3"),
    ({"partition-id": 0, "num-partitions": 0}, "num-partitions must be a whole number >= 1"),
    ({"partition-id": 0, "num-partitions": 3, "data-dir": 7}, "data-dir must be a path"),
    ({"partition-id": 0, "num-partitions": 3, "state-dir": 7}, "state-dir must be a directory path"),
    ({"partition-id": 0, "num-partitions": 3, "state-dir": " "}, "state-dir must be a directory path"),
    ({"partition-id": 0, "num-partitions": 3, "state-dir": __file__}, "is not a directory"),
    ({"partition-id": 0, "num-partitions": 3, "compute": -1.0}, "compute must be > 0"),
])
def test_bad_node_config_gets_a_one_line_error_naming_the_key(loopback, node_config, says):
    model, arrays = _initial()
    segments = segment_model(model)
    nodes = Nodes(make_client_app(Blocks, _train_data, local_steps=1))
    nodes.contexts[100].node_config.clear()
    nodes.contexts[100].node_config.update(node_config)
    error = nodes(_snake_message([next(iter(segments))], segments, arrays))
    assert isinstance(error, Error) and says in error.reason and "\n" not in error.reason
    assert not any((Path(os.environ["XDG_CACHE_HOME"]) / "snake-flower").glob("**/copy.json"))  # nothing kept


def test_a_node_reads_its_data_dir_from_its_node_config_first(tmp_path, monkeypatch):
    import dataclasses

    from snake_flower.client_app import task_data
    from snake_flower.tasks import task as task_module

    synthetic, seen = task_module.TASKS["synthetic"], []
    monkeypatch.setitem(task_module.TASKS, "synthetic", dataclasses.replace(
        synthetic, load=lambda data_dir: seen.append(data_dir) or synthetic.load(data_dir)))
    config = {"task": "synthetic", "data-dir": "/the/servers/dir", "partitioner": "iid", "dirichlet-alpha": 0.5,
              "classes-per-partition": 2, "seed": 0, "validation-size": 0}
    node_config = {"partition-id": 0, "num-partitions": 2}
    own = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={**node_config, "data-dir": str(tmp_path)})
    x, y = task_data(own, config)  # a deployed node's own directory
    task_data(Context(run_id=1, node_id=2, state=RecordDict(), run_config={}, node_config=node_config),
              config)  # a simulated node: the run-config's
    assert seen == [str(tmp_path), "/the/servers/dir"] and len(x) == len(y) > 0
    gone = Context(run_id=1, node_id=3, state=RecordDict(), run_config={},
                   node_config={**node_config, "data-dir": str(tmp_path / "gone")})
    with pytest.raises(ValueError, match="node-config: data-dir '.*gone' is not a directory"):
        task_data(gone, config)
