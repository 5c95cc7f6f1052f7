"""Fixtures of the comparison tests: the runs ``compare`` makes, and ``simulate`` without Ray."""

from __future__ import annotations

import pytest

from snake_flower import simulation
from snake_flower.harness import comparison
from snake_flower.server_app import run


@pytest.fixture
def made(monkeypatch):
    """The ``(run name, seed)`` of every run ``compare`` makes; ``run_one`` itself still runs."""
    calls = []
    real = comparison.run_one
    monkeypatch.setattr(comparison, "run_one", lambda cfg, *a: calls.append((cfg.name, cfg.seed)) or real(cfg, *a))
    return calls


@pytest.fixture
def in_process(monkeypatch, loopback, nodes):
    """``simulate`` without Ray: the real ServerApp and ClientApp behind a LoopbackGrid."""
    def simulate(config, num_supernodes, parallel=0, ray_address=""):  # noqa: ANN001, ANN202
        node = nodes(num_supernodes)
        run(loopback(list(node.contexts), node), config)

    monkeypatch.setattr(simulation, "simulate", simulate)
