"""Byte metering: one Grid wrapper, used alike for every strategy.

Each message's content is counted at its size as Flower puts it on the wire
(``recorddict_to_proto``; ``Sizes`` computes it without copying the tensors), down
(server -> node) on push and up (node -> server) on pull, per node and per round. The
raw bytes of the tensors carried are counted beside it, so payload efficiency = counted / raw.
Query messages (node discovery) are control traffic and are tallied apart, so
that ``down``/``up`` are the model-carrying messages alone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.common.serde import array_record_to_proto, recorddict_to_proto
from flwr.serverapp import Grid

from strategies.reply import last_line


def flower_poll_interval(grid: Grid) -> float:
    """The fixed pull cadence of Flower's own ``send_and_receive`` for this Grid."""
    while isinstance(grid, ForwardingGrid):  # ours wrap Flower's
        grid = grid.grid
    return float(getattr(grid, "pull_interval", 3.0))  # InMemoryGrid 0.1 s; HttpGrid sleeps 3 s


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content."""
    return recorddict_to_proto(content).ByteSize()


def array_bytes(content: RecordDict) -> int:
    """Serialized size of the content's ArrayRecords alone."""
    return sum(array_record_to_proto(r).ByteSize() for r in content.array_records.values())


def raw_tensor_bytes(record: ArrayRecord) -> int:
    """Bytes of the tensors themselves (elements x item size, no framing)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())


@dataclass(frozen=True)
class Sizes:
    """What one message's content counts: serialized bytes, of them the ArrayRecords', and the
    tensors' raw bytes."""

    bytes: int
    array_bytes: int
    raw_bytes: int

    @classmethod
    def of(cls, content: RecordDict) -> Sizes:
        """What Flower's ``recorddict_to_proto(content).ByteSize()`` would give, and its
        ArrayRecords' part, without copying the tensors' bytes into a proto (seconds for a
        whole LLM): ``content`` is serialized by Flower with every ``Array``'s data left
        out, and each length-delimited field on the way down to the data is then grown by
        the data's length (``tests/snake_flower/runtime/test_metering.py`` checks it
        against Flower's serialization)."""
        stripped = RecordDict({key: ArrayRecord({k: _without_data(a) for k, a in record.items()})
                               if isinstance(record, ArrayRecord) else record for key, record in content.items()})
        total = arrays = 0
        for item in recorddict_to_proto(stripped).items:
            size = item.ByteSize()
            if item.HasField("array_record"):
                record = content[item.key]
                grown = sum(_grown(entry.ByteSize(), entry.value.ByteSize(), len(record[entry.key].data))
                            for entry in item.array_record.items)
                sent = item.array_record.ByteSize() + grown
                size += _field(sent) - _field(item.array_record.ByteSize())
                arrays += sent
            total += _field(size)
        raw = sum(raw_tensor_bytes(r) for r in content.array_records.values())
        return cls(total, arrays, raw)


def _without_data(array: Array) -> Array:
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=b"")


