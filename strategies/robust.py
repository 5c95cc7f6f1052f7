"""Flower's robust aggregators for the FedAvg arms, averaging their replies in partition order.

``aggregation`` picks Flower's own strategy from ``flwr.serverapp.strategy``: ``"mean"``
(``FedAvg``), ``"median"`` (``FedMedian``: the coordinate-wise median), ``"trimmed-mean"``
(``FedTrimmedAvg``: the coordinate-wise mean without the ``beta`` share of highest and of lowest
values) or ``"multi-krum"`` (``MultiKrum``: the average of the ``num_nodes_to_select`` replies
closest to their ``n - f - 2`` nearest neighbours, ``f = num_malicious_nodes``). Each sorts its
replies by partition first, as ``OrderedFedAvg`` does, so that a run repeats bit for bit: Krum
keeps the first of replies that score alike, a mean's bits depend on the order of its sum, and
the metrics are averaged in the order given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum

from .fedavg import EncodedDownload, OrderedFedAvg, partition_order

AGGREGATIONS = ("mean", "median", "trimmed-mean", "multi-krum")


class InPartitionOrder:
    """Mixin for a Flower ``FedAvg``-family strategy: ``aggregate_train`` sees its replies sorted
    by ``partition-id`` (see :func:`strategies.fedavg.partition_order`)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's own ``aggregate_train`` over the replies in partition order."""
        return super().aggregate_train(server_round, sorted(replies, key=partition_order))  # type: ignore[misc]


class OrderedFedMedian(InPartitionOrder, EncodedDownload, FedMedian):
    """Flower's ``FedMedian``, replies in partition order."""


class OrderedFedTrimmedAvg(InPartitionOrder, EncodedDownload, FedTrimmedAvg):
    """Flower's ``FedTrimmedAvg``, replies in partition order."""


class OrderedMultiKrum(InPartitionOrder, EncodedDownload, MultiKrum):
    """Flower's ``MultiKrum``, replies in partition order."""


def fedavg_strategy(aggregation: str = "mean", *, trim_beta: float = 0.2, krum_malicious: int = 0,
                    krum_select: int = 1, **kwargs: Any) -> FedAvg:
    """Flower's ``FedAvg`` or one of its robust aggregators, each in partition order.

    Parameters
    ----------
    aggregation : str (default: "mean")
        One of ``AGGREGATIONS``.
    trim_beta : float (default: 0.2)
        ``FedTrimmedAvg``'s ``beta`` (Flower's default).
    krum_malicious, krum_select : int (default: 0, 1)
        ``MultiKrum``'s ``num_malicious_nodes`` and ``num_nodes_to_select`` (Flower's defaults:
        1 is Krum itself).
    **kwargs
        ``FedAvg``'s own arguments, and ``download_dtype`` (:class:`strategies.fedavg.EncodedDownload`),
        for every aggregation alike.
    """
    if aggregation == "mean":
        return OrderedFedAvg(**kwargs)
    if aggregation == "median":
        return OrderedFedMedian(**kwargs)
    if aggregation == "trimmed-mean":
        return OrderedFedTrimmedAvg(beta=trim_beta, **kwargs)
    if aggregation == "multi-krum":
        return OrderedMultiKrum(num_malicious_nodes=krum_malicious, num_nodes_to_select=krum_select, **kwargs)
    raise ValueError(f"aggregation: {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
