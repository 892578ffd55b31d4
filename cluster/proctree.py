"""The processes a launcher started, read from /proc, so they can be stopped without touching
anyone else's: a pid is only ever signalled together with the start time it had when it was
recorded (a pid reused by another process is left alone).

    before = children(os.getpid())
    ... start something ...
    roots = [p for p in map(proc, children(os.getpid()) - before) if p]
    stop_tree(tree(roots))          # them and everything they started, still alive

Linux only (/proc); elsewhere every function finds nothing.
"""
from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple


class Proc(NamedTuple):
    pid: int
    start: int
    """Start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, an identity."""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the name may hold spaces and ')'


def proc(pid: int) -> Proc | None:
    s = _stat(pid)
    return Proc(pid, int(s[19])) if s else None


def _pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []


def _parents() -> dict[int, int]:
    out = {}
    for pid in _pids():
        s = _stat(pid)
        if s:
            out[pid] = int(s[1])
    return out


def children(pid: int) -> set[int]:
    return {c for c, p in _parents().items() if p == pid}


def alive(p: Proc) -> bool:
    """Still the same process, and not a zombie."""
    s = _stat(p.pid)
    return bool(s) and int(s[19]) == p.start and s[0] not in ("Z", "X")


def tree(roots: list[Proc]) -> list[Proc]:
    """The roots still alive and every living descendant of them."""
    parents = _parents()
    kids: dict[int, list[int]] = {}
    for c, p in parents.items():
        kids.setdefault(p, []).append(c)
    out, todo = [], [r for r in roots if alive(r)]
    seen = set()
    while todo:
        p = todo.pop()
        if p.pid in seen:
            continue
        seen.add(p.pid)
        out.append(p)
        todo += [q for q in map(proc, kids.get(p.pid, [])) if q and q.pid not in seen]
    return out


def _reap(p: Proc) -> None:
    try:
        os.waitpid(p.pid, os.WNOHANG)  # our own child: collect it, or it stays a zombie
    except ChildProcessError:
        pass


def wait_gone(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """Wait up to timeout_s for them to end; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            _reap(p)
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def stop_tree(procs: list[Proc], grace_s: float = 2.0) -> list[Proc]:
    """Let them end by themselves for grace_s, then SIGKILL the rest (the pid is checked
    against its start time just before). Returns those that would not go (none, normally)."""
    left = wait_gone(procs, grace_s)
    for p in left:
        if alive(p):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return wait_gone(left, 10.0)
