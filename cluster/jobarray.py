"""A Slurm job array of ready sbatch scripts: task i runs script i.

Each script is a complete one-run job (`cluster/slurm.py`: rendezvous, USR1
checkpoint-and-requeue). The array runs it with `exec bash SCRIPT`, so its `#SBATCH` lines
are comments there: the array's own header carries the resources, which must therefore be
the same for every script (`common_header`). What the tasks computed is for the caller to
judge; this module renders, submits, follows and cancels.

    header = common_header(scripts)                  # None: the scripts ask for different shapes
    path.write_text(render_array("sweep 'x'", "vidscale-sweep-x", header, scripts, names, logs))
    job = submit_array(path)
    for i in follow_array(job, len(scripts)):        # a task index as each task leaves the queue,
        ...                                          # None after every poll
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Iterator

from vidscale.cluster.slurm import call, first_error

# lines of a run's header that name the run itself, not the resources it needs
OWN_LINES = ("#SBATCH --job-name", "#SBATCH --output")


def common_header(scripts: list[Path]) -> list[str] | None:
    """The `#SBATCH` resource lines every script shares, or None when they differ."""
    heads = {tuple(l for l in s.read_text().splitlines() if l.startswith("#SBATCH") and not l.startswith(OWN_LINES))
             for s in scripts}
    return list(heads.pop()) if len(heads) == 1 else None


def render_array(title: str, job_name: str, header: list[str], scripts: list[Path], names: list[str],
                 logs: Path) -> str:
    """The array's sbatch script; task i appends its output to LOGS/NAMES[i].log and Slurm's
    own output of the task goes to LOGS/slurm-JOB_TASK.out."""
    q = shlex.quote
    return "\n".join([
        "#!/bin/bash",
        f"# vidscale {title}: task i runs the i-th script below.",
        f"#SBATCH --job-name={job_name}"[:80],
        f"#SBATCH --array=0-{len(scripts) - 1}",
        f"#SBATCH --output={logs}/slurm-%A_%a.out",
        *header,
        "SCRIPTS=(" + " ".join(q(str(s)) for s in scripts) + ")",
        "NAMES=(" + " ".join(q(n) for n in names) + ")",
        f"LOGS={q(str(logs))}",
        "# exec keeps this shell's pid, so the USR1 of --signal=B: reaches the run's own trap",
        'exec bash "${SCRIPTS[$SLURM_ARRAY_TASK_ID]}" >>"$LOGS/${NAMES[$SLURM_ARRAY_TASK_ID]}.log" 2>&1', ""])


def submit_array(path: Path, what: str = "job array") -> str:
    """`sbatch --parsable PATH`; returns the array's job id (its tasks are JOB_0, JOB_1, ...)."""
    r = call(["sbatch", "--parsable", str(path)])
    if r.returncode != 0:
        raise ValueError(f"Slurm refuses the {what} ({path}): {first_error(r.stderr)}")
    return r.stdout.strip().split(";")[0]


def task_id(job: str, i: int) -> str:
    return f"{job}_{i}"


def queued_tasks(job: str) -> dict[str, str]:
    """Task id -> state of the array's tasks that squeue still lists (pending or running)."""
    r = call(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"])
    if r.returncode != 0:
        return {}
    return {l.split()[0]: l.split()[1] for l in r.stdout.splitlines() if l.strip()}


def follow_array(job: str, n: int, poll_s: float = 2.0) -> Iterator[int | None]:
    """Yields each task's index once it has left the queue, and None after every poll (so
    the caller can report progress), until all n tasks have ended."""
    active = set(range(n))
    while active:
        time.sleep(poll_s)
        queued = queued_tasks(job)
        for i in sorted(active):
            if task_id(job, i) not in queued:
                active.discard(i)
                yield i
        yield None


def cancel_array(job: str) -> None:
    call(["scancel", job])
