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

A controller that does not answer (restarted, a network blip) is not a job that ended: squeue
is asked again, less and less often, for up to QUEUE_OUTAGE_S, with one warning line per
outage; past that, `QueueUnreachable` names the job and squeue's message. Only squeue's
"Invalid job id" (the controller has forgotten the job: MinJobAge after its end) means done.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Iterator

from vidscale.cluster.slurm import (FORGOTTEN, QUEUE_OUTAGE_S, SQUEUE_TIMEOUT_S, SlurmTimeout,  # noqa: F401
                                    call, first_error, forgotten, slurm_pattern)

# lines of a run's header that name the run itself, not the resources it needs
OWN_LINES = ("#SBATCH --job-name", "#SBATCH --output")


class QueueUnreachable(ConnectionError):
    """squeue failed for another reason than a job the controller forgot."""


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
        f"#SBATCH --output={slurm_pattern(logs)}/slurm-%A_%a.out",
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
    """Task id -> state of the array's tasks that squeue still lists (pending or running);
    {} once the controller has forgotten the job. Raises `QueueUnreachable` when squeue
    cannot say (controller down or slow)."""
    cmd = ["squeue", "-h", "-r", "-j", job, "-o", "%i %T"]
    try:
        r = call(cmd, timeout=SQUEUE_TIMEOUT_S)
    except SlurmTimeout:
        raise QueueUnreachable(f"squeue -j {job}: no answer in {SQUEUE_TIMEOUT_S:g} s") from None
    if r.returncode != 0:
        msg = first_error(r.stderr) or r.stdout.strip() or f"exit status {r.returncode}"
        if forgotten(msg):
            return {}
        raise QueueUnreachable(f"squeue -j {job}: {msg}")
    return {l.split()[0]: l.split()[1] for l in r.stdout.splitlines() if l.strip()}


def follow_array(job: str, n: int, poll_s: float = 2.0, outage_s: float | None = None,
                 warn=None) -> Iterator[int | None]:
    """Yields each task's index once it has left the queue, and None after every poll (so
    the caller can report progress), until all n tasks have ended. While squeue cannot reach
    the controller nothing is reported ended: it is asked again with a growing pause (up to
    30 s), a line to `warn` (default stderr) when the outage starts, and `QueueUnreachable`
    once it has lasted `outage_s` (default QUEUE_OUTAGE_S)."""
    outage_s = QUEUE_OUTAGE_S if outage_s is None else outage_s
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    active, pause, down_since = set(range(n)), poll_s, None
    while active:
        time.sleep(pause)
        try:
            queued = queued_tasks(job)
        except QueueUnreachable as e:
            now = time.monotonic()
            if down_since is None:
                down_since = now
                warn(f"vidscale: Slurm does not answer ({e}); job array {job}: asking again for up to {outage_s:g} s")
            if now - down_since >= outage_s:  # outage_s=0: give up at the first failure
                raise QueueUnreachable(f"job array {job}: Slurm has not answered for {now - down_since:.0f} s ({e}); "
                                       "its tasks may still run: run the same command again once Slurm answers "
                                       "(unfinished runs resume from their checkpoints)") from None
            pause = min(30.0, pause * 2, max(0.1, down_since + outage_s - now))
            yield None
            continue
        pause, down_since = poll_s, None
        for i in sorted(active):
            if task_id(job, i) not in queued:
                active.discard(i)
                yield i
        yield None


def cancel_array(job: str) -> bool:
    """scancel the whole array; False when Slurm did not answer (nothing to be done then)."""
    try:
        return call(["scancel", job]).returncode == 0
    except SlurmTimeout:
        return False
