"""Attacking nodes: each attack's reply is poisoned, yet passes reply validation without max-update-norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from snake_flower.config import node_message, resolve
from snake_flower.tasks.task import TASKS, build_model, segment_keys
from snake_flower.training.attack import ATTACKS, Attack, attacking_partitions
from strategies.reply import checked_window

TASK = TASKS["synthetic"]
NODES = 2
WINDOW = ["conv2", "head"]


def _message(window: list[str] | None, **overrides) -> tuple[Message, dict[str, torch.Tensor]]:
    """A train message to node 1000 (partition 0): a Snake hop of ``window``, or FedAvg's (``None``)."""
    config = resolve({"task": "synthetic", "partitioner": "iid", "local-steps": 3, **overrides})
    state = build_model(TASK, config.seed).state_dict()
    cfg = {**node_message(config), "server-round": 1, "payload-dtype": "fp32"}
    if window is not None:
        cfg.update({"window": window, "sync": "delta", "segments-sent": list(TASK.segment_names),
                    "segment-versions": [0] * len(TASK.segment_names)})
    else:
        cfg["strategy"] = "fedavg"
    msg = Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(cfg)}), dst_node_id=1000,
                  message_type=MessageType.TRAIN)
    return msg, state


def _reply(nodes, window, **overrides) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    msg, state = _message(window, **overrides)
    reply = nodes(NODES)(msg)  # fresh nodes: an honest and an attacking reply start alike
    assert isinstance(reply, RecordDict), reply
    return reply, state


def _window_keys(window: list[str]) -> list[str]:
    keys = segment_keys(build_model(TASK, 0))
    return [k for name in window for k in keys[name]]


@pytest.mark.parametrize("attack", ATTACKS)
def test_each_attack_is_poisoned_yet_passes_reply_validation(nodes, attack):
    honest, sent = _reply(nodes, WINDOW)
    # every node attacks: partition 0 is among them
    poisoned, _ = _reply(nodes, WINDOW, **{"byzantine-nodes": NODES, "attack": attack, "attack-scale": 3.0})
    keys = _window_keys(WINDOW)
    assert list(poisoned["arrays"].keys()) == list(honest["arrays"].keys()) == keys
    arrays = ArrayRecord(sent)  # the global model the hop was sent
    hop = {"window": WINDOW, "versions_sent": dict.fromkeys(TASK.segment_names, 0)}
    window, reason = checked_window(hop, [poisoned["arrays"]], dict(poisoned["metrics"]), arrays, keys,
                                    dict.fromkeys(TASK.segment_names, 0), payload_dtype="fp32", max_update_norm=0.0)
    assert reason is None and window is not None
    for key in keys:
        w0, trained, sent_back = (sent[key].numpy(), honest["arrays"][key].numpy(), poisoned["arrays"][key].numpy())
        assert sent_back.dtype == trained.dtype and sent_back.shape == trained.shape
        assert not np.array_equal(sent_back, trained), key  # poisoned, every parameter of the window
        if attack == "sign-flip":
            np.testing.assert_allclose(sent_back, w0 - (trained - w0), rtol=1e-5, atol=1e-6)
        elif attack == "scale":
            np.testing.assert_allclose(sent_back, w0 + 3.0 * (trained - w0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attack", ["label-flip", "sign-flip"])
def test_fedavg_replies_are_attacked_too(nodes, attack):
    honest, _ = _reply(nodes, None)
    poisoned, _ = _reply(nodes, None, **{"byzantine-nodes": NODES, "attack": attack})
    assert list(poisoned["arrays"].keys()) == list(honest["arrays"].keys())
    changed = [k for k in honest["arrays"].keys()
               if not np.array_equal(poisoned["arrays"][k].numpy(), honest["arrays"][k].numpy())]
    assert changed and all(np.isfinite(poisoned["arrays"][k].numpy()).all() for k in changed)


def test_only_the_seeded_partitions_attack(nodes):
    attackers = attacking_partitions(42, 1, NODES)
    assert attackers == attacking_partitions(42, 1, NODES) and len(attackers) == 1
    honest, _ = _reply(nodes, WINDOW)
    # with one attacker of two, partition 0 attacks exactly when the seed drew it
    seeded, _ = _reply(nodes, WINDOW, **{"byzantine-nodes": 1, "attack": "sign-flip"})
    same = all(np.array_equal(seeded["arrays"][k].numpy(), honest["arrays"][k].numpy())
               for k in honest["arrays"].keys())
    assert same == (0 not in attackers)
    assert {tuple(attacking_partitions(seed, 1, 8)) for seed in range(20)} != {tuple(attackers)}  # seed-drawn


def test_label_flip_maps_a_loaders_labels_too_again_and_again():
    model = torch.nn.Linear(3, 4)  # four classes: y -> 3 - y
    loader = [(torch.zeros(2, 3), torch.tensor([0, 1])), {"x": torch.zeros(2, 3), "label": torch.tensor([3, -100])}]
    flipped = Attack("label-flip", 10.0, 0).data(loader, model)
    for _ in range(2):  # a loader restarts when local-steps outlast it
        assert [labels.tolist() for _, labels in flipped] == [[3, 2], [0, -100]]  # ignored labels stay
