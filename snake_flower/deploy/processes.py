"""A family of daemons started here and stopped here, by PID and by nothing else.

A real deployment is several long-running processes (``flower-superlink``, one
``flower-supernode`` per node), each with children of its own: the SuperLink's and
every SuperNode's ``flower-superexec``, the ``flwr-serverapp`` of a run, one
``flwr-clientapp`` per message. ``ProcessFamily`` starts the daemons, each in its
own session with its output in a log file, remembers their PIDs, and on ``stop()``
signals exactly those and the descendants it traced to them through ``/proc`` (by
parent PID or session id, never by name), first SIGTERM, then SIGKILL.

A PID is recognised by its start time as well, so a PID the kernel has reused
for someone else's process after ours ended is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

KILL_WAIT_S = 5.0  # how long stop() waits for SIGKILLed processes to be gone


@dataclass(frozen=True)
class Member:
    """One process of the family.

    ``started`` (the kernel's start time) tells it apart from a later process that
    reuses the PID; ``root`` names the started daemon it descends from (or is).
    """

    pid: int
    started: int
    root: str


def _stat(pid: int, zombie: bool = False) -> tuple[int, int, int] | None:
    """``(ppid, session id, start time)`` of ``pid`` from ``/proc/<pid>/stat``, or None if gone.

    A zombie has ended (only its parent's ``wait()`` is missing) and counts as gone, unless
    ``zombie`` asks for it: a daemon that ended before it was recorded still leads its session.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    if fields[0] == "Z" and not zombie:
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _process_table() -> dict[int, tuple[int, int, int]]:
    """``_stat`` of every process visible in ``/proc``."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    return table


def alive(member: Member) -> bool:
    """Is this very process (same PID, same start time) still running?"""
    stat = _stat(member.pid)
    return stat is not None and stat[2] == member.started


class ProcessFamily:
    """Start daemons, remember their PIDs, stop exactly them and their descendants.

    Parameters
    ----------
    log_dir : Path
        Where each process's stdout and stderr go, as ``<name>.log``.
    env : Mapping[str, str] | None (default: None)
        Environment of every process started (default: this process's).
    grace : float (default: 10.0)
        Seconds between SIGTERM and SIGKILL in ``stop()``.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, grace: float = 10.0) -> None:
        self.log_dir, self.env, self.grace = Path(log_dir), dict(env or os.environ), grace
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.popens: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, Member] = {}  # every member ever traced, started or descended
        self.seen_roots: dict[str, Member] = {}  # the started daemons themselves

    def start(self, name: str, command: Sequence[str], cwd: Path | None = None) -> subprocess.Popen:
        """Start ``command`` in its own session, logging to ``<log_dir>/<name>.log``."""
        if name in self.popens:
            raise ValueError(f"a process named {name!r} was already started")
        with open(self.log_path(name), "wb") as log:
            proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                    env=self.env, start_new_session=True)
        self.popens[name] = proc
        # not reaped yet, so readable even if it has already ended (a busy machine may not run
        # this process again before a short-lived daemon exits): its session still finds its children
        if (member := self._remember(proc.pid, name, zombie=True)) is not None:
            self.seen_roots[name] = member
        return proc

    def log_path(self, name: str) -> Path:
        """The log file of the process called ``name``."""
        return self.log_dir / f"{name}.log"

    def members(self) -> list[Member]:
        """Every process of the family running now: those started and their descendants."""
        self.trace()
        return [m for m in self.seen.values() if alive(m)]

    def trace(self) -> None:
        """Record the current descendants of the family's daemons.

        A descendant is found through its parent, or through its session: each daemon
        starts its own session (its PID is the session id), which its children keep
        unless they start one of their own. The session finds a child whose parent has
        already died (a SuperNode that exits leaves its ``flower-superexec`` behind);
        the parent link finds one that started a session of its own. ``stop()`` traces
        too; calling this now and then while the family runs also catches children
        that left both.
        """
        table = _process_table()
        sessions = {m.pid: m for m in self.seen_roots.values()}  # dead daemons' sessions may live on
        # ... unless the daemon's PID now leads someone else's session (PID reuse)
        sessions = {sid: m for sid, m in sessions.items() if sid not in table or table[sid][2] == m.started}
        children: dict[int, list[int]] = {}
        for pid, (ppid, sid, started) in table.items():
            children.setdefault(ppid, []).append(pid)
            leader = sessions.get(sid)
            known = self.seen.get(pid)
            if leader is not None and started >= leader.started and (known is None or not alive(known)):
                self._remember(pid, leader.root)
        todo = [m for m in self.seen.values() if alive(m)]
        while todo:
            parent = todo.pop()
            for pid in children.get(parent.pid, []):
                known = self.seen.get(pid)
                if known is None or not alive(known):
                    if (member := self._remember(pid, parent.root)) is not None:
                        todo.append(member)

    def stop(self, names: Iterable[str] | None = None) -> list[Member]:
        """SIGTERM the named daemons (default: all) and their descendants; SIGKILL stragglers.

        Returns every member that was signalled.
        """
        wanted = set(self.popens) if names is None else set(names)
        self.trace()
        targets = self._targets(wanted)
        for member in targets.values():
            _signal(member, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(alive(m) for m in targets.values()):
            time.sleep(0.1)
            self._reap()
            self.trace()  # a daemon may start one last child while it shuts down
            for pid, member in self._targets(wanted).items():
                if pid not in targets:
                    targets[pid] = member
                    _signal(member, signal.SIGTERM)
        for member in targets.values():
            _signal(member, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S  # SIGKILL is delivered asynchronously
        while time.monotonic() < deadline and any(alive(m) for m in targets.values()):
            time.sleep(0.02)
        self._reap()
        return list(targets.values())

    def __enter__(self) -> ProcessFamily:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _targets(self, wanted: set[str]) -> dict[int, Member]:
        return {m.pid: m for m in self.seen.values() if m.root in wanted and alive(m)}

    def _remember(self, pid: int, root: str, zombie: bool = False) -> Member | None:
        stat = _stat(pid, zombie)
        if stat is None:
            return None
        self.seen[pid] = member = Member(pid, stat[2], root)
        return member

    def _reap(self) -> None:
        for proc in self.popens.values():
            proc.poll()  # collect our own children's exit status so they do not linger as zombies


def _signal(member: Member, sig: signal.Signals) -> None:
    if alive(member):
        try:
            os.kill(member.pid, sig)
        except ProcessLookupError:
            pass
