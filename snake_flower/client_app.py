"""ClientApp: train the assigned window of layers on this node's partition.

The node keeps its copy of the whole model, and the version of each segment it
holds, in ``context.state``. The server sends only the segments the node lacks
(``sync = "delta"``) or only the window (``sync = "window"``); the node replies
with the trained window alone, in the ``payload-dtype`` the server asked for; what it
keeps of the window is what the server will merge (the reply decoded), so its copy
and the server's master agree exactly.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from snake_flower.config import kd_enabled
from snake_flower.runtime.chaos import maybe_fail
from snake_flower.split_client import train_split
from snake_flower.tasks.data import node_partition, partition_from_config
from snake_flower.tasks.task import build_model, segment_keys, swept_segment_keys, task_for, transport_state
from snake_flower.training.capacity import reported_capacity
from snake_flower.training.frozen import ArrayView
from snake_flower.training.loop import LocalWork, train_window, visit_seed
from strategies.payload import decode, encode

app = ClientApp()


def _local_model(cfg: dict, context: Context, received: ArrayRecord):
    """The node's model after applying what the server sent, and its segment versions."""
    model = build_model(task_for(cfg), int(cfg["seed"]))
    if "model" in context.state:
        model.load_state_dict(context.state["model"].to_torch_state_dict())
    held = dict(context.state["versions"]) if "versions" in context.state else {}
    result = model.load_state_dict(received.to_torch_state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"server sent keys this model does not have: {result.unexpected_keys[:3]}")
    names = list(swept_segment_keys(model, cfg))
    server_versions = dict(zip(names, cfg["segment-versions"]))
    for name in cfg["segments-sent"]:
        if name:
            held[name] = server_versions[name]
    if cfg["sync"] == "delta":
        stale = [name for name in names if held.get(name) != server_versions[name]]
        if stale:  # e.g. the node restarted and lost its state: fail the hop, get a full resync
            raise RuntimeError(f"local copy is stale for segments {stale}; full sync needed")
    return model, held, server_versions


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's stable rank (its partition id) and any stated capacities."""
    partition_id, num_partitions = node_partition(context.node_config)
    # a deployed node's capacities (--node-config "compute=0.5 memory-budget-mb=64 link-mbps=20")
    capacity = reported_capacity(context.node_config)
    info = {"rank": partition_id, "num-partitions": num_partitions, **capacity}
    return Message(RecordDict({"info": MetricRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One Snake hop (or one FedAvg visit when the window is every segment)."""
    cfg = dict(msg.content["config"])
    partition_id, num_partitions = node_partition(context.node_config)
    maybe_fail(cfg, partition_id)  # chaos runs only (fail-rate > 0, crash-round)
    payload = str(cfg.get("payload-dtype", "fp32"))  # Snake's choice; FedAvg's config says fp32
    model, held, server_versions = _local_model(cfg, context, decode(msg.content["arrays"], payload))
    del msg.content["arrays"]  # loaded: release the received arrays
    exact = None
    if cfg.get("strategy") != "fedavg":  # the node's copy, stored now: frozen layers restore from it
        context.state["model"] = ArrayRecord(transport_state(model.state_dict()))
        exact = ArrayView(context.state["model"])

    task = task_for(cfg)
    x_train, y_train, _, _ = task.load(cfg["data-dir"])
    labels = task.partition_by(cfg["data-dir"]) if task.partition_by else y_train
    idx = partition_from_config(labels, cfg, num_partitions, partition_id)
    window = list(cfg["window"])
    work = LocalWork.from_config(cfg, kd=kd_enabled(cfg))
    metrics, ledger = train_window(model, window, x_train[idx], y_train[idx], work,
                                   seed=visit_seed(cfg["seed"], cfg["server-round"]), align=task.align,
                                   exact=exact)

    state = transport_state(model.state_dict())
    keys = [key for name, seg in segment_keys(model).items() if name in window for key in seg]
    reply = encode(ArrayRecord({key: state[key] for key in keys}), payload)
    if payload != "fp32":  # keep what the server will merge, not what was trained
        state.update(decode(reply, payload).to_torch_state_dict())
    for name in window:  # the server bumps these versions when it merges our reply
        held[name] = server_versions[name] + 1
    if cfg.get("strategy") != "fedavg":  # FedAvg sends the whole model every round: keep no copy
        context.state["model"] = ArrayRecord(state)
        context.state["versions"] = ConfigRecord(held)

    # One MetricRecord, as Flower's FedAvg requires of every reply: metrics and memory ledger.
    metrics = MetricRecord({**metrics, **ledger, **reported_capacity(context.node_config),
                            "partition-id": float(partition_id)})
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)


# Split learning's node side (message type ``train.split``) answers on the same ClientApp.
app.train("split")(train_split)
