"""``make_client_app``: the node side of Snake for any PyTorch model, in one call.

This is the one node implementation: a plugin user's app and the built-in tasks
(``client_app.py`` hands it their model and data functions) run the same code. One
ClientApp serves every strategy (docs/protocol.md has the message protocol, key by key):

- a Snake or relay message (its config has a ``window``) loads the partial download over
  the node's own copy of the model (kept on its disk between visits, ``node_store.py``),
  checks that the copy is current, trains the window alone and replies with exactly the
  window's keys, encoded in the message's ``payload-dtype``; the node keeps what the
  server will merge (the reply decoded), so its copy and the server's master agree
  exactly where it trained. A download in ``download-dtype`` (when the message has one) is
  decoded, and kept, as received: a frozen segment stays the dequantized copy until it is
  sent again. A node whose copy is lost or damaged, or older than the message says, answers
  ``full-sync-needed`` instead, and the strategy sends it the whole model;
- a message without a ``window`` (Flower's ``FedAvg``, or any strategy that sends the
  whole model) trains every segment and replies with every key it received, keeping no copy;
- a ``query`` message gets the node's rank (its ``partition-id``), which orders the chain,
  and the capacities its ``--node-config`` states.

A message with ``byzantine-nodes > 0`` (tests and benchmarks only) makes the node poison its
reply if its partition is among the attackers the seed draws (``training/attack.py``).

Knowledge distillation follows the message's ``kd`` (``"auto"``: only on non-IID
partitions) when ``kd-weight > 0``; FedAvg (``strategy = "fedavg"`` or no ``window``) and
split learning never distil. The frozen layers are held in ``frozen-dtype`` while the
window trains, and restored exactly from the node's copy on disk (memory-mapped).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from snake_flower.config import kd_enabled
from snake_flower.node_copy import frozen_names, load_copy, load_received, read_copy, rest_keys
from snake_flower.node_model import ModelBuilder, hold_parameters
from snake_flower.node_settings import NodeSettings, node_settings
from snake_flower.node_store import NodeStore, StoredCopy, node_state_dir
from snake_flower.runtime.chaos import maybe_fail
from snake_flower.segments import segment_model
from snake_flower.tasks.task import transport_state
from snake_flower.training.attack import node_attack
from snake_flower.training.batches import split_batch, visit_seed
from snake_flower.training.frozen import DTYPES
from snake_flower.training.loop import OPTION_FIELDS, Align, LocalWork, train_window
from snake_flower.training.loop import evaluate as _evaluate_tensors
from strategies.payload import decode, encode
from strategies.reply import FULL_SYNC

ModelFn = Callable[..., nn.Module]
"""``model_fn()``, or ``model_fn(config)`` for a model that depends on the hop's config (a
function whose required positional arguments number one more gets the config)."""
DataFn = Callable[..., Any]
"""``data_fn(context)``, or ``data_fn(context, config)``: ``(x, y)`` tensors or a loader."""
SegmentsFn = Callable[[nn.Module, Mapping[str, Any]], Mapping[str, list[str]]]


_OPTION_OF = {field: option for option, field in OPTION_FIELDS.items()}
_DEFAULTS: dict[str, Any] = {
    **{_OPTION_OF.get(f.name, f.name).replace("_", "-"): f.default for f in fields(LocalWork)},
    "seed": 0, "kd": "on",
}
"""A plugin node's defaults, overridden by ``make_client_app``'s options and then by the same
key in each message's config: ``LocalWork``'s defaults (the one place they are set)."""


def make_client_app(model_fn: ModelFn, train_data_fn: DataFn, *,
                    segments: Mapping[str, list[str]] | SegmentsFn | None = None,
                    evaluate_data_fn: DataFn | None = None, align: Align | None = None,
                    **options: Any) -> ClientApp:
    """A Flower ``ClientApp`` that trains your model under ``SnakeStrategy`` or ``FedAvg``.

    Parameters
    ----------
    model_fn : Callable[[], nn.Module]
        Builds the model (called with ``torch.manual_seed(seed)`` set); maps inputs to logits.
        A ``model_fn(config)`` gets the hop's config (the message's keys over the defaults).
    train_data_fn : Callable[[Context], Any]
        This node's training data: ``(x, y)`` tensors, drawn in batches of ``batch_size`` in
        an order seeded per visit; or batches of ``(inputs, labels)``, e.g. a ``DataLoader``
        over the partition ``context.node_config["partition-id"]`` (dict batches such as
        Flower Datasets give, ``{"img": ..., "label": ...}``, work too), in the loader's own
        order. Called on every hop: cache what is slow to load. A
        ``train_data_fn(context, config)`` also gets the hop's config.
    segments : Mapping[str, list[str]] | Callable | None
        The segments, exactly as given to ``SnakeStrategy``; ``None`` means
        ``segment_model(model_fn())`` with its defaults; a callable ``segments(model, config)``
        gives them per hop.
    evaluate_data_fn : Callable[[Context], Iterable] | None
        Batches for ``@app.evaluate`` (FedAvg's client-side evaluation). Without it an
        evaluate message gets an error reply: set ``fraction_evaluate=0`` and evaluate
        on the server (``evaluate_fn``), as ``SnakeStrategy`` always does.
    align : Callable | None
        ``align(outputs, labels) -> (logits, labels)``, one row per prediction (a language
        model's answer tokens); ``None``: the model's outputs are the logits.
    **options
        Defaults of the local work, overridden by the same key in each message's config:
        ``lr`` (0.01), ``momentum`` (0.9), ``weight_decay`` (0), ``local_steps`` (0: use
        epochs), ``local_epochs`` (1), ``batch_size`` (32, tensor data), ``clip_norm`` (1.0),
        ``kd_weight`` (0), ``kd_temperature`` (2.0), ``frozen_dtype`` ("fp32": what the
        frozen layers are held in while the window trains), ``optimizer`` ("sgd", or "adam"), ``seed`` (0).

    Returns
    -------
    flwr.clientapp.ClientApp
    """
    defaults = dict(_DEFAULTS)
    for name, value in options.items():
        key = name.replace("_", "-")
        if key not in _DEFAULTS or key == "kd":
            known = ", ".join(k.replace("-", "_") for k in _DEFAULTS if k != "kd")
            raise TypeError(f"make_client_app: unknown option {name!r} (known: {known})")
        defaults[key] = value
    node = _Node(model_fn, train_data_fn, evaluate_data_fn, segments, align, defaults)
    app = ClientApp()
    app.train()(node.train)
    app.evaluate()(node.evaluate)
    app.query()(node.query)
    return app


def _with_config(fn: Callable[..., Any], plain: int) -> Callable[..., Any]:
    """``fn`` as a function of its ``plain`` arguments and the hop's config (which it may ignore)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the plain form
        return lambda *args: fn(*args[:plain])
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    takes_config = len(required) > plain
    return fn if takes_config else (lambda *args: fn(*args[:plain]))


class _Node:
    """What ``make_client_app``'s handlers share: the model builder, data, segments and defaults."""

    def __init__(self, model_fn: ModelFn, train_data_fn: DataFn, evaluate_data_fn: DataFn | None,
                 segments: Mapping[str, list[str]] | SegmentsFn | None, align: Align | None,
                 defaults: dict[str, Any]) -> None:
        # on the meta device where the builder allows it (the built-in tasks': no cache to poison)
        self.build = ModelBuilder(_with_config(model_fn, 0), bool(getattr(model_fn, "snake_meta_build", False)))
        self.train_data_fn = _with_config(train_data_fn, 1)
        self.evaluate_data_fn = _with_config(evaluate_data_fn, 1) if evaluate_data_fn else None
        self.align, self.defaults = align, defaults
        self._segments_fn = segments if callable(segments) else None
        self._segments = ({name: list(keys) for name, keys in segments.items()}
                          if segments is not None and not callable(segments) else None)

    # ---- handlers -------------------------------------------------------------
    def query(self, msg: Message, context: Context) -> Message:
        """The node's rank in the chain (its ``partition-id``, else ``rank``) and its capacities."""
        settings = node_settings(context.node_config)
        if settings.partition_id is None:
            raise ValueError("node-config needs partition-id (or rank) to order the Snake chain, "
                             "e.g. flower-supernode --node-config 'partition-id=0 num-partitions=4'")
        info = {"rank": float(settings.partition_id), **settings.capacity}
        if settings.num_partitions is not None:
            info["num-partitions"] = float(settings.num_partitions)
        return Message(RecordDict({"info": MetricRecord(info)}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """One Snake or relay hop (a ``window`` in the config) or one full-model visit (no ``window``)."""
        cfg = {**self.defaults, **_config(msg)}
        settings = node_settings(context.node_config)
        partition_id = -1 if settings.partition_id is None else settings.partition_id
        maybe_fail(cfg, partition_id)  # chaos runs only (fail-rate > 0, crash-round)
        payload = str(cfg.get("payload-dtype", "fp32"))  # the reply's encoding
        # the decoded arrays by key, the message's records gone: each array goes once loaded
        received = dict(decode(_arrays(msg), _download_dtype(cfg)).items())
        for name in list(msg.content.array_records):
            del msg.content[name]
        received_keys = list(received)
        snake = "window" in cfg
        keeps_copy = snake and cfg.get("strategy") != "fedavg"  # FedAvg sends the whole model anyway
        store = NodeStore(_state_dir(settings, context)) if keeps_copy else None
        copy, lost = read_copy(store)
        work = LocalWork.from_config(cfg, kd=snake and kd_enabled(cfg))
        dtype = DTYPES.get(work.frozen_dtype)  # None: int8, quantized from fp32 as training starts

        def hold(model: nn.Module) -> None:  # frozen parameters straight into the held dtype
            if dtype is not None:
                hold_parameters(model, frozen_names(model, self.segments(model, cfg), cfg.get("window")), dtype)

        # built empty (on meta), the frozen parameters are allocated in the held dtype from the start
        held_keys = [key for keys in copy.parts.values() for key in keys] if copy is not None else []
        model = self.build(cfg, {*received_keys, *held_keys}, hold)
        segments = self.segments(model, cfg)
        window = [str(name) for name in cfg["window"]] if snake else list(segments)
        if snake:
            held, server, stale = self._apply_snake(segments, cfg, copy)
            if stale:  # e.g. a node whose state directory was lost: the server resends everything
                reason = f"{lost or 'its copy is older than the message says'}; stale segments {stale[:3]}"
                return _full_sync_reply(msg, reason, partition_id)
        sent = [str(name) for name in cfg.get("segments-sent", []) if name] if store is not None else []
        files = {}
        if store is not None and (copy is None or "" not in copy.files):  # the keys in no segment, as built
            state = model.state_dict()
            files[""] = store.write_part("", {key: state[key] for key in rest_keys(model, segments)})
            del state
        hold(model)  # a real build: its frozen parameters cast now, before the loads
        if copy is not None and store is not None:
            load_copy(model, store, copy, skip=sent)
        # segment by segment: each sent one stored exactly as received, loaded, then let go of
        load_received(model, received, segments, store=store, sent=sent, files=files)
        exact = None
        if store is not None:
            copy = store.commit(files, held, copy, read_back=dtype is None)
            exact = copy.tensors if dtype is None else None  # int8 restores its frozen layers from the copy
        seed = visit_seed(cfg["seed"], cfg.get("server-round", 0))
        torch.manual_seed(seed)  # what a loader shuffles (or a dropout draws), per visit
        data = self.train_data_fn(context, cfg)
        keys = [key for name, seg in segments.items() if name in window for key in seg]
        attack = node_attack(cfg, settings.partition_id, settings.num_partitions)  # byzantine-nodes > 0 only
        if attack is not None:
            data, before = attack.data(data, model, self.align), attack.snapshot(model, keys)
        metrics = train_window(model, window, data, segments=segments, work=work, seed=seed,
                               align=self.align, exact=exact)
        if snake:  # the window alone, converted for the reply
            weights = model.state_dict()
            state = transport_state({key: weights[key] for key in keys})
        else:
            state = transport_state(model.state_dict())
        if attack is not None:  # what it sends, and keeps, is poisoned (training/attack.py)
            attack.poison(state, model, keys, before)
        if snake:
            reply = encode(ArrayRecord({key: state[key] for key in keys}), payload)
            if payload != "fp32":  # keep what the server will merge, not what was trained
                state.update(decode(reply, payload).to_torch_state_dict())
            for name in window:  # the server bumps these versions when it merges the reply
                held[name] = server[name] + 1
            if store is not None:
                trained = {name: store.write_part(name, {key: state[key] for key in segments[name]}) for name in window}
                store.commit(trained, held, copy, read_back=False)
        else:  # every key it was sent, as FedAvg averages them
            reply = ArrayRecord({key: state[key] for key in received_keys})
        # One MetricRecord, as Flower's FedAvg requires of every reply: metrics and memory ledger.
        metrics = MetricRecord({**metrics, **settings.capacity, "partition-id": float(partition_id)})
        return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Loss and accuracy of the received model on ``evaluate_data_fn``'s batches."""
        if self.evaluate_data_fn is None:
            raise ValueError("this node has no evaluate_data_fn: pass one to make_client_app, or "
                             "evaluate on the server (FedAvg(fraction_evaluate=0), evaluate_fn=...)")
        cfg = {**self.defaults, **_config(msg)}
        received = dict(decode(_arrays(msg), _download_dtype(cfg)).items())
        model = self.build(cfg, received.keys())
        load_received(model, received, self.segments(model, cfg))
        loss = correct = count = 0.0
        for batch in self.evaluate_data_fn(context, cfg):
            inputs, labels = split_batch(batch)
            result = _evaluate_tensors(model, inputs, labels, batch_size=len(labels), align=self.align)
            loss += result["loss"] * len(labels)
            correct += result["accuracy"] * len(labels)
            count += len(labels)
        metrics = {"eval-loss": loss / max(count, 1), "eval-acc": correct / max(count, 1), "num-examples": count}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    # ---- helpers --------------------------------------------------------------
    def segments(self, model: nn.Module, cfg: Mapping[str, Any]) -> dict[str, list[str]]:
        """The segments in use: the callable's for this hop, else those given (or found once)."""
        if self._segments_fn is not None:
            return {name: list(keys) for name, keys in self._segments_fn(model, cfg).items()}
        if self._segments is None:
            self._segments = segment_model(model)
        return self._segments

    def _apply_snake(self, segments: Mapping[str, list[str]], cfg: Mapping[str, Any], copy: StoredCopy | None
                     ) -> tuple[dict[str, int], dict[str, int], list[str]]:
        """The segment versions the node holds once it applied the download, the server's, and
        the segments whose versions differ (the node lacks them: a full sync is needed)."""
        names = list(segments)
        versions = [int(v) for v in cfg.get("segment-versions", [])]
        if len(versions) != len(names):
            raise ValueError(f"the server's model has {len(versions)} segments, this node's {len(names)}: "
                             f"give make_client_app the segments SnakeStrategy was given")
        unknown = [str(name) for name in cfg["window"] if name not in segments]
        if unknown:
            raise ValueError(f"window {unknown[:3]} is not among this node's segments: "
                             f"give make_client_app the segments SnakeStrategy was given")
        held = dict(copy.versions) if copy is not None else {}
        server = dict(zip(names, versions))
        for name in cfg.get("segments-sent", []):
            if name:
                held[name] = server[name]
        # under window sync too: the server's versions are those of the copy it believes the node has
        stale = [name for name in names if held.get(name) != server[name]]
        return held, server, stale


def stored_copy(context: Context) -> StoredCopy | None:
    """A node's copy of the model as its state directory holds it (``None`` before its first hop)."""
    return NodeStore(_state_dir(node_settings(context.node_config), context)).read()


def _state_dir(settings: NodeSettings, context: Context) -> Any:
    return node_state_dir(settings.state_dir, context.run_id, settings.partition_id, context.node_id)


def _full_sync_reply(msg: Message, reason: str, partition_id: int) -> Message:
    """The reply of a node that cannot train with what it was sent: it needs the whole model."""
    content = RecordDict({"metrics": MetricRecord({FULL_SYNC: 1.0, "partition-id": float(partition_id)}),
                          FULL_SYNC: ConfigRecord({"reason": reason[:300]})})
    return Message(content, reply_to=msg)


def _download_dtype(cfg: Mapping[str, Any]) -> str:
    """The encoding of what the server sent: ``download-dtype``, else (absent or ``auto``)
    ``payload-dtype``, both ways as before the key existed."""
    download = str(cfg.get("download-dtype", "auto"))
    return str(cfg.get("payload-dtype", "fp32")) if download == "auto" else download


def _config(msg: Message) -> dict[str, Any]:
    records = list(msg.content.config_records.values())
    return dict(records[0]) if records else {}


def _arrays(msg: Message) -> ArrayRecord:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, got {len(records)}")
    return records[0]
