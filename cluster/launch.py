"""`launch(cfg)`: run a resolved recipe with the launcher it names (`cluster.launcher`).

    local   `cluster.nproc` processes here (`cluster/local.py`), or `train(cfg)` in this
            process when nproc is 1
    ray     Ray Train workers, one per rank (`cluster/ray_launcher.py`); `detach` submits
            a Ray job instead and returns its id
    slurm   an sbatch script in the run dir, submitted with sbatch (`cluster/slurm.py`)

`vidscale train` and `vidscale resume` both end here. Every launch records itself in
RUN_DIR/job.json (`cluster/job.py`). Returns the process exit code: 0, a failure, or
`scaling.train.signals.EXIT_REQUEUE` when the ranks stopped after a pre-emption checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from vidscale.cluster.job import DONE, new_job, read_job
from vidscale.cluster.local import launch_local
from vidscale.cluster.ray_launcher import RAY_DONE, address_of, follow_job, is_job_server, job_status, launch_ray
from vidscale.cluster.slurm import SlurmTimeout, ended, follow, job_state, submit
from vidscale.scaling.checkpoint.rundir import RunLock, check_fresh
from vidscale.scaling.config import LAUNCHERS
from vidscale.scaling.train import init_from
from vidscale.scaling.train.loop import default_run_dir, train
from vidscale.scaling.train.signals import EXIT_REQUEUE, stop_on


def with_run_dir(cfg):
    """Fix the run dir (absolute) before anything starts, so every rank and record agrees."""
    run_dir = Path(cfg.train.run_dir or default_run_dir(cfg)).absolute()
    return replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))


def launch(cfg, *, wait: bool = False, detach: bool = False, command: list[str] | None = None) -> int:
    """Own the run directory (its lock, before anything is written there), check that a fresh
    run does not land on an earlier one, then start the ranks. A run driven from here (local
    processes, Ray workers) keeps the lock to its end, and its ranks inherit it; a submitted
    job (Slurm, a detached Ray job) releases it once submitted, and the job's rank 0 takes it."""
    cfg = with_run_dir(cfg)
    command = list(command if command is not None else sys.argv)
    how = cfg.cluster.launcher
    if detach and how == "local":
        raise ValueError("--detach needs --launcher ray or slurm (a local run lives in this process)")
    submitted = how == "slurm" or (how == "ray" and (detach or is_job_server(address_of(cfg))))
    with RunLock(cfg.train.run_dir).acquire(command):
        check_fresh(cfg.train.run_dir, cfg.checkpoint.resume)
        check_no_queued_job(cfg.train.run_dir)
        if how == "local" or Path(cfg.train.init_from).exists():  # else only the cluster may see it
            init_from.check(cfg, Path(cfg.train.run_dir))
        if not submitted:
            return launch_ray(cfg, command=command) if how == "ray" else launch_here(cfg, command)
        code = submit(cfg, command=command) if how == "slurm" else launch_ray(cfg, detach=True, command=command)
    if wait and code == 0:  # the lock is the job's now: follow it from outside
        job = read_job(cfg.train.run_dir)
        return follow(job) if how == "slurm" else follow_job(job)
    return code


def check_no_queued_job(run_dir) -> None:
    """A Slurm job or detached Ray job of this run dir that is still queued or running (a Slurm
    job requeued after a node failure or a pre-emption, a Ray job whose ranks have not started:
    the run lock is free meanwhile) will continue the run itself: a second job on the same
    directory would only race it for the lock. Refused too while Slurm cannot be asked."""
    try:
        job = read_job(run_dir)
    except (FileNotFoundError, ValueError):
        return
    if not job.job_ids or job.state in DONE:
        return
    follow_with = f"follow it with `vidscale status {run_dir}`, or `vidscale cancel {run_dir}` first"
    if job.launcher == "ray":
        try:
            state = job_status(job)
        except Exception:  # noqa: BLE001 - that cluster is gone (or unreachable): its job with it
            return
        if state not in RAY_DONE:
            raise ValueError(f"{run_dir}: Ray job {job.job_ids[-1]} of this run is still {state} and will "
                             f"continue it; {follow_with}")
        return
    if job.launcher != "slurm":
        return
    try:
        st = job_state(job.job_ids[-1])
    except SlurmTimeout:
        st = {"source": "unreachable", "reason": "squeue: no answer"}
    except ValueError:  # no Slurm commands here: the record cannot be checked
        return
    if st["source"] == "unreachable":
        raise ValueError(f"{run_dir}: cannot ask Slurm whether job {job.job_ids[-1]} of this run still runs "
                         f"({st['reason']}); try again once the controller answers")
    if not ended(st):
        again = f", requeued {st['restarts']}x" if st["restarts"] else ""
        raise ValueError(f"{run_dir}: Slurm job {job.job_ids[-1]} of this run is still {st['state']}{again} and "
                         f"will continue it; {follow_with}")


def launch_here(cfg, command: list[str]) -> int:
    job = new_job("local", cfg.train.run_dir, command, state="RUNNING", pid=os.getpid())
    job.save()
    code = 1
    # `vidscale cancel` (SIGTERM) or a closed terminal (SIGHUP) stops the ranks like Ctrl-C, the
    # job is recorded CANCELLED and the command exits 128 + the signal (`scaling/cli/main.py`)
    restore = stop_on(signal.SIGTERM, signal.SIGHUP)
    try:
        if cfg.cluster.nproc > 1:
            code = launch_local(cfg)
        else:
            result = train(cfg)
            print(json.dumps(result))
            code = EXIT_REQUEUE if result.get("preempted") else 0
    except KeyboardInterrupt:
        job.set_state("CANCELLED")
        raise
    except BaseException:
        job.set_state("FAILED")
        raise
    finally:
        for s, h in restore.items():
            signal.signal(s, h)
    job.set_state({0: "COMPLETED", EXIT_REQUEUE: "PREEMPTED"}.get(code, "FAILED"))
    return code


# -- command-line flags shared by `vidscale train` and `vidscale resume` -----------------------------
def add_launch_args(p) -> None:
    p.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="where the ranks run (default cluster.launcher): local processes, Ray Train "
                        "workers, or a Slurm job")
    p.add_argument("--wait", action="store_true",
                   help="Slurm / detached Ray: follow the job to its end and exit with its status")
    p.add_argument("--detach", action="store_true",
                   help="Ray: submit a Ray job and return its id instead of driving the workers from here")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (host:port, or a dashboard http://host:8265 for jobs; "
                        "default cluster.address, then RAY_ADDRESS, else an embedded local cluster)")


def launch_values(args) -> dict:
    """`--launcher/--address` as recipe values (they are recipe keys: cluster.*), set exactly
    as given (`load_config(values=...)`), never parsed as YAML."""
    out = {}
    if getattr(args, "launcher", None):
        out["cluster.launcher"] = args.launcher
    if getattr(args, "address", None):
        out["cluster.address"] = args.address
    return out
