"""vidscale on real Ray clusters: 2 Ray Train workers on an embedded cluster; a SIGKILLed worker
is replaced and the run ends with the uninterrupted run's losses; detached Ray jobs are
followed and cancelled; impossible requests fail before any worker starts."""
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

import conftest
from conftest import DEBUG_ZERO3, ROOT, read_losses, set_args, vidscale_cmd, wait_for
from procs import descendants, processes

pytestmark = pytest.mark.cluster


def env_without_ray_address() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def train_args(run: Path, *extra, nproc: int = 2) -> list[str]:
    return ["train", "recipes/debug.yaml", "--launcher", "ray", "--nproc", str(nproc), "--run-dir", str(run),
            *set_args([*DEBUG_ZERO3, *extra])]


def vidscale(*args, timeout=600):
    return conftest.vidscale(*args, timeout=timeout, env=env_without_ray_address())


def last_step(run: Path) -> int:
    try:
        return max(read_losses(run), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def descendants_named(root_pid: int, word: str) -> list[int]:
    """Processes under `root_pid` (our Ray head) whose command line contains `word`: only this
    test's cluster, never another Ray on the machine."""
    procs = processes()
    return sorted(p for p in descendants(root_pid, procs) if word in procs[p].cmdline)


def test_two_workers_on_embedded_cluster(tmp_path, debug_zero3_reference):
    run = tmp_path / "run"
    r = vidscale(*train_args(run))  # no --address, no RAY_ADDRESS: an embedded local cluster
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = json.loads((run / "job.json").read_text())
    assert job["launcher"] == "ray" and job["state"] == "COMPLETED" and job["address"] == ""
    assert read_losses(run) == debug_zero3_reference  # same numbers as 2 local ranks


def test_sigkilled_worker_is_replaced_and_run_matches_uninterrupted(ray_cluster, tmp_path, debug_zero3_reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(vidscale_cmd() + train_args(run, "checkpoint.every=5", "cluster.max_failures=2")
                            + ["--address", ray_cluster.gcs_address], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env_without_ray_address())
    try:
        wait_for(lambda: last_step(run) >= 10 or proc.poll() is not None, 400, "step 10")
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        workers = descendants_named(ray_cluster.pid, "RayTrainWorker")
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    attempts = list((run / ".ray_attempts").iterdir())
    assert len(attempts) == 1 and len(attempts[0].read_text().splitlines()) == 2  # one restart
    assert "resumes from the latest complete checkpoint" in out
    losses = read_losses(run)
    assert losses == debug_zero3_reference, (losses, debug_zero3_reference)


def test_detached_job_is_followed_and_cancelled(ray_cluster, tmp_path):
    # followed: --wait prints the job's log and returns its status
    done = tmp_path / "done"
    r = vidscale(*train_args(done, "train.steps=6", "parallel.zero_stage=0", nproc=1),
                 "--detach", "--wait", "--address", ray_cluster.dashboard)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = json.loads((done / "job.json").read_text())
    assert job["state"] == "SUCCEEDED" and job["job_ids"][0].startswith("vidscale-debug-")
    assert job["job_ids"][0] in r.stdout and "world_size=1" in r.stdout  # the job's own log, followed
    assert last_step(done) == 6
    # a record left RUNNING (its follower was killed) of a job that has ended: cancel says so
    # and records how it ended, instead of recording STOPPED
    (done / "job.json").write_text(json.dumps({**job, "state": "RUNNING"}))
    c = vidscale("cancel", str(done))
    assert c.returncode == 0 and "had already ended (SUCCEEDED)" in c.stdout, c.stdout + c.stderr
    assert json.loads((done / "job.json").read_text())["state"] == "SUCCEEDED"
    # cancelled: a long detached job, stopped through `vidscale cancel`
    run = tmp_path / "long"
    r = vidscale(*train_args(run, "train.steps=100000", "checkpoint.every=0", "parallel.zero_stage=0", nproc=1),
                 "--detach", "--address", ray_cluster.dashboard)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = json.loads((run / "job.json").read_text())["job_ids"][0]
    assert r.stdout.strip().splitlines()[-1] == job_id  # --detach prints the job id last
    # until its rank 0 takes the run lock (seconds), only the job's record says the run is
    # taken: a second launch on the run dir is refused by what the job server says of the job
    from vidscale.cluster.launch import check_no_queued_job
    env = dict(os.environ)  # a Ray client sets variables in this process: keep later tests' as they were
    try:
        with pytest.raises(ValueError, match=f"Ray job {job_id} of this run is still (PENDING|RUNNING)"):
            check_no_queued_job(run)
    finally:
        os.environ.clear()
        os.environ.update(env)

    def state():
        return json.loads(vidscale("status", str(run), "--json").stdout)
    wait_for(lambda: state()["state"] == "RUNNING" and last_step(run) > 0, 300, "the job to train", 1.0)
    c = vidscale("cancel", str(run))
    assert c.returncode == 0, c.stderr
    wait_for(lambda: state()["state"] == "STOPPED", 120, "STOPPED", 1.0)
    try:
        check_no_queued_job(run)  # ended: the run dir is free for the next launch
    finally:
        os.environ.clear()
        os.environ.update(env)


@pytest.mark.parametrize("over,words", [
    (["cluster.gpus_per_worker=1"], ["cluster.gpus_per_worker", "GPU", "has 0"]),
    (["cluster.cpus_per_worker=64"], ["cluster.cpus_per_worker", "128 CPUs"]),
])
def test_impossible_request_fails_clearly(ray_cluster, tmp_path, over, words):
    r = vidscale(*train_args(tmp_path / "run", *over), "--address", ray_cluster.gcs_address, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vidscale train: error:") and all(w in last for w in words), last


def test_an_address_where_no_cluster_answers_is_one_line_before_anything_starts(tmp_path):
    """What re-running a finished sweep's run config does (its embedded cluster is gone)."""
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        run = tmp_path / f"run{address[:4]}"
        r = vidscale(*train_args(run), "--address", address, timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"vidscale train: error: cluster.address {address}: no Ray "
                                                       "cluster answers there"), r.stderr[-3000:]
        assert not (run / "job.json").exists() and not (run / "config.yaml").exists()


JOB = """
import sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
c = JobSubmissionClient(sys.argv[1])
job = c.submit_job(entrypoint="python -c 'import ray; ray.init(); print(ray.get(ray.remote(lambda: 41 + 1).remote()))'")
while c.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    time.sleep(0.5)
print(c.get_job_status(job), c.get_job_logs(job).split()[-1])
"""


def test_down_stops_every_process_of_the_head_and_nothing_else():
    """`ray_cluster up`, a job through its job server (a supervisor actor, a driver, a worker),
    then `down`: no process of that cluster is left (its directory on no command line, none
    of the head's descendants recorded before `down` alive), and another head is untouched."""
    from vidscale.cluster import proctree
    from vidscale.cluster.ray_cluster import read_head, token_env
    heads = [Path(f"/tmp/vsd-{os.getpid()}-{x}") for x in "ab"]  # short: Ray's socket paths live under them
    cli = [os.sys.executable, "-m", "vidscale.cluster.ray_cluster"]
    for d in heads:
        r = subprocess.run([*cli, "up", "--num-cpus", "1", "--dir", d], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    try:
        a, b = (read_head(d) for d in heads)
        env = {**env_without_ray_address(), **token_env(a.token)}
        r = subprocess.run([os.sys.executable, "-c", JOB, a.dashboard], capture_output=True, text=True, env=env,
                           timeout=180)
        assert r.stdout.split()[-2:] == ["SUCCEEDED", "42"], (r.stdout + r.stderr)[-2000:]
        before = proctree.tree([proctree.proc(a.pid)])
        assert len(before) > 3  # gcs, raylet, agents, dashboard ...
        r = subprocess.run([*cli, "down", "--dir", heads[0]], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "stopped", r.stderr[-2000:]
        assert [p for p in before if proctree.alive(p)] == []
        assert [p.cmdline for p in processes().values() if str(heads[0]) in p.cmdline] == []
        assert b.alive() and len(proctree.tree([proctree.proc(b.pid)])) > 3  # the other head: untouched
    finally:
        for d in heads:
            subprocess.run([*cli, "down", "--dir", d], capture_output=True, timeout=120)
            subprocess.run(["rm", "-rf", str(d)])
