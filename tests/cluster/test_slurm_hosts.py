"""vidscale on a Slurm of two hosts (network-namespace test bed, cluster/scripts/slurm-hosts-up.sh):
a 4-rank ZeRO-3 job runs two ranks on each node and gives the single-host run's losses bit for
bit; a sweep's job array spreads over both nodes; a node that dies mid-job (every process of h2
killed) costs nothing: Slurm requeues the job, and once h2's slurmd is back the job resumes from
the last complete checkpoint and ends with the uninterrupted run's losses.

Every client command (sbatch, squeue, `vidscale train/sweep/status`) runs on h1: the controller
listens on h1's address, which the machine's own network cannot reach."""
import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (DEBUG_ZERO3, ROOT, host_bed, read_losses, set_args, vidscale, vidscale_cmd, wait_for,
                      write_two_run_sweep)
from vidscale.cluster.hosts import INTERFACE
from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.checkpoint.rundir import RunLock

pytestmark = pytest.mark.cluster

UP = ROOT / "cluster" / "scripts" / "slurm-hosts-up.sh"
DOWN = ROOT / "cluster" / "scripts" / "slurm-hosts-down.sh"
# 12 steps, every loss logged, a checkpoint every 4: a failure after step 5 has something to lose
RUN = [*DEBUG_ZERO3, "train.steps=12", "logging.every=1", "checkpoint.every=4"]
NPROC = 4  # 2 nodes x 2 ranks
SLURM_TIME = {"cluster.slurm.time": "00:20:00"}
REQUEUE_KILL_RETRY_S = 70
"""How long a node must stay dead after Slurm requeued its job (see the requeue test)."""


