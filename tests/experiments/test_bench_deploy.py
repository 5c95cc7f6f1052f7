"""``experiments/bench_deploy.py``: its arms, and the stages ``--timeline`` cuts a hop into."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_deploy", EXPERIMENTS / "bench_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_arms_change_one_part_each():
    arms = _bench().ARMS
    assert list(arms) == ["stock", "fast-poll", "launcher"]
    # stock -> fast-poll: the ServerApp alone; fast-poll -> launcher: the nodes alone
    assert {k: v for k, v in arms["stock"].items() if k != "env"} == {"launcher": False, "fast-poll": False}
    assert arms["fast-poll"] == {**arms["launcher"], "launcher": False}
    assert arms["stock"]["env"] == {"SNAKE_FLOWER_STOCK_FLOWER": "1"}


def test_a_hop_is_cut_at_its_milestones_from_every_process_log(tmp_path: Path):
    """One hop's calls, as the processes of a run log them; the SuperNode's poll began just
    before the push (it still took the hop's message), a query before the hop is left out."""
    bench = _bench()
    calls = [(0.0, 0.01, "SnakeStrategy.configure_train"), (0.02, 1.0, "MeteredGrid.send_and_receive"),
             (0.02, 0.08, "HttpGrid.push_messages"), (0.015, 0.15, "_pull_and_store_message"),
             (0.1, 0.9, "run_clientapp"), (0.12, 0.2, "pull_task_input"), (0.21, 0.85, "ClientApp.__call__"),
             (0.25, 0.8, "train_window"), (0.85, 0.9, "push_message"),
             (0.86, 0.95, "push_object_contents_from_iterable"), (1.0, 1.01, "SnakeStrategy.merge")]
    query = [(-0.5, -0.4, "MeteredGrid.send_and_receive")]
    log = tmp_path / "timeline.log"
    log.write_text("".join(f"{began} {ended} 0.5 7 {name}\n" for began, ended, name in query + calls))
    [hop] = bench.hop_stages(log)
    assert hop["server push"] == 0.06 and hop["message at the node"] == 0.07
    assert hop["training (train_window)"] == 0.55 and hop["reply at the ServerApp"] == 0.05
    assert hop["clientapp_cpu_s"] == 0.5
    # the stages between the server's push and the reply add up to the hop
    between = [name for name, *_ in bench.STAGES if not name.startswith("ServerApp")]
    assert round(sum(hop[name] for name in between), 6) == 1.0 - 0.02


def test_the_timeline_site_module_compiles_and_names_every_timed_call(tmp_path: Path):
    bench = _bench()
    env = bench.timeline_env(tmp_path)
    site = Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "sitecustomize.py"
    compile(site.read_text(), str(site), "exec")
    named = {call for _, since, to in bench.STAGES for call, _ in (since, to)}
    assert named <= {f"{ref}" for refs in bench.TIMED.values() for ref in refs}
    done = subprocess.run([sys.executable, "-c", "import flwr.supernode.runtime.run_clientapp as m; "
                           "print(hasattr(m.run_clientapp, '__wrapped__'))"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True"], done.stderr
