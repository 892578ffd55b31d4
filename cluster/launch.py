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

from vidscale.cluster.job import new_job
from vidscale.cluster.local import launch_local
from vidscale.cluster.ray_launcher import launch_ray
from vidscale.cluster.slurm import submit
from vidscale.scaling.config import LAUNCHERS
from vidscale.scaling.train.loop import default_run_dir, train
from vidscale.scaling.train.signals import EXIT_REQUEUE


def with_run_dir(cfg):
    """Fix the run dir (absolute) before anything starts, so every rank and record agrees."""
    run_dir = Path(cfg.train.run_dir or default_run_dir(cfg)).absolute()
    return replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))


def launch(cfg, *, wait: bool = False, detach: bool = False, command: list[str] | None = None) -> int:
    cfg = with_run_dir(cfg)
    command = list(command if command is not None else sys.argv)
    how = cfg.cluster.launcher
    if detach and how == "local":
        raise ValueError("--detach needs --launcher ray or slurm (a local run lives in this process)")
    if how == "slurm":
        return submit(cfg, wait=wait, command=command)
    if how == "ray":
        return launch_ray(cfg, wait=wait, detach=detach, command=command)
    return launch_here(cfg, command)


def launch_here(cfg, command: list[str]) -> int:
    job = new_job("local", cfg.train.run_dir, command, state="RUNNING", pid=os.getpid())
    job.save()
    code = 1
    signal.signal(signal.SIGTERM, _interrupt)  # `vidscale cancel`: record it, stop the ranks
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
    job.set_state({0: "COMPLETED", EXIT_REQUEUE: "PREEMPTED"}.get(code, "FAILED"))
    return code


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


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


def launch_overrides(args) -> list[str]:
    """`--launcher/--address` as recipe overrides (they are recipe keys: cluster.*)."""
    out = []
    if getattr(args, "launcher", None):
        out.append(f"cluster.launcher={args.launcher}")
    if getattr(args, "address", None):
        out.append(f"cluster.address={args.address}")
    return out
