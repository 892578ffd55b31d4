"""`vidscale cancel RUN_DIR`: stop a run, whichever launcher started it.

Slurm: scancel; a Ray job: stop it through the job server; a run in the foreground of
another shell (local, or an attached Ray driver): SIGTERM to that process, which stops
its ranks (and its embedded Ray cluster).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from vidscale.cluster.job import DONE, read_job, same_process
from vidscale.cluster.ray_launcher import cancel_job
from vidscale.cluster.slurm import cancel


def add_parser(sub):
    p = sub.add_parser("cancel", help="cancel a run (any launcher)", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR")
    return p


STOP_WAIT_S = 30.0
"""How long `cancel` waits for a local launcher to stop its ranks (and its embedded Ray)."""
ENTRY_MODULES = ("vidscale.scaling.cli", "vidscale.cluster.")
"""`python -m` modules that launch runs (the CLI, the Ray launcher and Slurm tasks)."""


def _is_launcher(job) -> bool:
    """Guard against a recycled pid: only signal the very process job.json recorded (same
    start time) and only if it runs vidscale (the `vidscale` command or `python -m` one of
    ENTRY_MODULES)."""
    if not same_process(job):
        return False
    try:
        argv = open(f"/proc/{job.pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(Path(a).name == "vidscale" or a.startswith(ENTRY_MODULES) for a in argv)


def run(args) -> int:
    job = read_job(args.run_dir)
    if job.state in DONE:
        print(f"{args.run_dir}: already {job.state}")
        return 0
    what = f"{job.launcher} {','.join(job.job_ids) or f'pid {job.pid}'}"
    if job.launcher == "slurm" and job.job_ids:
        cancel(job)
    elif job.launcher == "ray" and job.job_ids:
        if not cancel_job(job):
            print(f"{args.run_dir}: {what} had already ended ({job.state})")
            return 0
    else:
        if not _is_launcher(job):
            raise ValueError(f"{args.run_dir}: its launching process ({job.pid}) is not running")
        os.kill(job.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while _is_launcher(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        # the launcher records CANCELLED itself as it stops; one that is still stopping (an
        # embedded Ray cluster takes a while), or was killed, is recorded here, but a run that
        # ended otherwise just before (COMPLETED) keeps what it recorded
        if not job.replace_state("CANCELLED", {"RUNNING"}) and job.state != "CANCELLED":
            print(f"{args.run_dir}: {what} had already ended ({job.state})")
            return 0
    print(f"{args.run_dir}: cancelled {what}")
    return 0
