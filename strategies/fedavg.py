"""Flower's ``FedAvg``, aggregating its replies in a fixed order so that a run repeats bit for bit."""

from __future__ import annotations

from collections.abc import Iterable

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .payload import PAYLOAD_DTYPES, encode


class EncodedDownload:
    """Mixin for a Flower ``FedAvg``-family strategy: its train messages carry the global model
    encoded in ``download_dtype`` (``"fp32"``, ``"fp16"`` or ``"int8"``, :mod:`strategies.payload`).

    Only the copy in the messages is encoded: the strategy's own model, and how it aggregates
    the (fp32) replies, are Flower's, untouched. The node trains from the dequantized model, so
    the quantization error it starts from is damped by training, not removed. ``"fp32"`` (the
    default) sends the messages Flower sends.
    """

    def __init__(self, *args: Any, download_dtype: str = "fp32", **kwargs: Any) -> None:
        if download_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"download_dtype: {download_dtype!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
        super().__init__(*args, **kwargs)
        self.download_dtype = download_dtype

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's ``configure_train``, handed the model as it travels (and the node told how)."""
        if self.download_dtype != "fp32":
            config = ConfigRecord({**config, "download-dtype": self.download_dtype})
            arrays = encode(arrays, self.download_dtype)  # a new record: the global model is not touched
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]


class OrderedFedAvg(EncodedDownload, FedAvg):
    """``FedAvg`` whose replies are averaged in the order of the nodes' ``partition-id``.

    Flower averages the replies in the order they arrive, which changes from run to run
    when nodes train in parallel; a float sum depends on its order, so the same run ended
    with another model each time (its last bits). Sorting the replies first makes the
    average, and every figure computed from it, repeatable. A reply without a ``partition-id``
    (or an error) goes after those with one, by node id. Nothing else differs from Flower's
    ``FedAvg`` but the optional ``download_dtype`` (see :class:`EncodedDownload`).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's ``aggregate_train`` over the replies sorted by partition, then node id."""
        return super().aggregate_train(server_round, sorted(replies, key=partition_order))


def partition_order(reply: Message) -> tuple[int, float]:
    """A reply's place when replies are sorted: by ``partition-id``, then (errors, none) by node id."""
    if not reply.has_error():
        for record in reply.content.metric_records.values():
            if "partition-id" in record:
                return 0, float(record["partition-id"])
    return 1, float(reply.metadata.src_node_id)
