"""``snake-flower memory --measure``: the ClientApp's two hops per arm, peak RSS beside the ledger."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from snake_flower.cli import main
from snake_flower.harness.measure import (
    LLM_RUN,
    NODES,
    MeasureError,
    MeasureOptions,
    arm_figures,
    arms_of,
    measure,
    ratios,
    run_config,
)
from snake_flower.harness.measure_grid import MeasureGrid, VisitsDone
from snake_flower.harness.memory_table import format_measured
from snake_flower.harness.message_files import MessageFileError, read_message, write_message

ROOT = Path(__file__).resolve().parents[3]
TINY = MeasureOptions(model="tiny-opt", batch=2, seq=64, steps=1, frozen_dtype="fp16")


def _message(**config) -> Message:
    arrays = ArrayRecord({"layer00.w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                          "layer01.w": Array(np.ones(4, dtype=np.float32))})
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=7,
                   message_type=MessageType.TRAIN, group_id="1")


def test_a_message_goes_through_a_file_as_flower_deflates_it(tmp_path):
    sent = _message(window=["layer01"], lr=0.5)
    written = write_message(sent, tmp_path / "m.bin")
    got, read = read_message(tmp_path / "m.bin")
    assert written == read > 6 * 4 + 4 * 4
    assert got.metadata.dst_node_id == 7 and got.metadata.message_type == MessageType.TRAIN
    assert dict(got.content["config"]) == {"window": ["layer01"], "lr": 0.5}
    assert np.array_equal(got.content["arrays"]["layer00.w"].numpy(), np.arange(6).reshape(2, 3))
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-5])
    with pytest.raises(MessageFileError, match="cut short"):
        read_message(tmp_path / "cut.bin")


class _Node:
    """Stands for the measured node's process: answers train messages with its window."""

    def __init__(self) -> None:
        self.hops = []

    def handle(self, message: Message) -> RecordDict:
        reply = Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"total-bytes": 10.0})}),
                        reply_to=message)
        self.hops.append({"message_type": message.metadata.message_type, "reply": reply})
        return reply.content


def test_the_other_nodes_answer_with_their_window_changed_and_the_grid_stops_after_two_visits():
    node = _Node()
    grid = MeasureGrid([1, 2, 3], node, segments={"layer00": ["layer00.w"], "layer01": ["layer01.w"]})
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=3, message_type=MessageType.QUERY)
    assert grid.send_and_receive([query])[0].content["info"]["rank"] == 2.0
    replies = grid.send_and_receive([_to(_message(window=["layer01"]), 2), _to(_message(window=["layer01"]), 1)])
    assert [reply.metadata.src_node_id for reply in replies] == [1, 2]  # the measured node first
    arrays = replies[1].content["arrays"]
    assert list(arrays) == ["layer01.w"] and np.allclose(arrays["layer01.w"].numpy(), 1.001)
    assert replies[1].content["metrics"]["total-bytes"] == 10.0  # the measured node's metric keys
    with pytest.raises(VisitsDone):  # the measured node's second train message: what is measured is in
        grid.send_and_receive([_to(_message(window=["layer00"]), 1)])


def _to(message: Message, node_id: int) -> Message:
    message.metadata.__dict__["_dst_node_id"] = node_id
    return message


def _hop(peak: int, message: int, total: int) -> dict:
    reply = Message(RecordDict({"metrics": MetricRecord({"total-bytes": float(total), "grad-bytes": 1.0,
                                                         "peak-rss-bytes": 5.0})}), reply_to=_message())
    return {"peak_rss_bytes": peak, "baseline_rss_bytes": 100, "rss_before_bytes": 100, "rss_after_bytes": 100, "rss_file_after_bytes": 0,
            "message_bytes": message, "reply_bytes": 1, "seconds": 1.0, "reply": reply,
            "config": {"segments-sent": ["layer00", "layer01"], "window": ["layer00"], "frozen-dtype": "bf16"}}