class Cluster:
    """The bed and its Slurm: commands run on h1 with SLURM_CONF set."""

    def __init__(self, bed, conf: str):
        self.bed, self.conf = bed, conf
        self.env = {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1"}

    def run(self, argv, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.bed.run("h1", argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=self.env)

    def vidscale(self, *args, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(vidscale_cmd(*args), timeout)

    def up(self) -> str:
        """Start what is missing (all of it, or a dead node's slurmd); wait until every node is idle."""
        r = subprocess.run([str(UP), str(self.bed.n)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip().splitlines()[-1].split("=", 1)[1]

    def state(self, job_id: str) -> str:
        return self.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], 30).stdout.strip()


@pytest.fixture(scope="module")
def slurm2():
    """Two hosts and one Slurm over them, shared by the module's tests."""
    bed = host_bed(2)
    try:
        r = subprocess.run([str(UP), "2"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.fail(f"cluster/scripts/slurm-hosts-up.sh failed:\n{r.stderr[-2000:]}")
        yield Cluster(bed, r.stdout.strip().splitlines()[-1].split("=", 1)[1])
    finally:
        subprocess.run([str(DOWN)], capture_output=True, text=True, timeout=120)
        bed.down()


@pytest.fixture(scope="module")
def reference4(tmp_path_factory):
    """Losses of the same run on one host: 4 local ranks, same recipe and overrides."""
    run = tmp_path_factory.mktemp("reference4") / "run"
    r = vidscale("train", "recipes/debug.yaml", "--nproc", NPROC, "--run-dir", run, *set_args(RUN))
    assert r.returncode == 0, r.stderr[-3000:]
    return read_losses(run)


def train_args(run: Path) -> list:
    return ["train", "recipes/debug.yaml", "--launcher", "slurm", "--nproc", NPROC, "--run-dir", run,
            *set_args([*RUN, "cluster.slurm.nodes=2", f"cluster.network_interface={INTERFACE}"])]


def rank_nodes(log: str) -> dict[int, str]:
    """{rank: node} from the job log's `vidscale: rank R/W on node N` lines (the last run's)."""
    return {int(m[0]): m[1] for m in re.findall(r"vidscale: rank (\d+)/\d+ on node (\S+)", log)}


def test_four_ranks_on_two_nodes_match_the_single_host_run(slurm2, tmp_path, reference4):
    run = tmp_path / "run"
    before = slurm2.bed.tx_bytes()
    r = slurm2.vidscale(*train_args(run), "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = json.loads((run / "job.json").read_text())
    assert job["state"] == "COMPLETED"
    log = (run / f"slurm-{job['job_ids'][0]}.out").read_text()
    assert rank_nodes(log) == {0: "h1", 1: "h1", 2: "h2", 3: "h2"}, log[-3000:]
    # the rendezvous is h1's NodeAddr (the name h1 resolves nowhere)
    assert f"rendezvous {slurm2.bed.address('h1')}:" in log
    assert read_losses(run) == reference4
    # ZeRO-3 gathers every parameter each step: megabytes cross the link both ways
    sent = {h: slurm2.bed.tx_bytes()[h] - before[h] for h in slurm2.bed.hosts}
    assert min(sent.values()) > 1_000_000, sent


def test_sweep_job_array_spreads_over_both_nodes(slurm2, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), remote.mkdir()
    r = vidscale("sweep", write_two_run_sweep(local, "hosts2", set=SLURM_TIME), "--progress-every", "5", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = slurm2.vidscale("sweep", write_two_run_sweep(remote, "hosts2", set=SLURM_TIME), "--launcher", "slurm",
                        "--progress-every", "5", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {}
    for d in (local, remote):
        with open(d / "out" / "results.csv", newline="") as f:
            rows[d] = {x["name"]: x for x in csv.DictReader(f)}
    assert sorted(rows[remote]) == sorted(rows[local]) and len(rows[remote]) == 2
    nodes = set()
    for name, x in rows[remote].items():
        assert x["status"] == "done" and (remote / "out" / "runs" / name / "final.json").is_file()
        assert float(x["loss"]) == pytest.approx(float(rows[local][name]["loss"]), rel=1e-6)
        nodes |= set(rank_nodes((remote / "out" / "logs" / f"{name}.log").read_text()).values())
    assert nodes == {"h1", "h2"}  # one array task on each node


def start_and_kill_h2(slurm2, run: Path, *, requeue: bool) -> str:
    """Submit the 4-rank job; once step 5 is logged (the step-4 checkpoint is complete), kill every
    process of h2 (slurmd, slurmstepd and both ranks, as a power loss). Returns the job id."""
    r = slurm2.vidscale(*train_args(run))
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = json.loads((run / "job.json").read_text())["job_ids"][0]
    if not requeue:  # the job's own choice, as `sbatch --no-requeue`: a node failure ends it
        r = slurm2.run(["scontrol", "update", f"jobid={job_id}", "Requeue=0"], 30)
        assert r.returncode == 0, r.stderr

    def step() -> int:
        m = run / "metrics.jsonl"
        lines = m.read_text().splitlines() if m.is_file() else []
        return json.loads(lines[-1])["step"] if lines else 0

    wait_for(lambda: step() >= 5, 300, "step 5 (after the step-4 checkpoint)", 0.05)
    killed = slurm2.bed.kill("h2")
    assert len(killed) >= 4 and step() < 12
    return job_id


def status(slurm2, run: Path) -> dict:
    r = slurm2.vidscale("status", run, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_finished_like_the_uninterrupted_run(run: Path, log: str, reference: dict) -> None:
    assert "resumed from" in log, log[-3000:]
    resumed = int(log.split("resumed from ")[-1].split("checkpoints/step_")[1][:8])
    assert resumed in (4, 8)  # the last complete checkpoint before the kill, never a torn one
    assert rank_nodes(log) == {0: "h1", 1: "h1", 2: "h2", 3: "h2"}
    assert read_losses(run) == reference  # steps before the kill, and every step redone after it
    ckpt_io.verify(run / "checkpoints" / "step_00000012")
    # nothing left in the run dir holds it (the dead ranks' locks went with them)
    RunLock(run).acquire(["test"]).release()


def test_node_dies_mid_job_then_resume_continues_without_loss(slurm2, tmp_path, reference4):
    """The job is not requeued: it ends NODE_FAIL; `vidscale resume` (a new job) continues the run."""
    run = tmp_path / "run"
    job_id = start_and_kill_h2(slurm2, run, requeue=False)
    # the ranks of h1 fail at once; Slurm sets h2 DOWN after SlurmdTimeout and ends the job
    wait_for(lambda: slurm2.state(job_id) not in ("RUNNING", "COMPLETING"), 120, "the job to end", 1.0)
    st = status(slurm2, run)
    assert st["state"] == "NODE_FAIL" and st["down_nodes"] == ["h2"] and st["step"] < 12, st
    line = slurm2.vidscale("status", run, timeout=60).stdout
    assert "NODE_FAIL" in line and "nodes down: h2" in line, line
    assert json.loads((run / "job.json").read_text())["state"] == "NODE_FAIL"
    log = (run / f"slurm-{job_id}.out").read_text()
    assert "Node failure on h2" in log, log[-3000:]
    # the node comes back (its slurmd registers again: ReturnToService=2); resume as a new job
    slurm2.up()
    r = slurm2.vidscale("resume", run, "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = json.loads((run / "job.json").read_text())
    assert job["state"] == "COMPLETED" and job["job_ids"] != [job_id]
    assert job["history"][-1]["job_ids"] == [job_id] and job["history"][-1]["state"] == "NODE_FAIL"
    check_finished_like_the_uninterrupted_run(run, (run / f"slurm-{job['job_ids'][0]}.out").read_text(),
                                              reference4)
    assert status(slurm2, run)["step"] == 12


def test_node_dies_mid_job_and_the_requeued_job_resumes_without_loss(slurm2, tmp_path, reference4):
    """The job's own --requeue: Slurm requeues it when h2 goes DOWN, and once h2 is back the same
    job id runs again and resumes from the last complete checkpoint."""
    run = tmp_path / "run"
    job_id = start_and_kill_h2(slurm2, run, requeue=True)
    st = wait_for(lambda: (lambda s: s if s["restarts"] >= 1 else None)(status(slurm2, run)), 120,
                  "the job to be requeued", 1.0)
    requeued_at = time.monotonic()
    # just after the requeue Slurm may still show COMPLETING while it ends the first run's ranks on
    # h1; then the job waits (h2 is down) until the node is back
    waiting = ("PENDING", "REQUEUED", "CONFIGURING")
    st = wait_for(lambda: (lambda s: s if s["state"] != "COMPLETING" else None)(status(slurm2, run)), 60,
                  "the requeued job to finish ending its first run", 1.0)
    assert st["state"] in waiting and st["restarts"] == 1, st
    assert st["down_nodes"] == ["h2"], st
    line = slurm2.vidscale("status", run, timeout=60).stdout
    assert "requeued 1x" in line and "nodes down: h2" in line, line
    # a second job on the same run dir is refused while the requeued one waits to continue it
    r = slurm2.vidscale("resume", run, timeout=120)
    assert r.returncode == 2 and f"Slurm job {job_id} of this run is still" in r.stderr, r.stderr
    log = (run / f"slurm-{job_id}.out").read_text()
    assert "Node failure on h2" in log, log[-3000:]
    # the batch script's last line is written only when srun returns before Slurm's cancel of the
    # job (for the node failure) kills the script too: either way the first run did not succeed
    assert "ends with status 0" not in log, log[-3000:]
    # Slurm 22.05 retries its kill of the job's first run on h2 once, ~60 s after the requeue: a
    # node back by then gets it and it kills the requeued run's ranks there (same job id; the run
    # then fails and `vidscale resume` continues it, as above). A node back later is spared.
    time.sleep(max(0.0, requeued_at + REQUEUE_KILL_RETRY_S - time.monotonic()))
    slurm2.up()
    wait_for(lambda: slurm2.state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 400, "the job to end", 1.0)
    log = (run / f"slurm-{job_id}.out").read_text()
    assert slurm2.state(job_id) == "COMPLETED", log[-4000:]
    assert "restart 1" in log
    check_finished_like_the_uninterrupted_run(run, log, reference4)
    st = status(slurm2, run)
    assert st["state"] == "COMPLETED" and st["restarts"] == 1 and st["step"] == 12
