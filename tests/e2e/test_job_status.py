"""job.json, `vidscale status` and `vidscale cancel` for a run in the foreground of another
shell (the local launcher): the same commands as for Slurm and Ray jobs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, vidscale, vidscale_cmd  # noqa: E402
from procs import environ, processes  # noqa: E402

pytestmark = pytest.mark.e2e


def start_training(run: Path, *args: str) -> subprocess.Popen:
    """`vidscale train` of a long debug run in the background, returned once it logged a step."""
    proc = subprocess.Popen(vidscale_cmd("train", "recipes/debug.yaml", *args, "--run-dir", run,
                                         "--set", "train.steps=100000", "--set", "checkpoint.every=0",
                                         "--set", "logging.progress=false", "--set", "logging.every=1"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise
    return proc


def test_local_run_status_and_cancel(tmp_path):
    run = tmp_path / "run"
    proc = start_training(run)
    try:
        job = json.loads((run / "job.json").read_text())
        assert job["launcher"] == "local" and job["pid"] == proc.pid and job["command"][1:3] == ["train",
                                                                                                 "recipes/debug.yaml"]
        st = vidscale("status", run, "--json", timeout=60)
        rec = json.loads(st.stdout)
        assert rec["state"] == "RUNNING" and rec["step"] >= 1 and rec["steps"] == 100000
        c = vidscale("cancel", run, timeout=60)
        assert c.returncode == 0, c.stderr
        # the launcher stopped on the SIGTERM like a killed process would: 128 + 15
        assert proc.wait(timeout=30) == 143
        assert "vidscale train: interrupted (SIGTERM)" in proc.stderr.read()
        assert json.loads((run / "job.json").read_text())["state"] == "CANCELLED"
        again = vidscale("cancel", run, timeout=None)
        assert again.returncode == 0 and "already CANCELLED" in again.stdout
    finally:
        if proc.poll() is None:
            proc.kill()


def test_status_of_a_dir_without_job_record_is_one_clear_line(tmp_path):
    r = vidscale("status", tmp_path, timeout=60)
    assert r.returncode == 2 and "job.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def rank_pids(run: Path) -> list[int]:
    """Processes whose environment names this run's rank config (the local launcher's ranks)."""
    mark = f"VIDSCALE_CONFIG={run / 'logs' / 'config.yaml'}".encode()
    return [p for p in processes() if mark in environ(p)]


def test_hangup_stops_a_two_rank_local_run_and_its_ranks(tmp_path):
    """SIGHUP (the terminal closed) to `vidscale train --nproc 2`: both ranks stopped, the run
    recorded CANCELLED, exit 128 + 1."""
    run = tmp_path / "run"
    proc = start_training(run, "--nproc", "2")
    try:
        ranks = rank_pids(run)
        assert len(ranks) == 2, ranks
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=60) == 129
        assert "vidscale train: interrupted (SIGHUP)" in proc.stderr.read()
        assert rank_pids(run) == []
        assert json.loads((run / "job.json").read_text())["state"] == "CANCELLED"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_status_of_every_run_goes_on_where_slurm_cannot_be_asked(tmp_path):
    """`vidscale status` (no RUN_DIR: every run under ./runs, a sweep's too) on a machine without
    the Slurm commands: a Slurm run shows its last known state and why, and the other runs still show."""
    from vidscale.cluster.job import new_job
    new_job("slurm", tmp_path / "runs/a", ["vidscale", "train"], job_ids=["41"], state="RUNNING").save()
    new_job("local", tmp_path / "runs/b", ["vidscale", "train"], state="COMPLETED").save()
    new_job("local", tmp_path / "runs/sweeps/s/runs/c", ["vidscale", "train"], state="FAILED").save()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(vidscale_cmd("status"), cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    assert lines[0].startswith("runs/a  slurm 41  RUNNING (cannot ask Slurm: squeue: not found"), lines[0]
    assert lines[1].startswith("runs/b  local -  COMPLETED"), lines[1]
    assert lines[2].startswith("runs/sweeps/s/runs/c  local -  FAILED"), lines[2]  # a sweep's run, too
    assert json.loads((tmp_path / "runs/a/job.json").read_text())["state"] == "RUNNING"  # nothing made up
