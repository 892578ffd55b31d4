"""`vidscale status [RUN_DIR ...]`: where each run is, for every launcher.

Reads RUN_DIR/job.json, asks the launcher (Slurm: squeue, then sacct, then the jobcomp
log when accounting is off; Ray jobs: the job server; local and attached Ray runs: whether
the launching process is alive), updates job.json, and adds the progress from
metrics.jsonl. A Slurm job also shows how often it was requeued and, while Slurm remembers it,
which of the cluster's nodes are down. Without RUN_DIR: every run under ./runs, at any depth
(a sweep's runs too), that has a job.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vidscale.cluster.job import read_job, same_process
from vidscale.cluster.ray_launcher import job_status
from vidscale.cluster.slurm import job_state


def add_parser(sub):
    p = sub.add_parser("status", help="show the state of runs (any launcher)", description=__doc__)
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run directories (default: every run under ./runs, sweeps' runs included)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    return p


def _alive(job) -> bool:
    if job.pid_start:  # a recycled pid is another process
        return same_process(job)
    try:
        os.kill(job.pid, 0)
    except OSError:
        return False
    return True


def refresh(job) -> dict:
    """The launcher's current view of the job; job.json is updated when the state changed."""
    extra: dict = {}
    if job.launcher == "slurm" and job.job_ids:
        try:
            st = job_state(job.job_ids[-1])
        except ValueError as e:  # no Slurm commands here: the last known state, and why
            return {"state": job.state, "reason": f"cannot ask Slurm: {e}"}
        state, extra = st["state"], {k: st[k] for k in ("reason", "restarts", "source", "nodes", "down_nodes")}
    elif job.launcher == "ray" and job.job_ids:
        try:
            state = job_status(job)
        except Exception as e:  # the cluster is gone: keep the last known state
            state, extra = job.state, {"reason": f"Ray job server unreachable: {type(e).__name__}"}
    else:  # a process here (local, or an attached Ray driver)
        if job.state == "RUNNING" and job.pid and not _alive(job):
            # ended without recording how (killed), unless it recorded its end since we read it
            job.replace_state("EXITED", {"RUNNING"})
        return {"state": job.state}
    if state != job.state and state != "UNKNOWN":
        job.set_state(state)
    return {"state": state, **extra}


def progress(run_dir: Path) -> dict:
    out: dict = {}
    m = run_dir / "metrics.jsonl"
    if m.is_file():
        lines = [l for l in m.read_text(errors="replace").splitlines() if l.strip()]
        if lines:
            try:
                last = json.loads(lines[-1])
                out = {"step": last.get("step"), "loss": last.get("loss")}
            except json.JSONDecodeError:
                pass
    for name in ("launch.yaml", "config.yaml"):
        if (run_dir / name).is_file():
            import yaml
            try:
                out["steps"] = yaml.safe_load((run_dir / name).read_text())["train"]["steps"]
            except Exception:
                pass
            break
    return out


def run(args) -> int:
    # every run under ./runs, at any depth (a sweep's runs live in runs/sweeps/NAME/runs/RUN)
    dirs = [Path(d) for d in args.run_dirs] or sorted(p.parent for p in Path("runs").rglob("job.json"))
    if not dirs:
        print("no runs with a job.json under ./runs")
        return 0
    code = 0
    for d in dirs:
        try:
            job = read_job(d)
        except FileNotFoundError as e:
            if args.run_dirs:
                raise ValueError(str(e)) from None
            continue
        except ValueError as e:  # a damaged job.json: name it, go on with the other runs
            if args.run_dirs:
                raise
            print(f"vidscale status: error: {e}", file=sys.stderr)
            code = 1
            continue
        rec = {"run_dir": str(d), "launcher": job.launcher, "job_ids": job.job_ids, **refresh(job),
               **progress(d)}
        if args.json:
            print(json.dumps(rec))
            continue
        ids = ",".join(job.job_ids) or (f"pid {job.pid}" if job.pid else "-")
        prog = f"step {rec.get('step', 0)}/{rec.get('steps', '?')}"
        if rec.get("loss") is not None:
            prog += f" loss {rec['loss']:.4f}"
        why = f" ({rec['reason']})" if rec.get("reason") and rec["reason"] not in ("None", "") else ""
        if rec.get("restarts"):
            why += f" requeued {rec['restarts']}x"
        if rec.get("down_nodes"):
            why += f"; nodes down: {','.join(rec['down_nodes'])}"
        print(f"{d}  {job.launcher} {ids}  {rec['state']}{why}  {prog}")
    return code
