"""A run directory is owned: one run at a time writes into it, and a fresh start never
lands on an earlier run.

- `RunLock`: an exclusive `flock` on RUN_DIR/.lock, taken by the launching process before it
  writes anything (job.json, configs) and held while the run is driven from there; ranks
  started by that launcher inherit it through the environment (VIDSCALE_RUN_LOCK); rank 0
  of a run that no launcher holds (a Slurm batch job, a detached Ray job) takes it itself.
  A second `train`/`resume` on the same directory fails at once, naming the holder. The
  kernel drops the lock when its holder dies: a crashed run never leaves a stale lock.
- `check_fresh`: a run that does not resume refuses a directory that already holds
  checkpoints or a finished run's files.
- `check_shared`: every rank, on whichever host, must see the run directory rank 0 owns
  (the same RUN_DIR/.lock token): a node without the shared filesystem is named before
  anything is written, rather than writing checkpoints nobody else can read.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

from vidscale.scaling.checkpoint import storage
from vidscale.scaling.parallel import collectives

LOCK_FILE = ".lock"
LOCK_ENV = "VIDSCALE_RUN_LOCK"
FINISHED_FILES = ("final.json", "model.safetensors")


class RunDirBusy(OSError):
    """Another process owns the run directory (one line: who)."""


class RunDirTaken(ValueError):
    """A fresh run was pointed at a directory that holds an earlier run."""


class RunDirNotShared(ValueError):
    """Some rank does not see the run directory rank 0 owns (one line: which host, which path)."""


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    cmd = " ".join(holder.get("command", []))[:120]
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({cmd})"


class RunLock:
    """An exclusive lock on a run directory; `acquire()` raises `RunDirBusy` naming the holder."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.token = ""

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, command: list[str] | None = None, wait_s: float = 0.0) -> "RunLock":
        """wait_s: keep trying that long (rank 0 of a submitted job, while its submitter lets go)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
            os.close(fd)
            raise RunDirBusy(f"{self.run_dir}: in use by {_describe(self.holder())} (lock {self.path}); wait for "
                             f"it to end, or `vidscale cancel {self.run_dir}`") from None
        token = secrets.token_hex(8)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": list(command or [])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd, self.token = fd, token
        os.environ[LOCK_ENV] = token  # ranks started from here run under this lock
        return self

    def release(self) -> None:
        if self.fd is not None:
            if os.environ.get(LOCK_ENV) == self.token:
                os.environ.pop(LOCK_ENV, None)
            os.ftruncate(self.fd, 0)  # no holder: a job that inherited our environment takes it anew
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def held_by_launcher(run_dir: str | Path) -> bool:
    """True when this process was started by the launcher that holds the run dir's lock."""
    token = os.environ.get(LOCK_ENV)
    return bool(token) and RunLock(run_dir).holder().get("token") == token


def restart_resume(run_dir: str | Path, resume: str) -> str:
    """What a restarted job (a Slurm requeue, a Ray worker group restart) resumes from: the
    newest checkpoint of its run dir when there is one (the run got further than any path it
    was started from), else what it was started with, else `auto`."""
    if storage.committed(Path(run_dir) / "checkpoints"):
        return "auto"
    return resume or "auto"


def check_fresh(run_dir: str | Path, resume: str) -> None:
    """A run that does not resume must not land on an earlier run's files. `auto` resumes
    when there is a checkpoint and starts fresh when there is none: a finished run whose
    checkpoints are gone (deleted to save space) is then refused like a fresh start would be,
    never trained again over its weights, final.json and metrics."""
    if resume and resume != "auto":
        return
    run_dir = Path(run_dir)
    found = storage.committed(run_dir / "checkpoints")
    if found:
        if resume == "auto":
            return
        raise RunDirTaken(f"{run_dir}: holds checkpoints of an earlier run (up to step {found[-1][0]}); continue "
                          f"it with `vidscale resume {run_dir}` (or --resume auto), or choose another --run-dir")
    for name in FINISHED_FILES:
        if (run_dir / name).exists():
            why = " and no checkpoint to continue from" if resume == "auto" else ""
            raise RunDirTaken(f"{run_dir}: holds a finished run ({name}){why}; choose another --run-dir")



def rank_host() -> str:
    """This rank's host as the others know it: the hostname and the address this rank reaches
    MASTER_ADDR from (hosts can share a hostname: containers, namespaces, cloned images)."""
    name, peer = socket.gethostname(), os.environ.get("MASTER_ADDR", "")
    addr = ""
    if peer:
        try:
            with socket.socket(socket.AF_INET6 if ":" in peer else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((peer, 9))  # UDP: no packet is sent, the kernel only picks the route
                addr = s.getsockname()[0]
        except OSError:
            addr = ""
    return f"{name} ({addr})" if addr else name


def check_shared(run_dir: str | Path, token: str) -> list[str]:
    """Every rank (a collective): each rank's host (`rank_host`), in rank order, when every rank
    sees `token` in RUN_DIR/.lock; else RunDirNotShared on every rank, naming the first host
    that does not and the path."""
    run_dir = Path(run_dir)
    sees = bool(token) and RunLock(run_dir).holder().get("token") == token
    seen = collectives.gather_json([sees, rank_host()])
    missing = [(r, host) for r, (ok, host) in enumerate(seen) if not ok]
    if missing:
        r, host = missing[0]
        more = (f" and {len(missing) - 1} more rank(s) on {', '.join(sorted({h for _, h in missing[1:]}))}"
                if len(missing) > 1 else "")
        raise RunDirNotShared(f"{run_dir}: not shared with host {host} (rank {r}{more}): it does not see this "
                              f"run's {run_dir / LOCK_FILE}; every node needs the same run directory (a shared "
                              f"filesystem)")
    return [host for _, host in seen]
