"""Channels-last pooling gives nn.MaxPool2d's numbers: values, gradients and saved bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snake_flower.tasks.pooling import ChannelsLastMaxPool2d
from snake_flower.tasks.task import small_cnn
from snake_flower.training.ledger import SavedActivations


def _pooled(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = x.clone().requires_grad_()
    meter = SavedActivations([])
    with meter:
        y = module(x)
    y.backward(grad)
    assert y.is_contiguous()
    return y.detach(), x.grad, meter.peak


@pytest.mark.parametrize("shape", [(32, 16, 28, 28), (32, 32, 7, 7), (5, 3, 9, 8)])
def test_channels_last_pooling_gives_max_pool2ds_values_gradients_and_saved_bytes(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.relu(torch.randn(shape, generator=gen))  # zeros tie, as after a ReLU
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = 2.5  # a tie of equal positive values: the first one wins in both
    x[-1, -1, 2:4, 2:4] = float("nan")
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=gen)
    stock, quick = _pooled(nn.MaxPool2d(2), x, grad), _pooled(ChannelsLastMaxPool2d(2), x, grad)
    assert torch.equal(stock[0].nan_to_num(), quick[0].nan_to_num()) and stock[0].isnan().equal(quick[0].isnan())
    assert torch.equal(stock[1], quick[1])  # each gradient to the same input element
    assert stock[2] == quick[2] > 0  # the activation ledger counts the same saved bytes


def test_the_cnn_pools_in_channels_last_and_keeps_its_state_keys():
    model = small_cnn()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(isinstance(m, ChannelsLastMaxPool2d) for m in pools)
    assert all(".2." not in key for key in model.state_dict())  # a pool holds no state
    with torch.no_grad():
        assert torch.equal(ChannelsLastMaxPool2d(2)(torch.ones(1, 1, 4, 4)[..., ::2]), torch.ones(1, 1, 2, 1))
