"""What a node holds during a hop (``node.py``): its peak tensor bytes against its ledger.

A model of wide linear segments, so that parameters dominate the bytes; frozen layers
held in bf16. The node is the real ``make_client_app`` ClientApp under ``SnakeStrategy``,
in-process behind a LoopbackGrid.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from torch import nn

from snake_flower import SnakeStrategy, make_client_app, segment_model

NODES, WIDTH = 3, 256


class Linear(nn.Linear):
    """A linear layer that computes in its weight's dtype (a frozen one is held in bf16) and returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).float()


def _wide() -> nn.Sequential:
    """Six 256 x 256 segments and a head: 1.6 MB of fp32 parameters, a few kB of activations."""
    layers = OrderedDict((f"l{i}", nn.Sequential(Linear(WIDTH, WIDTH), nn.ReLU())) for i in range(6))
    return nn.Sequential(OrderedDict(**layers, head=Linear(WIDTH, 4)))


_wide.snake_meta_build = True  # builds on the meta device, as the built-in tasks' builder does


def _data(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    return torch.randn(32, WIDTH, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def test_a_hops_peak_tensor_bytes_stay_within_its_ledger_and_the_message(loopback, live_bytes):
    torch.manual_seed(0)
    model = _wide()
    segments = segment_model(model)
    app = make_client_app(_wide, _data, segments=segments, frozen_dtype="bf16", local_steps=2, batch_size=8)
    contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                 node_config={"partition-id": i, "num-partitions": NODES}) for i in range(NODES)}
    hops = []

    def handle(msg: Message):  # noqa: ANN202
        if msg.metadata.message_type != MessageType.TRAIN or msg.metadata.dst_node_id != 100:
            return app(msg, contexts[msg.metadata.dst_node_id]).content
        message_bytes = sum(len(array.data) for record in msg.content.array_records.values()
                            for array in record.values())
        with live_bytes() as live:
            reply = app(msg, contexts[100]).content
        ledger = next(iter(reply.metric_records.values()))
        hops.append((live.peak, int(ledger["total-bytes"]), message_bytes))
        return reply

    strategy = SnakeStrategy(segments, window=1, order="fixed", train_head=False, seed=0, query_timeout=1.0)
    strategy.start(grid=loopback(contexts, handle), initial_arrays=model_arrays(model), num_rounds=NODES + 1)
    assert [hop["status"] for hop in strategy.hops] == ["merged"] * (NODES + 1)
    assert len(hops) == 2  # node 100's first visit (every segment) and its next (a delta, from its copy)
    fp32_model = sum(p.numel() * 4 for p in model.parameters())
    for peak, ledger, message in hops:
        # the ledger holds the window in fp32, the frozen layers in bf16, grads, momentum and activations;
        # a frozen layer in fp32, or the copy on disk mapped whole, would show above it
        assert peak <= ledger + message, (peak, ledger, message)
        assert ledger < 0.75 * fp32_model + message  # bf16 frozen: well below an fp32 model
    assert hops[1][2] < hops[0][2]  # the second visit was sent less than the whole model


def model_arrays(model: nn.Module):  # noqa: ANN201
    from flwr.app import ArrayRecord

    return ArrayRecord(model.state_dict())