def test_an_arms_top_figures_are_its_hop_that_grew_more_and_its_ledger_counts_the_message():
    # the ledger: the message or the model, whichever is larger (the node releases the one into the other)
    got = arm_figures([_hop(300, 250, 150), _hop(400, 20, 200)], "snake-full")
    assert got["top_hop"] == "delta" and got["measured_in"] == "clientapp"
    assert (got["peak_rss_bytes"], got["baseline_rss_bytes"], got["ledger_bytes"], got["message_bytes"]) == (
        400, 100, 200, 20)
    full = got["hops"]["full-sync"]
    assert (full["grown_bytes"], full["ledger_bytes"], full["ledger_sum_bytes"]) == (200, 250, 400)
    assert full["grown_over_ledger"] == 0.8 and got["hops"]["delta"]["ledger_sum_bytes"] == 220
    assert got["hops"]["delta"]["train_ledger"] == {"total_bytes": 200, "grad_bytes": 1}
    fedavg = arm_figures([_hop(1100, 500, 1000), _hop(1100, 500, 1000)], "fedavg-full")
    out = ratios({"snake-full": got, "fedavg-full": fedavg})
    assert out["snake_over_fedavg_full"]["delta"] == {"grown": 0.3, "peak_rss": round(400 / 1100, 4),
                                                      "ledger": 0.2}
    assert out["met"] == {"full-sync_growth": True, "delta_growth": False, "growth_within_ledger": False}
    table = format_measured({"model": "m", "options": TINY.__dict__, "nodes": 8,
                             "arms": {"snake-full": got, "fedavg-full": fedavg}, "ratios": out})
    assert "delta grown 0.30" in table and "(MISSED)" in table


def test_the_arms_run_llm_tomls_hop():
    toml = tomllib.loads((ROOT / "experiments" / "llm.toml").read_text())
    assert {key: toml[key] for key in LLM_RUN} == LLM_RUN
    config = run_config("snake-lora", TINY)
    assert (config.strategy, config.finetune, config.frozen_segments, config.order) == ("snake", "lora", "", "fixed")
    assert arms_of("snake,fedavg-lora") == ("snake-full", "fedavg-lora")


def test_an_arm_runs_the_clientapp_in_a_fresh_process_per_hop():
    report = measure(TINY, arms=("snake-full",))
    arm = report["arms"]["snake-full"]
    assert arm["measured_in"] == "clientapp" and set(arm["hops"]) == {"full-sync", "delta"}
    full, delta = arm["hops"]["full-sync"], arm["hops"]["delta"]
    assert full["segments_sent"] == 2 and delta["segments_sent"] >= 1  # tiny-opt's two layers, both moved since
    assert full["message_bytes"] > 0 and delta["message_bytes"] > 0
    assert arm["peak_rss_bytes"] >= arm["baseline_rss_bytes"] > 0
    assert full["rss_before_bytes"] > 0 and delta["rss_before_bytes"] > 0
    assert full["train_ledger"]["frozen_param_bytes"] > 0 and full["frozen_dtype"] == "fp16"


