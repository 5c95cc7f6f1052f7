"""ordered_nodes and NodeBackoff: a stable chain order, and failed nodes sit out."""

from __future__ import annotations

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from strategies.nodes import FIRST_QUERY_PATIENCE, NodeBackoff, ordered_nodes


class RankGrid:
    """Connected nodes that answer the rank query with their rank, unless silent."""

    def __init__(self, ranks: dict[int, int], silent: set[int] = frozenset()) -> None:
        self.ranks, self.silent, self.timeouts = ranks, set(silent), []

    def get_node_ids(self):
        return list(self.ranks)

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return [Message(RecordDict({"info": MetricRecord({"rank": self.ranks[msg.metadata.dst_node_id]})}),
                        reply_to=msg)  # the reply comes from the node asked
                for msg in messages if msg.metadata.dst_node_id not in self.silent]


def test_nodes_are_ordered_by_rank_and_the_first_query_waits_longer():
    grid = RankGrid({900: 0, 100: 2, 500: 1}, silent={100})
    ranks: dict[int, float] = {}
    assert ordered_nodes(grid, ranks, min_nodes=3, query_timeout=2.0) == [900, 500, 100]
    assert grid.timeouts == [2.0 * FIRST_QUERY_PATIENCE]  # nodes may still be starting up
    assert ranks == {900: 0.0, 500: 1.0, 100: float("inf")}  # the silent one goes last
    grid.ranks[42] = 0  # a node joins later: asked once, with the plain timeout
    assert ordered_nodes(grid, ranks, query_timeout=2.0) == [42, 900, 500, 100]
    assert grid.timeouts[1:] == [2.0]


def in_turn(hop, ordered):
    return ordered[hop % len(ordered)]


def test_failed_node_sits_out_doubling_up_to_the_cap():
    backoff = NodeBackoff(base=2, cap=5)
    assert [backoff.failed(7, hop) for hop in (0, 10, 20)] == [2, 4, 5]
    backoff.succeeded(7)
    assert backoff.failed(7, 30) == 2  # a merged hop clears the streak


def test_a_sitting_out_node_is_replaced_by_the_next_turns_node():
    backoff = NodeBackoff(base=4)
    backoff.failed(1, hop=0)  # may train again from hop 5
    nodes = [1, 2, 3]
    # node 1's turn at hop 3 goes to the next turn's node (2); at hop 6 it is back
    assert [backoff.pick(hop, nodes, in_turn) for hop in range(1, 7)] == [2, 3, 2, 2, 3, 1]


def test_when_every_node_sits_out_the_scheduled_one_goes():
    backoff = NodeBackoff(base=4)
    for node in (1, 2):
        backoff.failed(node, hop=0)
    assert backoff.pick(1, [1, 2], in_turn) == 2


def test_zero_base_never_backs_off_and_negative_is_refused():
    backoff = NodeBackoff(base=0)
    assert backoff.failed(1, 0) == 0 and backoff.pick(1, [1, 2], in_turn) == 2
    with pytest.raises(ValueError, match="backoff"):
        NodeBackoff(base=-1)


def test_state_moves_to_new_node_ids_by_key():
    backoff = NodeBackoff(base=2)
    backoff.failed(101, hop=5)
    rows = backoff.state({101: 3.0}.get)  # keyed by the node's rank
    again = NodeBackoff(base=2)
    again.restore(rows, {3.0: 555, 4.0: 556})  # after a restart, the same rank has a new id
    assert again.until == {555: 8} and again.streak == {555: 1}
    assert again.failed(555, hop=8) == 4  # the streak carried over


def test_the_rank_warning_says_whether_a_node_errored_or_stayed_silent(caplog):
    from flwr.app import Error

    class ErrorGrid(RankGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive([m for m in messages if m.metadata.dst_node_id != 7])
            broken = [m for m in messages if m.metadata.dst_node_id == 7]
            return replies + [Message(Error(code=1, reason="No query function registered"), reply_to=m)
                              for m in broken]

    grid = ErrorGrid({7: 0, 8: 1, 9: 2}, silent={9})
    with caplog.at_level("WARNING"):
        ordered_nodes(grid, {}, min_nodes=3, query_timeout=0.01)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("node 7 answered the rank query with an error") and
               "No query function registered" in line for line in lines), lines
    assert any(line.startswith("node 9 stayed silent") for line in lines), lines
    assert not any(line.startswith("node 7 stayed silent") for line in lines), lines
