"""``compare --jobs``: child command lines, progress read from logs, exit codes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from snake_flower.cli import main
from snake_flower.harness import jobs
from snake_flower.harness.jobs import child_command, latest_progress, run_side_by_side


def test_child_command_is_the_users_run_with_the_strategy_added():
    command = child_command("exp.toml", "lr=0.01 window=1", "split", 8, "/tmp/out")
    assert command[:4] == [sys.executable, "-m", "snake_flower.cli", "run"]
    assert command[command.index("--run-config") + 1] == "lr=0.01 window=1 run-name=split"
    assert command[command.index("--config") + 1] == "exp.toml"
    assert command[command.index("--num-supernodes") + 1] == "8"
    assert "--config" not in child_command(None, "", "snake", 2, "o")


def test_latest_progress_reads_the_last_mark(tmp_path):
    log = tmp_path / "snake.log"
    assert latest_progress(log) == "starting"
    log.write_text("INFO: [snake 1/128] acc 0.3000  conv1+conv2  merged\nnoise\n"
                   "INFO: [snake 2/128] conv2+conv3  merged  down 1.0 kB\n")
    assert latest_progress(log) == "2/128"
    log.write_text(log.read_text() + "INFO: [snake 4/128] acc 0.8123  conv3  merged\n")
    assert latest_progress(log) == "4/128 acc 0.8123"


def test_side_by_side_returns_each_exit_code_and_keeps_each_log(tmp_path, capsys):
    ok = [sys.executable, "-c", "print('[ok 1/1] acc 0.5000')"]
    bad = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    codes = run_side_by_side({"ok": ok, "bad": bad}, tmp_path, every=0.0)
    assert codes == {"ok": 0, "bad": 3}
    assert "[ok 1/1] acc 0.5000" in (tmp_path / "ok.log").read_text()
    assert "boom" in (tmp_path / "bad.log").read_text()
    shown = capsys.readouterr().out
    assert "ok done" in shown and "bad failed (exit 3)" in shown


def test_jobs_below_one_is_a_config_error(tmp_path, capsys):
    code = main(["compare", "--run-config", "task=synthetic", "--jobs", "0", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == "snake-flower: error: jobs: must be >= 1, got 0"
    assert not any(tmp_path.iterdir())


def test_sigterm_interrupts_every_child_even_with_sigint_ignored(tmp_path):
    child = [sys.executable, "-c", "import time\ntry:\n    print('ready', flush=True); time.sleep(60)\n"
             "except KeyboardInterrupt:\n    print('interrupted', flush=True)"]

    def signal_once_both_are_ready():
        deadline = time.time() + 60
        while time.time() < deadline and not all(
                (tmp_path / f"{n}.log").exists() and "ready" in (tmp_path / f"{n}.log").read_text()
                for n in ("a", "b")):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `nohup ... &`
    threading.Thread(target=signal_once_both_are_ready, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_side_by_side({"a": child, "b": child}, tmp_path, every=60.0)
    finally:
        signal.signal(signal.SIGINT, ignored)
    for name in ("a", "b"):  # both were started, then stopped through their own SIGINT handling
        assert (tmp_path / f"{name}.log").read_text().split() == ["ready", "interrupted"]


def test_a_child_that_ignores_sigint_is_terminated_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "GRACE_S", 1.0)
    stubborn = [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)"]

    def signal_once_ready():
        while "ready" not in ((tmp_path / "s.log").read_text() if (tmp_path / "s.log").exists() else ""):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_ready, daemon=True).start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_side_by_side({"s": stubborn}, tmp_path, every=60.0)
    assert time.time() - started < 30  # not the child's 60 s: SIGTERM ended it


def test_at_most_jobs_run_at_once_split_first(tmp_path):
    stamp = [sys.executable, "-c", "import time; print(time.time()); time.sleep(1.5); print(time.time())"]
    codes = run_side_by_side({"snake": stamp, "fedavg": stamp, "split": stamp}, tmp_path, jobs=1, every=60.0)
    assert codes == {"snake": 0, "fedavg": 0, "split": 0}
    spans = {n: [float(v) for v in (tmp_path / f"{n}.log").read_text().split()] for n in codes}
    order = sorted(spans, key=lambda n: spans[n][0])
    assert order == ["split", "snake", "fedavg"]
    assert all(spans[a][1] <= spans[b][0] for a, b in zip(order, order[1:]))  # never two at once


def test_a_strategy_named_twice_is_a_config_error(tmp_path, capsys):
    code = main(["compare", "--run-config", "task=synthetic", "--strategies", "snake,snake", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == "snake-flower: error: strategies: each may appear once, got snake,snake"


def test_split_learning_keeps_its_priority_and_the_others_yield(tmp_path):
    show = [sys.executable, "-c", "import os; print('nice', os.nice(0))"]
    assert run_side_by_side({"split": show, "snake": show, "fedavg": show}, tmp_path, every=60.0) == \
        {"split": 0, "snake": 0, "fedavg": 0}
    own = os.nice(0)
    nice = {name: int((tmp_path / f"{name}.log").read_text().split()[1]) for name in ("split", "snake", "fedavg")}
    assert nice == {"split": own, "snake": min(19, own + 10), "fedavg": min(19, own + 10)}


def test_an_interrupted_comparison_ends_with_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(jobs, "run_side_by_side", interrupted)
    code = main(["compare", "--run-config", "task=synthetic", "--jobs", "2", "--out", str(tmp_path)])
    assert code == 130
    err = capsys.readouterr().err.strip()
    assert err == f"snake-flower: interrupted (signal 15); every run was stopped, logs in {tmp_path.resolve()}"