def _varint(n: int) -> int:
    """Bytes of ``n`` as a protobuf varint."""
    return max(1, (n.bit_length() + 6) // 7)


def _field(n: int) -> int:
    """Bytes of a length-delimited field (tag < 16: one byte) whose payload is ``n`` bytes."""
    return 1 + _varint(n) + n


def _grown(entry: int, array: int, data: int) -> int:
    """How many bytes an ``ArrayRecord`` item (``entry`` bytes, its ``Array`` ``array`` bytes,
    both without data) grows by, framing included, once its ``data`` bytes are in."""
    with_data = array + (_field(data) if data else 0)  # proto3 leaves empty bytes out
    item = entry - _field(array) + _field(with_data)
    return _field(item) - _field(entry)


@dataclass
class Tally:
    """Counted bytes of one direction."""

    bytes: int = 0
    array_bytes: int = 0
    raw_bytes: int = 0
    messages: int = 0

    def add(self, content: RecordDict | Sizes | None) -> None:
        """Count one message: its content (or its ``Sizes``, counted once for several tallies)."""
        self.messages += 1
        if content is None:
            return
        sizes = content if isinstance(content, Sizes) else Sizes.of(content)
        self.bytes += sizes.bytes
        self.array_bytes += sizes.array_bytes
        self.raw_bytes += sizes.raw_bytes


@dataclass
class RoundMeter:
    """Down and up tallies of one round, in total and per node, plus control traffic, and the
    error replies (node -> reason) among the up ones."""

    down: Tally = field(default_factory=Tally)
    up: Tally = field(default_factory=Tally)
    control: Tally = field(default_factory=Tally)
    down_by_node: dict[int, Tally] = field(default_factory=lambda: defaultdict(Tally))
    up_by_node: dict[int, Tally] = field(default_factory=lambda: defaultdict(Tally))
    errors: dict[int, str] = field(default_factory=dict)

    def failed_nodes(self) -> dict[int, str]:
        """Nodes sent a model-carrying message this round that sent no good reply, and why."""
        return {node: self.errors.get(node, "no reply before the round timeout")
                for node in self.down_by_node if node not in self.up_by_node or node in self.errors}


class ForwardingGrid(Grid):
    """A ``Grid`` that hands every call to the Grid it wraps; subclasses change a few."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run):  # noqa: ANN001, D102 - Grid's own signature
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201, D102
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201, D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201, D102
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:  # noqa: D102
        return self.grid.send_and_receive(messages, timeout=timeout)


class MeteredGrid(ForwardingGrid):
    """A ``Grid`` that forwards everything and counts message bytes.

    ``close_round()`` ends the current round's tally and starts the next, so the
    caller decides what a round is (Flower's ``evaluate_fn`` runs once per round).
    With hops that overlap in time (``by_group``), each message is tallied under its
    ``group_id`` (a Snake hop's round; a reply keeps its message's) and
    ``close_round(group)`` returns that hop's tally, whenever its bytes moved.

    Parameters
    ----------
    grid : Grid
        The Grid Flower handed to the ServerApp.
    poll_interval : float (default: 0.1)
        Longest wait between pulls in ``send_and_receive``. Pulls start at
        ``first_poll`` seconds and back off by doubling up to this, so a quick reply
        is seen within milliseconds (Flower's Grids wait a fixed 0.1 s in simulation
        and 3 s in deployment), while a long hop polls no more often than this.
    first_poll : float (default: FIRST_POLL)
        First wait; set it equal to ``poll_interval`` for a fixed cadence.
    """

    FIRST_POLL = 0.002

    def __init__(self, grid: Grid, poll_interval: float = 0.1, first_poll: float = FIRST_POLL) -> None:
        super().__init__(grid)
        self.poll_interval, self.first_poll = poll_interval, first_poll
        self.rounds: list[RoundMeter] = []
        self.current = RoundMeter()
        self.by_group = False
        self.groups: dict[str, RoundMeter] = {}  # by_group: the tallies of hops not closed yet

    def close_round(self, group: str | None = None) -> RoundMeter:
        """Return the tally of the round that just ended (``by_group``: of hop ``group``, with
        the control traffic since the last close) and start a new one."""
        done, self.current = self.current, RoundMeter()
        if group is not None:
            done, control = self.groups.pop(group, RoundMeter()), done.control
            done.control = control
        self.rounds.append(done)
        return done

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Count each message's content down to its node, then push."""
        messages = list(messages)
        for msg in messages:
            meter = self._meter(msg)
            self._count(msg, meter.down, meter.down_by_node[msg.metadata.dst_node_id])
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies and count each one's content up from its node."""
        replies = list(self.grid.pull_messages(message_ids))
        for msg in replies:
            meter = self._meter(msg)
            self._count(msg, meter.up, meter.up_by_node[msg.metadata.src_node_id])
            if msg.has_error() and msg.metadata.message_type != MessageType.QUERY:
                meter.errors[msg.metadata.src_node_id] = last_line(msg.error.reason)[:300]
        return replies

    def _meter(self, msg: Message) -> RoundMeter:
        if self.by_group and msg.metadata.message_type != MessageType.QUERY:
            return self.groups.setdefault(msg.metadata.group_id, RoundMeter())
        return self.current

    def _count(self, msg: Message, total: Tally, by_node: Tally) -> None:
        content = msg.content if msg.has_content() else None
        if msg.metadata.message_type == MessageType.QUERY:
            self.current.control.add(content)
            return
        sizes = Sizes.of(content) if content is not None else None
        total.add(sizes)
        by_node.add(sizes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` passes."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        wait = min(self.first_poll, self.poll_interval)
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.time() >= deadline):
                break
            time.sleep(wait)
            wait = min(2 * wait, self.poll_interval)
        return replies
