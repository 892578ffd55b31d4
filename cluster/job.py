"""`RUN_DIR/job.json`: how a run was launched, so `status`, `cancel` and `resume` can find it.

    {"launcher": "slurm", "job_ids": ["41"], "command": ["vidscale", "train", ...],
     "state": "RUNNING", "run_dir": "/abs/runs/x", "address": "", "pid": 1234, "pid_start": 1.8e9,
     "submitted": "2026-11-25T14:00:00Z", "updated": "...", "history": [...]}

`state` is the launcher's own word for it where it has one (Slurm: PENDING, RUNNING,
COMPLETED, FAILED, CANCELLED, ...; Ray jobs: PENDING, RUNNING, SUCCEEDED, STOPPED, FAILED),
and for the processes vidscale runs itself: RUNNING, COMPLETED, FAILED, PREEMPTED.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FILE = "job.json"
DONE = {"COMPLETED", "SUCCEEDED", "FAILED", "CANCELLED", "STOPPED", "TIMEOUT", "NODE_FAIL",
        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "EXITED"}
"""States after which a job does no more work (a Slurm PREEMPTED job may still requeue)."""
SLURM_JOB_ID = re.compile(r"\d+(_\d+)?")
"""A Slurm job id (`123`) or array task (`123_4`): anything else handed to scancel/squeue
could be an option (`--me` cancels all of the user's jobs)."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class JobRecord:
    launcher: str
    """local, ray or slurm."""
    run_dir: str
    command: list[str]
    """The command line that launched the run (argv)."""
    job_ids: list[str] = field(default_factory=list)
    """Slurm job ids, or the Ray job submission id; empty for processes run here."""
    state: str = "SUBMITTED"
    address: str = ""
    """Ray: the cluster (or job server) address the job went to."""
    pid: int = 0
    """The launching process, for runs in the foreground (local, attached Ray)."""
    pid_start: float = 0.0
    """That process's start time (psutil's create_time): a recycled pid has another."""
    submitted: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    history: list[dict] = field(default_factory=list)
    """Earlier launches of the same run dir (resume), oldest first."""

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / FILE

    def save(self) -> None:
        """Atomic write (rename), so a concurrent `status` never reads half a file."""
        self.updated = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, self.path)

    def set_state(self, state: str) -> None:
        self.state = state
        self.save()

    def replace_state(self, state: str, only_from: set[str] | tuple[str, ...]) -> bool:
        """Set `state` only if job.json still records this launch in one of the `only_from`
        states: it is read again first, because the launcher itself may have recorded how the
        run ended meanwhile (a `status` or `cancel` working from an older read must not
        overwrite a COMPLETED). Returns whether it wrote; `self.state` is what job.json says."""
        try:
            cur = read_job(self.run_dir)
        except (FileNotFoundError, ValueError):
            return False
        same = (cur.submitted, cur.job_ids, cur.pid) == (self.submitted, self.job_ids, self.pid)
        if not same or cur.state not in only_from:
            self.state = cur.state if same else self.state
            return False
        self.history = cur.history
        self.set_state(state)
        return True


def read_job(run_dir: str | Path) -> JobRecord:
    p = Path(run_dir) / FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no job record (was the run started with `vidscale train`?)")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a valid job record ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: not a valid job record (expected a JSON object, got {type(d).__name__})")
    missing = [k for k in ("launcher", "run_dir", "command") if k not in d]
    if missing:
        raise ValueError(f"{p}: not a valid job record (missing {', '.join(missing)})")
    job = JobRecord(**{k: v for k, v in d.items() if k in JobRecord.__dataclass_fields__})
    if job.launcher == "slurm":
        for job_id in job.job_ids:
            if not isinstance(job_id, str) or not SLURM_JOB_ID.fullmatch(job_id):
                raise ValueError(f"{p}: job id {job_id!r} is not a Slurm job id (expected digits like 123 or 123_4)")
    return job


def process_start(pid: int) -> float:
    """When process `pid` started (0.0 if there is none)."""
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return 0.0


def same_process(job: JobRecord) -> bool:
    """Whether the launching process recorded in `job` still runs (not a recycled pid)."""
    return bool(job.pid and job.pid_start) and abs(process_start(job.pid) - job.pid_start) < 0.01


def new_job(launcher: str, run_dir: str | Path, command: list[str], **kw) -> JobRecord:
    """A fresh record; an earlier launch of the same run dir moves into `history`."""
    run_dir = str(Path(run_dir).absolute())
    history: list[dict] = []
    try:
        old = read_job(run_dir)
        history = old.history + [{k: v for k, v in asdict(old).items() if k != "history"}]
    except (FileNotFoundError, ValueError, TypeError):
        pass
    if kw.get("pid") and not kw.get("pid_start"):
        kw["pid_start"] = process_start(kw["pid"])
    return JobRecord(launcher=launcher, run_dir=run_dir, command=list(command), history=history, **kw)
