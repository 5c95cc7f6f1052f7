"""ProcessFamily: starts daemons, finds their children, stops exactly those, by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from snake_flower.deploy.processes import Member, ProcessFamily, alive

PY = sys.executable
SLEEP = "import time; time.sleep(300)"


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Is ``pid`` a live process? (A killed orphan may linger as a zombie until init reaps it.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _spawner(child: str, then: str = SLEEP) -> list[str]:
    """A Python process that starts ``child`` (a Python snippet), prints its PID, then runs ``then``."""
    return [PY, "-c", f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
                      f"print(p.pid, flush=True); {then}"]


def _child_pid(family: ProcessFamily, name: str) -> int:
    log = family.log_path(name)
    _wait_for(lambda: log.read_text().strip() != "")
    return int(log.read_text().split()[0])


def test_stops_the_daemon_and_its_child_and_nothing_else(tmp_path):
    outsider = subprocess.Popen([PY, "-c", SLEEP], start_new_session=True)  # not of the family
    try:
        with ProcessFamily(tmp_path) as family:
            daemon = family.start("daemon", _spawner(SLEEP))
            child = _child_pid(family, "daemon")
            members = {m.pid: m.root for m in family.members()}
            assert members == {daemon.pid: "daemon", child: "daemon"}
        assert not _running(child) and daemon.poll() is not None
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_an_orphan_is_found_by_its_session(tmp_path):
    # the daemon exits at once; its child is re-parented, as a SuperNode refused by the
    # SuperLink leaves its flower-superexec behind
    family = ProcessFamily(tmp_path)
    family.start("daemon", _spawner(SLEEP, then="pass"))
    child = _child_pid(family, "daemon")
    _wait_for(lambda: family.popens["daemon"].poll() is not None)
    assert [m.pid for m in family.members()] == [child]
    stopped = family.stop()
    assert [m.pid for m in stopped] == [child]
    assert not any(alive(m) for m in stopped)


def test_a_daemon_that_ended_before_it_was_recorded_still_finds_its_orphan(tmp_path, monkeypatch):
    # a busy machine may not run the starting process again until the daemon has exited
    class LatePopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _wait_for(lambda: Path(f"/proc/{self.pid}/stat").read_text().split(") ")[1][0] == "Z")

    monkeypatch.setattr("snake_flower.deploy.processes.subprocess.Popen", LatePopen)
    family = ProcessFamily(tmp_path)
    family.start("daemon", _spawner(SLEEP, then="pass"))
    child = _child_pid(family, "daemon")
    assert [m.pid for m in family.members()] == [child]
    assert [m.pid for m in family.stop()] == [child]
    assert not _running(child)


def test_a_child_in_its_own_session_is_found_by_its_parent(tmp_path):
    setsid = "import os, time; os.setsid(); time.sleep(300)"
    with ProcessFamily(tmp_path) as family:
        family.start("daemon", _spawner(setsid))
        child = _child_pid(family, "daemon")
        _wait_for(lambda: os.getsid(child) == child)
        assert child in {m.pid for m in family.members()}
    assert not _running(child)


def test_sigterm_first_then_sigkill(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"
    polite = [PY, "-c", SLEEP]
    family = ProcessFamily(tmp_path, grace=1.0)
    family.start("stubborn", [PY, "-c", stubborn])
    family.start("polite", polite)
    _wait_for(lambda: "ready" in family.log_path("stubborn").read_text())
    started = time.monotonic()
    family.stop()
    assert 1.0 <= time.monotonic() - started < 5.0  # waited the grace period for the stubborn one
    assert family.popens["stubborn"].returncode == -signal.SIGKILL
    assert family.popens["polite"].returncode == -signal.SIGTERM


def test_stop_by_name_leaves_the_others(tmp_path):
    with ProcessFamily(tmp_path) as family:
        first = family.start("first", [PY, "-c", SLEEP])
        second = family.start("second", [PY, "-c", SLEEP])
        assert [m.pid for m in family.stop(["first"])] == [first.pid]
        assert first.poll() is not None and second.poll() is None
    assert second.poll() is not None


def test_a_reused_pid_is_not_ours(tmp_path):
    me = os.getpid()
    assert not alive(Member(me, started=0, root="x"))  # same PID, another start time
    family = ProcessFamily(tmp_path)
    family.start("quick", [PY, "-c", "pass"]).wait()
    assert family.members() == [] and family.stop() == []


def test_output_goes_to_the_log_and_names_are_unique(tmp_path):
    family = ProcessFamily(tmp_path / "logs")
    family.start("talker", [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"]).wait()
    assert family.log_path("talker").read_text().split() == ["out", "err"]
    try:
        family.start("talker", [PY, "-c", "pass"])
    except ValueError as err:
        assert "talker" in str(err)
    else:
        raise AssertionError("a second process named talker was started")
