"""What a node's own ``--node-config`` says of it, checked once per message.

The server cannot know these: the node's partition (its rank in the chain), its
capacities, and for the built-in tasks where its data is. A bad value fails the hop
(and stops ``snake-flower supernode`` at start) with a one-line error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snake_flower.training.stated import reported_capacity


@dataclass(frozen=True)
class NodeSettings:
    """A node's ``--node-config``, checked (``node_settings``)."""

    partition_id: int | None
    num_partitions: int | None
    data_dir: str | None
    capacity: dict[str, float]
    state_dir: str | None = None

    def partition(self) -> tuple[int, int]:
        """``(partition-id, num-partitions)``, which the built-in tasks' data needs."""
        if self.partition_id is None or self.num_partitions is None:
            raise ValueError("node-config needs partition-id and num-partitions "
                             "(flower-supernode --node-config 'partition-id=0 num-partitions=N')")
        return self.partition_id, self.num_partitions

    def data_dir_or(self, run_data_dir: str) -> str:
        """Where the built-in tasks' data is: this node's own ``data-dir`` (which must exist),
        else the run-config's."""
        if self.data_dir is None:
            return run_data_dir
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"node-config: data-dir {self.data_dir!r} is not a directory")
        return self.data_dir


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Check a node's ``node_config``; a bad value raises ``ValueError`` in one line naming its key.

    ``partition-id`` (else ``rank``) and ``num-partitions`` are whole numbers, the first
    below the second; ``data-dir`` is a path (whether it exists is checked where it is
    read: a plugin's data function may make it); ``state-dir`` (where a Snake node keeps
    its copy of the model, ``node_store.py``) is a path that is a directory if it exists;
    the capacities are ``training.stated.reported_capacity``'s.
    """
    partition_id = _whole(node_config, "partition-id", 0) if "partition-id" in node_config else (
        _whole(node_config, "rank", 0) if "rank" in node_config else None)
    num_partitions = _whole(node_config, "num-partitions", 1) if "num-partitions" in node_config else None
    if partition_id is not None and num_partitions is not None and partition_id >= num_partitions:
        raise ValueError(f"node-config: partition-id {partition_id} must be below num-partitions "
                         f"{num_partitions}")
    data_dir = node_config.get("data-dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise ValueError(f"node-config: data-dir must be a path, got {data_dir!r}")
    return NodeSettings(partition_id, num_partitions, data_dir or None, reported_capacity(node_config),
                        _state_dir(node_config))


def _state_dir(node_config: Mapping[str, Any]) -> str | None:
    """``state-dir``: a path, which the node creates if need be, but not a file."""
    if "state-dir" not in node_config:
        return None
    state_dir = node_config["state-dir"]
    if not isinstance(state_dir, str) or not state_dir.strip():
        raise ValueError(f"node-config: state-dir must be a directory path, got {state_dir!r}")
    if Path(state_dir).exists() and not Path(state_dir).is_dir():
        raise ValueError(f"node-config: state-dir {state_dir!r} is not a directory")
    return state_dir


def _whole(node_config: Mapping[str, Any], key: str, lowest: int) -> int:
    value, why = node_config[key], f"node-config: {key} must be a whole number >= {lowest}, got {node_config[key]!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(why)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(why) from None
    if not number.is_integer() or number < lowest:
        raise ValueError(why)
    return int(number)
