"""What runs on this machine, read from /proc: the tests' own observer of processes.

Kept apart from `cluster/proctree.py` on purpose: the code under test uses that module to find
and stop what it started, so a test that checked its work with the same code could not see
that code's mistakes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int  # session id
    start: int  # start time in clock ticks since boot: (pid, start) names one process for ever
    state: str  # R, S, D, Z (zombie), X (dead) ...
    cmdline: str  # arguments joined by spaces


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def proc(pid: int) -> Proc | None:
    """The process `pid` now, or None if there is none."""
    text = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not text:
        return None
    f = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return Proc(pid, int(f[1]), int(f[3]), int(f[19]), f[0],
                _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip())


def processes() -> dict[int, Proc]:
    """Every living process (zombies and the dead left out), by pid."""
    out = {}
    for d in os.listdir("/proc"):
        p = proc(int(d)) if d.isdigit() else None
        if p and p.state not in "ZX":
            out[p.pid] = p
    return out


def alive(pid: int) -> bool:
    p = proc(pid)
    return p is not None and p.state not in "ZX"


def environ(pid: int) -> list[bytes]:
    """The process's environment as `KEY=VALUE` entries (empty if unreadable)."""
    return [e for e in _read(f"/proc/{pid}/environ").split(b"\0") if e]


def children(pid: int, procs: dict[int, Proc] | None = None) -> list[int]:
    procs = processes() if procs is None else procs
    return sorted(p.pid for p in procs.values() if p.ppid == pid)


def descendants(root: int, procs: dict[int, Proc] | None = None) -> set[int]:
    """Every living process below `root` (not `root` itself)."""
    procs = processes() if procs is None else procs
    out, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for p in procs.values():
            if p.ppid == parent and p.pid not in out:
                out.add(p.pid)
                todo.append(p.pid)
    return out
