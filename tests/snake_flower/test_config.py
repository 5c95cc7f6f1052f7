"""Run-config defaults, parsing and one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from snake_flower.config import (
    DEFAULTS,
    ConfigError,
    RunConfig,
    field_name,
    key_of,
    parse_overrides,
    perplexity_levels,
    resolve,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_holds_every_default():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS


def test_every_field_has_one_kebab_case_key_and_its_default():
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert list(DEFAULTS) == [key_of(name) for name in fields]
    assert all(field_name(key_of(name)) == name for name in fields)
    assert all(DEFAULTS[key_of(f.name)] == f.default for f in dataclasses.fields(RunConfig))


def test_resolve_gives_typed_fields_and_the_same_values_by_key():
    config = resolve({"num-server-rounds": 3, "out-dir": "elsewhere", "train-head": False})
    assert isinstance(config, RunConfig)
    assert (config.num_server_rounds, config.out_dir, config.train_head) == (3, "elsewhere", False)
    assert config.as_dict() == {**DEFAULTS, "num-server-rounds": 3, "out-dir": "elsewhere", "train-head": False}
    assert dict(config) == config.as_dict() and config["out-dir"] == "elsewhere"
    assert resolve(config, {"seed": 7}) == config.replace(seed=7)  # a resolved config is a layer too
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1


def test_the_run_name_is_the_strategy_unless_set():
    assert resolve({"strategy": "fedavg"}).name == "fedavg"
    assert resolve({"strategy": "fedavg", "run-name": "fedavg-600"}).name == "fedavg-600"


def test_overrides_parse_toml_values_and_bare_words():
    assert parse_overrides('window=1 lr=0.01 train-head=false task=synthetic sync="window"') == {
        "window": 1, "lr": 0.01, "train-head": False, "task": "synthetic", "sync": "window"}


def test_resolve_coerces_and_keeps_defaults():
    config = resolve({"lr": 1, "num-server-rounds": 3.0})
    assert config["lr"] == 1.0 and isinstance(config["lr"], float)
    assert config["num-server-rounds"] == 3 and config["window"] == DEFAULTS["window"]


@pytest.mark.parametrize("override,key", [
    ({"task": "imagenet"}, "task"),
    ({"window": 5}, "window"),
    ({"window": 0}, "window"),
    ({"dirichlet-alpha": 0.0}, "dirichlet-alpha"),
    ({"dirichlet-alpha": -1}, "dirichlet-alpha"),
    ({"sweep": "sideways"}, "sweep"),
    ({"lr": "fast"}, "lr"),
    ({"train-head": "yes"}, "train-head"),
    ({"no-such-key": 1}, "no-such-key"),
    ({"kd-weight": 1.5}, "kd-weight"),
    ({"frozen-dtype": "fp16"}, "frozen-dtype"),  # only an LLM's segments cast their inputs (int8: every task)
    ({"payload-dtype": "bf16"}, "payload-dtype"),  # NumPy has no bfloat16
    ({"download-dtype": "bf16"}, "download-dtype"),
    ({"download-dtype": "int8", "strategy": "split"}, "download-dtype"),  # no model goes down
    ({"frozen-segments": "head"}, "train-head"),  # its neighbour would become the head
    ({"frozen-segments": "conv1", "train-stem": True}, "train-stem"),
    ({"rank-discovery": "lazy", "order": "capacity"}, "rank-discovery"),  # needs every node's report
    ({"rank-discovery": "some"}, "rank-discovery"),
    ({"concurrency": 2}, "concurrency"),  # train-head puts the head in every window
    ({"concurrency": 2, "train-head": False, "window": 3}, "concurrency"),  # 6 of 5 segments
    ({"concurrency": 2, "train-head": False, "window": 1, "strategy": "fedavg"}, "concurrency"),
    ({"concurrency": 2, "train-head": False, "window": "auto"}, "concurrency"),
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": 4, "lanes": 2, "train-head": False, "window": 1}, "lanes"),
    ({"lanes": 3, "window": 1}, "lanes"),  # lanes need disjoint windows too (train-head)
    ({"lanes": 2, "train-head": False, "window": 1, "strategy": "relay"}, "lanes"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        resolve(override)
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message


LEVELS_EXPECTED = 'perplexity-levels: expected comma-separated perplexities such as "12.5,9.0,7.5", got '


@pytest.mark.parametrize("override,message", [
    ({"target-perplexity": -1.0}, "target-perplexity: must be >= 0, got -1.0"),
    ({"target-perplexity": float("inf")}, "target-perplexity: must be finite (0 = off), got inf"),
    ({"target-perplexity": 7.5}, "target-perplexity: only task llm records a perplexity, not 'fashion-mnist'"),
    ({"perplexity-levels": "12.5,nine"}, LEVELS_EXPECTED + "'12.5,nine'"),
    ({"perplexity-levels": "12.5,,9"}, LEVELS_EXPECTED + "'12.5,,9'"),
    ({"perplexity-levels": "12.5,-3"}, "perplexity-levels: each level must be a finite perplexity > 0, got -3.0"),
    ({"perplexity-levels": "12.5,0"}, "perplexity-levels: each level must be a finite perplexity > 0, got 0.0"),
    ({"perplexity-levels": "12.5,9"},
     "perplexity-levels: the levels are counted with a perplexity target; set target-perplexity > 0"),
    ({"perplexity-levels": True}, "perplexity-levels: expected a string, got True"),
])
def test_a_bad_perplexity_target_or_level_is_one_line_naming_its_key(override, message):
    with pytest.raises(ConfigError) as err:
        resolve(override)
    assert str(err.value) == message


def test_a_perplexity_target_and_its_levels():
    llm = {"task": "llm", "model": "tiny-opt"}
    config = resolve({**llm, "target-perplexity": 7.5, "perplexity-levels": " 12.5, 9,7.5"})
    assert config.target_perplexity == 7.5 and perplexity_levels(config) == (12.5, 9.0, 7.5)
    # --run-config perplexity-levels=9: TOML reads one level as a number
    assert resolve({**llm, "target-perplexity": 7.5, "perplexity-levels": 9})["perplexity-levels"] == "9"
    assert perplexity_levels(resolve({})) == () and perplexity_levels({}) == ()  # off; results files of before
    with pytest.raises(ConfigError, match="^perplexity-levels: each level must be a finite perplexity > 0"):
        resolve({**llm, "target-perplexity": 7.5, "perplexity-levels": "12.5,-3"})
    # a run stopped at its target cannot show a level below it
    with pytest.raises(ConfigError, match="^perplexity-levels: with stop-after-held every level must be at or "
                                          "above target-perplexity 7.5, got 7$"):
        resolve({**llm, "target-perplexity": 7.5, "perplexity-levels": "9,7", "stop-after-held": 3})
    assert resolve({**llm, "target-perplexity": 7.5, "perplexity-levels": "9,7"})["perplexity-levels"] == "9,7"


@pytest.mark.parametrize("override", [{"task": "synthetic"}, {"task": "fashion-mnist", "strategy": "split"}])
def test_a_fit_budget_is_for_the_runs_compare_can_measure(override):
    with pytest.raises(ConfigError, match="^fit-budget-mb: compare measures a node's growth for task llm") as err:
        resolve({**override, "fit-budget-mb": 500})
    assert "\n" not in str(err.value)


def test_a_frozen_head_is_fine_once_train_head_is_off():
    assert resolve({"frozen-segments": "head", "train-head": False})["frozen-segments"] == "head"


def test_window_limit_counts_head_and_stem():
    assert resolve({"window": 4})["window"] == 4
    with pytest.raises(ConfigError, match="window"):
        resolve({"window": 4, "train-stem": True})


@pytest.mark.parametrize("args,key", [
    (["--run-config", "task=imagenet"], "task"),
    (["--run-config", "window=9"], "window"),
    (["--run-config", "dirichlet-alpha=0"], "dirichlet-alpha"),
    (["--num-supernodes", "0"], "num-supernodes"),
    (["--parallel", "-1"], "parallel"),
    (["--run-config", "task=llm model=tiny-opt window=5"], "window"),
    (["--num-supernodes", "30", "--run-config", "task=llm model=tiny-opt partitioner=topic"], "partitioner"),
    (["--config", "/nonexistent.toml"], "config"),
])
def test_cli_bad_config_fails_fast_with_one_line(args, key):
    proc = subprocess.run([sys.executable, "-m", "snake_flower.cli", "run", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"snake-flower: error: {key}")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_node_reads_an_optional_key_it_was_not_sent_as_the_key_s_default():
    from snake_flower.config.run_config import OPTIONAL_NODE_KEYS, node_message
    from snake_flower.node import _download_dtype
    from snake_flower.tasks.task import task_for
    from snake_flower.training.loop import LocalWork

    config = resolve({"task": "llm", "model": "tiny-opt", "window": 1, "train-head": False, "payload-dtype": "int8"})
    sent = node_message(config)
    assert not set(OPTIONAL_NODE_KEYS) & set(sent)  # at their defaults, none travels
    spelled = {**sent, **{key: DEFAULTS[key] for key in OPTIONAL_NODE_KEYS}}
    assert LocalWork.from_config(sent, kd=False) == LocalWork.from_config(spelled, kd=False)
    assert task_for(sent) is task_for(spelled)  # the same cached task: the same LoRA dropout and checkpointing
    assert _download_dtype(sent) == _download_dtype(spelled)
    assert set(OPTIONAL_NODE_KEYS) == {"optimizer", "lora-dropout", "gradient-checkpointing", "download-dtype"}
