"""Flower's ``FedAvg``, aggregating its replies in a fixed order so that a run repeats bit for bit."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class OrderedFedAvg(FedAvg):
    """``FedAvg`` whose replies are averaged in the order of the nodes' ``partition-id``.

    Flower averages the replies in the order they arrive, which changes from run to run
    when nodes train in parallel; a float sum depends on its order, so the same run ended
    with another model each time (its last bits). Sorting the replies first makes the
    average, and every figure computed from it, repeatable. Nothing else differs from
    Flower's ``FedAvg``: a reply without a ``partition-id`` (or an error) goes after those
    with one, by node id.
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
