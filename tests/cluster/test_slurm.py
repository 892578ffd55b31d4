"""vidscale on a real Slurm (single node, started by cluster/scripts/slurm-up.sh when missing):
a 2-task ZeRO-3 job trains the debug recipe; a pre-empted job checkpoints, requeues itself and
finishes with the uninterrupted run's losses; status and cancel; impossible requests."""
import json
import subprocess
from pathlib import Path

import pytest

from conftest import DEBUG_ZERO3, read_losses, set_args, vidscale, wait_for  # noqa: E402

pytestmark = pytest.mark.cluster


def train_args(run: Path, *extra) -> list[str]:
    return ["train", "recipes/debug.yaml", "--launcher", "slurm", "--nproc", "2", "--run-dir", str(run),
            *set_args([*DEBUG_ZERO3, *extra])]


def job_of(run: Path) -> dict:
    return json.loads((run / "job.json").read_text())


def squeue_state(job_id: str) -> str:
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return r.stdout.strip()


def test_two_task_job_trains_debug_recipe_with_zero3(slurm_cluster, tmp_path, debug_zero3_reference):
    run = tmp_path / "run"
    r = vidscale(*train_args(run), "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = job_of(run)
    assert job["launcher"] == "slurm" and job["state"] == "COMPLETED" and len(job["job_ids"]) == 1
    script = (run / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "srun" in script
    log = (run / f"slurm-{job['job_ids'][0]}.out").read_text()
    assert "ends with status 0" in log
    losses = read_losses(run)
    assert sorted(losses) == list(range(5, 41, 5))  # the recipe: 40 steps, a log line every 5
    assert losses == debug_zero3_reference  # same numbers as 2 local ranks
    assert losses[40] < 0.8 * losses[5]
    st = vidscale("status", str(run), "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "COMPLETED"


def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted_run(slurm_cluster, tmp_path,
                                                                          debug_zero3_reference):
    run = tmp_path / "run"
    r = vidscale(*train_args(run))
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = job_of(run)["job_ids"][0]
    # once training runs (its USR1 handler is in place), pre-empt it the way Slurm does before a
    # time limit: USR1 to the batch shell
    wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip(),
             300, "the first logged step")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    follow = vidscale("status", str(run))  # status works while the job runs or requeues
    assert follow.returncode == 0 and job_id in follow.stdout
    wait_for(lambda: squeue_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 400, "the job to end", 1.0)
    log = (run / f"slurm-{job_id}.out").read_text()
    assert squeue_state(job_id) == "COMPLETED", log[-3000:]
    assert "requeueing job" in log and "restart 1" in log and "resumed from" in log, log[-3000:]
    step = int(log.split("checkpoints/step_")[1][:8])
    assert 0 < step < 40  # stopped mid-run, not at the end
    assert read_losses(run) == debug_zero3_reference


def test_status_and_cancel(slurm_cluster, tmp_path):
    """Also: a run dir with a `%` in its name (Slurm's placeholders in --output: `%x` is the job
    name) writes its log there, and a partition list (`a,b`: the first that can take the job)."""
    run = tmp_path / "lr%x"
    r = vidscale(*train_args(run, "train.steps=100000", "checkpoint.every=0", "cluster.slurm.partition=debug,debug"))
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = job_of(run)["job_ids"][0]
    wait_for(lambda: squeue_state(job_id) == "RUNNING", 120, "RUNNING")
    wait_for(lambda: (run / f"slurm-{job_id}.out").is_file(), 60, "the job's log in the run dir")
    st = json.loads(vidscale("status", str(run), "--json").stdout)
    assert st["state"] == "RUNNING" and st["job_ids"] == [job_id] and st["launcher"] == "slurm"
    c = vidscale("cancel", str(run))
    assert c.returncode == 0, c.stderr
    wait_for(lambda: squeue_state(job_id) == "CANCELLED", 60, "CANCELLED")
    st = json.loads(vidscale("status", str(run), "--json").stdout)
    assert st["state"] == "CANCELLED"
    assert job_of(run)["state"] == "CANCELLED"
    # once squeue forgets the job (MinJobAge), status falls back to sacct, or without
    # accounting (this cluster) to the jobcomp log
    from vidscale.cluster.slurm import _jobcomp_line
    wait_for(lambda: "JobState=CANCELLED" in _jobcomp_line(job_id), 30, "the jobcomp record")


@pytest.mark.parametrize("over,words", [
    (["cluster.slurm.gpus_per_node=8"], ["cluster.slurm.gpus_per_node = 8", "at most 0 GPU"]),
    (["cluster.slurm.partition=nonexistent"], ["cluster.slurm.partition", "no such partition", "debug"]),
    (["cluster.slurm.partition=debug,nonexistent"], ["no such partition on this cluster: nonexistent"]),
    (["cluster.slurm.cpus_per_task=1000"], ["cluster.slurm.cpus_per_task = 1000", "CPUs"]),
])
def test_impossible_request_fails_clearly_instead_of_pending(slurm_cluster, tmp_path, over, words):
    r = vidscale(*train_args(tmp_path / "run", *over), timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
    # nothing was submitted (other jobs may come and go: look for this run's script)
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%o"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in queued
    assert not (tmp_path / "run" / "job.json").exists()


def test_ray_inside_slurm_allocation_with_preemption(slurm_cluster, tmp_path, debug_zero3_reference):
    """cluster.slurm.ray=true: the batch script starts a Ray head in the allocation and runs the
    Ray launcher on it (Ray Train workers, not srun tasks, are the ranks). Pre-empted, the
    workers see the stop file, checkpoint, the job requeues and the new Ray run resumes."""
    run = tmp_path / "run"
    r = vidscale(*train_args(run, "cluster.slurm.ray=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = job_of(run)["job_ids"][0]
    wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip(),
             400, "the first logged step")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_for(lambda: squeue_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the job to end", 1.0)
    log = (run / f"slurm-{job_id}.out").read_text()
    assert squeue_state(job_id) == "COMPLETED", log[-4000:]
    assert "ray start --head" in (run / "job.sbatch").read_text()
    assert "Started training worker group of size 2" in log
    assert "requeueing job" in log and "restart 1" in log and "resumed from" in log, log[-4000:]
    assert read_losses(run) == debug_zero3_reference


def test_time_limit_checkpoints_and_requeues_before_the_limit(slurm_cluster, tmp_path):
    """A 3-minute job with `--signal=B:USR1@150`: Slurm itself sends USR1 (at ~30 s, or up to a
    minute earlier); the job checkpoints, requeues and resumes instead of being killed."""
    run = tmp_path / "run"
    r = vidscale(*train_args(run, "train.steps=100000", "checkpoint.every=0", "cluster.slurm.time=3",
                             "cluster.slurm.signal_seconds=150"))
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = job_of(run)["job_ids"][0]
    log = run / f"slurm-{job_id}.out"
    try:
        wait_for(lambda: log.is_file() and "resumed from" in log.read_text(), 400, "the requeued job to resume", 1.0)
        text = log.read_text()
        assert "USR1 at" in text and "requeueing job" in text and "restart 1" in text, text[-3000:]
        assert "TIME LIMIT" not in text
    finally:
        vidscale("cancel", str(run))