@pytest.mark.parametrize(("argv", "match"), [
    (["--optimizer", "lion"], "optimizer"), (["--frozen-dtype", "int4"], "frozen-dtype"),
    (["--steps", "0"], "steps"), (["--model", "gpt-9"], "model"), (["--strategies", "split"], "strategies"),
])
def test_measure_errors_are_one_line_and_exit_2(capsys, argv, match):
    assert main(["memory", "--measure", "--model", "tiny-opt", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"snake-flower: error: {match}") and "\n" not in err


def test_bad_options_raise():
    with pytest.raises(MeasureError, match="batch"):
        MeasureOptions(batch=0)


EXPERIMENT = """
task = "llm"
model = "tiny-opt"
partitioner = "topic"
seq-len = 64
batch-size = 2
local-steps = 1
frozen-dtype = "fp16"
window = 1  # tiny-opt sweeps 1 segment besides its head

[fedavg-lora]
strategy = "fedavg"
finetune = "lora"
gradient-checkpointing = true
optimizer = "adamw"
"""


def test_an_experiments_table_is_measured_with_its_own_settings(tmp_path, capsys):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    out = tmp_path / "m.json"
    assert main(["memory", "--measure", "--config", str(tmp_path / "exp.toml"), "--arms", "fedavg-lora",
                 "--run-config", "lora-dropout=0.075", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fedavg-lora: fedavg, tiny-opt lora r8 dropout 0.075, 1 adamw steps on 2 x 64 tokens, frozen fp16, " \
           "gradient checkpointing" in table
    arm = json.loads(out.read_text())["arms"]["fedavg-lora"]
    assert arm["grown_bytes"] == max(hop["grown_bytes"] for hop in arm["hops"].values()) > 0
    settings = arm["run_config"]
    assert (settings["optimizer"], settings["gradient-checkpointing"], settings["lora-dropout"]) == (
        "adamw", True, 0.075)
    assert (settings["order"], settings["min-nodes"]) == ("fixed", NODES)  # the measurement's own chain
    for hop in arm["hops"].values():
        ledger = hop["train_ledger"]
        assert hop["optimizer"] == "adamw"  # what the node's message said
        # the node trained with AdamW: two moments per trainable parameter (SGD's momentum holds one)
        assert ledger["optimizer_bytes"] >= 2 * ledger["trainable_param_bytes"] > 0


class _Echo:
    """Stands for the measured node: answers its rank, and a train message with the arrays it was sent."""

    def __init__(self) -> None:
        self.hops, self.configs = [], []

    def handle(self, message: Message) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            return RecordDict({"info": MetricRecord({"rank": 0.0, "num-partitions": float(NODES)})})
        config = dict(next(iter(message.content.config_records.values())))
        arrays = next(iter(message.content.array_records.values()))
        metrics = MetricRecord({"total-bytes": 1.0, "num-examples": 1.0})
        reply = Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)
        self.hops.append({"reply": reply})
        self.configs.append(config)
        return reply.content


def test_relay_is_served_as_snake_with_the_whole_model_as_its_window():
    from snake_flower.config import resolve
    from snake_flower.harness.measure import _serve
    from snake_flower.harness.measure_runs import on_chain
    from snake_flower.tasks.task import build_model, swept_segment_keys, task_for

    config = on_chain(resolve({"task": "llm", "model": "tiny-opt", "partitioner": "topic", "strategy": "relay",
                               "optimizer": "adam", "window": 1}))
    segments = list(swept_segment_keys(build_model(task_for(config), config.seed), config))
    node = _Echo()
    _serve(config, node, [1000 + 7 * i for i in range(NODES)], timeout=60.0)
    assert len(node.configs) == 2
    assert all(sorted(sent["window"]) == sorted(segments) for sent in node.configs)  # every segment, every visit
    assert all(sent["optimizer"] == "adam" for sent in node.configs)  # the run's, through node_message


@pytest.mark.parametrize(("argv", "match"), [
    (["--arms", "fedavg-lora", "--optimizer", "adam"], "--optimizer: with --config"),
    (["--arms", "fedavg-lora", "--model", "smollm2-135m"], "--model: with --config"),
    ([], "arms: --config needs --arms"),
    (["--arms", "nope"], "strategies: 'nope' is neither a strategy nor a table"),
    (["--arms", "snake", "--run-config", "window=auto"], 'snake: window "auto" depends on'),
])
def test_an_experiments_arms_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, match):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    assert main(["memory", "--measure", "--config", str(tmp_path / "exp.toml"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"snake-flower: error: {match}") and "\n" not in err


def test_a_run_the_measurement_cannot_serve_is_refused():
    from snake_flower.config import resolve
    from snake_flower.harness.measure_runs import on_chain

    with pytest.raises(MeasureError, match="task 'synthetic'"):
        on_chain(resolve({"task": "synthetic"}))
