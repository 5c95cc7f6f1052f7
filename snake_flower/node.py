"""``make_client_app``: the node side of Snake for any PyTorch model, in one call.

One ClientApp serves every strategy (docs/protocol.md has the message protocol):

- a Snake message (its config has a ``window``) loads the partial download over the
  node's own copy of the model (kept in ``context.state``), checks that the copy is
  current (delta sync), trains the window alone and replies with exactly the window's
  keys, encoded in the message's ``payload-dtype``;
- a message without a ``window`` (Flower's ``FedAvg``, or any strategy that sends the
  whole model) trains every segment and replies with every key it received;
- a ``query`` message gets the node's rank (its ``partition-id``), which orders the chain.

Knowledge distillation is used only on a Snake window smaller than the whole model and
only if the message's config asks for it (``kd-weight > 0``); FedAvg and relay messages
(``strategy = "fedavg" | "relay"``, or a window of every segment) never distil.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from snake_flower.segments import segment_model
from snake_flower.tasks.task import transport_state
from snake_flower.training.loop import evaluate as _evaluate_tensors
from snake_flower.training.window import split_batch, train_window
from strategies.payload import decode, encode

ModelFn = Callable[[], nn.Module]
DataFn = Callable[[Context], Iterable]

_OPTIONS = {"lr": 0.01, "momentum": 0.9, "weight-decay": 0.0, "local-steps": 0, "local-epochs": 1,
            "clip-norm": 1.0, "kd-weight": 0.0, "kd-temperature": 2.0, "seed": 0}
_NO_KD = ("fedavg", "relay")


def make_client_app(model_fn: ModelFn, train_data_fn: DataFn, *,
                    segments: Mapping[str, list[str]] | None = None,
                    evaluate_data_fn: DataFn | None = None, **options: float) -> ClientApp:
    """A Flower ``ClientApp`` that trains your model under ``SnakeStrategy`` or ``FedAvg``.

    Parameters
    ----------
    model_fn : Callable[[], nn.Module]
        Builds the model (called with ``torch.manual_seed(seed)`` set); maps inputs to logits.
    train_data_fn : Callable[[Context], Iterable]
        This node's training batches of ``(inputs, labels)``, e.g. a ``DataLoader`` over the
        partition ``context.node_config["partition-id"]``; dict batches such as Flower
        Datasets give (``{"img": ..., "label": ...}``) work too. Called on every hop: cache
        what is slow to load.
    segments : Mapping[str, list[str]] | None
        The segments, exactly as given to ``SnakeStrategy``; ``None`` means
        ``segment_model(model_fn())`` with its defaults.
    evaluate_data_fn : Callable[[Context], Iterable] | None
        Batches for ``@app.evaluate`` (FedAvg's client-side evaluation). Without it an
        evaluate message gets an error reply: set ``fraction_evaluate=0`` and evaluate
        on the server (``evaluate_fn``), as ``SnakeStrategy`` always does.
    **options
        Defaults of the local work, overridden by the same key in each message's config:
        ``lr`` (0.01), ``momentum`` (0.9), ``weight_decay`` (0), ``local_steps`` (0: use
        epochs), ``local_epochs`` (1), ``clip_norm`` (1.0), ``kd_weight`` (0),
        ``kd_temperature`` (2.0), ``seed`` (0).

    Returns
    -------
    flwr.clientapp.ClientApp
    """
    defaults = dict(_OPTIONS)
    for name, value in options.items():
        key = name.replace("_", "-")
        if key not in _OPTIONS:
            raise TypeError(f"make_client_app: unknown option {name!r} (known: "
                            f"{', '.join(k.replace('-', '_') for k in _OPTIONS)})")
        defaults[key] = value
    node = _Node(model_fn, train_data_fn, evaluate_data_fn, segments, defaults)
    app = ClientApp()
    app.train()(node.train)
    app.evaluate()(node.evaluate)
    app.query()(node.query)
    return app


class _Node:
    """What ``make_client_app``'s handlers share: the model builder, segments and defaults."""

    def __init__(self, model_fn: ModelFn, train_data_fn: DataFn, evaluate_data_fn: DataFn | None,
                 segments: Mapping[str, list[str]] | None, defaults: dict[str, Any]) -> None:
        self.model_fn, self.train_data_fn, self.evaluate_data_fn = model_fn, train_data_fn, evaluate_data_fn
        self.defaults = defaults
        self._segments = {name: list(keys) for name, keys in segments.items()} if segments else None

    # ---- handlers -------------------------------------------------------------
    def query(self, msg: Message, context: Context) -> Message:
        """The node's rank in the chain: its ``partition-id`` (else ``rank``) from ``node_config``."""
        node_config = context.node_config
        rank = node_config.get("partition-id", node_config.get("rank"))
        if rank is None:
            raise ValueError("node-config needs partition-id (or rank) to order the Snake chain, "
                             "e.g. flower-supernode --node-config 'partition-id=0 num-partitions=4'")
        info = {"rank": float(rank), "num-partitions": float(node_config.get("num-partitions", 0))}
        return Message(RecordDict({"info": MetricRecord(info)}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """One Snake hop (a ``window`` in the config) or one full-model visit (no ``window``)."""
        cfg = {**self.defaults, **_config(msg)}
        model = self._model(cfg)
        segments = self.segments(model)
        payload = str(cfg.get("payload-dtype", "fp32"))
        received = decode(_arrays(msg), payload)
        snake = "window" in cfg
        if snake:
            held = self._load_snake(model, segments, received, cfg, context)
            window = [str(name) for name in cfg["window"]]
        else:
            _load(model, received)
            window = list(segments)
        kd = (snake and float(cfg["kd-weight"]) > 0 and str(cfg.get("kd", "on")) != "off"
              and str(cfg.get("strategy", "snake")) not in _NO_KD and set(window) != set(segments))
        torch.manual_seed(int(cfg["seed"]) * 100_003 + int(cfg.get("server-round", 0)))
        metrics = train_window(model, window, self.train_data_fn(context), segments=segments,
                               lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                               weight_decay=float(cfg["weight-decay"]), local_steps=int(cfg["local-steps"]),
                               local_epochs=int(cfg["local-epochs"]), clip_norm=float(cfg["clip-norm"]),
                               kd_weight=float(cfg["kd-weight"]) if kd else 0.0,
                               kd_temperature=float(cfg["kd-temperature"]))
        state = transport_state(model.state_dict())
        if snake:
            keys = [key for name in window for key in segments[name]]
            reply = encode(ArrayRecord({key: state[key] for key in keys}), payload)
            if payload != "fp32":  # keep what the server will merge, not what was trained
                state.update(decode(reply, payload).to_torch_state_dict())
            context.state["snake-model"] = ArrayRecord(state)
            context.state["snake-versions"] = ConfigRecord(held)
        else:  # every key it was sent, as FedAvg averages them
            reply = ArrayRecord({key: state[key] for key in received.keys()})
        metrics["partition-id"] = float(context.node_config.get("partition-id", -1))
        return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Loss and accuracy of the received model on ``evaluate_data_fn``'s batches."""
        if self.evaluate_data_fn is None:
            raise ValueError("this node has no evaluate_data_fn: pass one to make_client_app, or "
                             "evaluate on the server (FedAvg(fraction_evaluate=0), evaluate_fn=...)")
        cfg = {**self.defaults, **_config(msg)}
        model = self._model(cfg)
        if "snake-model" in context.state:
            model.load_state_dict(context.state["snake-model"].to_torch_state_dict())
        _load(model, decode(_arrays(msg), str(cfg.get("payload-dtype", "fp32"))))
        loss = correct = count = 0.0
        for batch in self.evaluate_data_fn(context):
            inputs, labels = split_batch(batch)
            result = _evaluate_tensors(model, inputs, labels, batch_size=len(labels))
            loss += result["loss"] * len(labels)
            correct += result["accuracy"] * len(labels)
            count += len(labels)
        metrics = {"eval-loss": loss / max(count, 1), "eval-acc": correct / max(count, 1), "num-examples": count}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    # ---- helpers --------------------------------------------------------------
    def segments(self, model: nn.Module) -> dict[str, list[str]]:
        """The segments in use (``segment_model(model)`` unless given), computed once."""
        if self._segments is None:
            self._segments = segment_model(model)
        return self._segments

    def _model(self, cfg: Mapping[str, Any]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # every node builds the same initial weights
            torch.manual_seed(int(cfg["seed"]))
            return self.model_fn()

    def _load_snake(self, model: nn.Module, segments: Mapping[str, list[str]], received: ArrayRecord,
                    cfg: Mapping[str, Any], context: Context) -> dict[str, int]:
        """Apply a Snake download over the node's copy; the segment versions it now holds."""
        names = list(segments)
        versions = [int(v) for v in cfg.get("segment-versions", [])]
        if len(versions) != len(names):
            raise ValueError(f"the server's model has {len(versions)} segments, this node's {len(names)}: "
                             f"give make_client_app the segments SnakeStrategy was given")
        unknown = [str(name) for name in cfg["window"] if name not in segments]
        if unknown:
            raise ValueError(f"window {unknown[:3]} is not among this node's segments: "
                             f"give make_client_app the segments SnakeStrategy was given")
        if "snake-model" in context.state:
            model.load_state_dict(context.state["snake-model"].to_torch_state_dict())
        held = dict(context.state["snake-versions"]) if "snake-versions" in context.state else {}
        _load(model, received)
        server = dict(zip(names, versions))
        for name in cfg.get("segments-sent", []):
            if name:
                held[name] = server[name]
        if cfg.get("sync", "delta") == "delta":
            stale = [name for name in names if held.get(name) != server[name]]
            if stale:  # e.g. the node restarted and lost its copy: the server resends everything
                raise RuntimeError(f"local copy is stale for segments {stale[:3]}; full sync needed")
        for name in cfg["window"]:  # the server bumps these when it merges the reply
            held[str(name)] = server[str(name)] + 1
        return held


def _config(msg: Message) -> dict[str, Any]:
    records = list(msg.content.config_records.values())
    return dict(records[0]) if records else {}


def _arrays(msg: Message) -> ArrayRecord:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, got {len(records)}")
    return records[0]


def _load(model: nn.Module, received: ArrayRecord) -> None:
    """Load what was sent over the model; keys the model does not have are an error."""
    result = model.load_state_dict(received.to_torch_state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the server sent keys this model does not have: {result.unexpected_keys[:3]}")
