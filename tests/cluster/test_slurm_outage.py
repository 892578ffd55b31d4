"""`follow_array` through a Slurm controller outage, on the real single-node Slurm: while
slurmctld is down no task is reported ended; once it is back, each task is reported after it
really ended; one that may wait only 3 s stops with one clear error after asking again. squeue's messages
are classified from what the live controller says."""
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SLURM_DIR, wait_for  # noqa: E402
from vidscale.cluster.job import new_job
from vidscale.cluster.jobarray import (SQUEUE_TIMEOUT_S, QueueUnreachable, cancel_array, follow_array, forgotten,
                                       queued_tasks, submit_array, task_id)
from vidscale.cluster.launch import check_no_queued_job
from vidscale.cluster.slurm import ended, job_state

pytestmark = pytest.mark.cluster


def _squeue(job: str) -> subprocess.CompletedProcess:
    return subprocess.run(["squeue", "-h", "-r", "-j", job], capture_output=True, text=True, timeout=120)


def test_squeue_saying_invalid_job_id_means_the_job_ended(slurm_cluster):
    r = _squeue("987654321")  # no such job: the live controller's own words
    assert r.returncode != 0 and forgotten(r.stderr), r.stderr
    assert queued_tasks("987654321") == {}


def _pid(path: Path) -> int:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return 0


def _start_slurmctld(conf: str, old: int) -> None:
    """As cluster/scripts/slurm-up.sh starts it (same command, same network namespace), and
    recorded in its `started` list in place of the `old` pid, so that slurm-down.sh stops it."""
    pidfile, started = Path(SLURM_DIR) / "slurmctld.pid", Path(SLURM_DIR) / "started"
    subprocess.run(["slurmctld", "-f", conf, "-i"], check=True, timeout=60)
    new = wait_for(lambda: _pid(pidfile), 20, "slurmctld to start again")
    if started.is_file():
        started.write_text(re.sub(rf"^slurmctld {old}$", f"slurmctld {new}", started.read_text(), flags=re.M))
    wait_for(lambda: (lambda r: r.returncode == 0 or forgotten(r.stderr))(_squeue("1")), 60, "slurmctld to answer")


def test_follow_array_waits_out_a_controller_outage(slurm_cluster, tmp_path):
    conf = slurm_cluster
    # the fixture may hand back /etc/slurm/slurm.conf, a link to its own conf (a Slurm still running)
    assert Path(conf).resolve().parent == Path(SLURM_DIR).resolve(), \
        f"{conf}: not the fixture's own Slurm; cannot restart it"
    pidfile = Path(SLURM_DIR) / "slurmctld.pid"
    script = tmp_path / "array.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --array=0-1
#SBATCH --output={tmp_path}/slurm-%A_%a.out
#SBATCH --time=5
sleep 4
touch {tmp_path}/done_$SLURM_ARRAY_TASK_ID
""")
    job = submit_array(script)
    events, warnings, errors, old = [], [], [], 0
    impatient: list[BaseException] = []  # a follower that gives up after 3 s of outage
    impatient_warnings: list[str] = []

    def follow():
        try:
            for i in follow_array(job, 2, poll_s=0.5, outage_s=180, warn=warnings.append):
                if i is not None:
                    events.append((time.monotonic(), i))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def give_up():
        try:
            for i in follow_array(job, 2, poll_s=0.5, outage_s=3, warn=impatient_warnings.append):
                assert i is None, f"task {i} reported ended by the impatient follower"
        except BaseException as e:  # noqa: BLE001
            impatient.append(e)

    # a run whose job is task 0: while nobody can ask Slurm, the job is not taken for ended
    # and a second launch on its run dir is refused
    run = tmp_path / "run"
    new_job("slurm", run, ["vidscale", "train"], job_ids=[task_id(job, 0)], state="RUNNING").save()
    during: dict = {}

    def ask():
        try:
            during["state"] = job_state(task_id(job, 0))
            check_no_queued_job(run)
        except BaseException as e:  # noqa: BLE001
            during["refused"] = e

    try:
        wait_for(lambda: set(queued_tasks(job).values()) == {"RUNNING"} and len(queued_tasks(job)) == 2, 60,
                 "both tasks to run")
        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        threading.Thread(target=give_up, daemon=True).start()
        stopped, old = time.monotonic(), _pid(pidfile)
        os.kill(old, signal.SIGTERM)  # the controller goes away; the tasks run on
        wait_for(lambda: not _pid(pidfile), 30, "slurmctld to stop")
        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        r = _squeue(job)  # squeue retries the controller for a while by itself, then says why
        assert r.returncode != 0 and not forgotten(r.stderr), r.stderr
        asking.join(timeout=3 * SQUEUE_TIMEOUT_S)
        assert not asking.is_alive()
        # the impatient follower gives up on its second squeue failure (each can take up to
        # SQUEUE_TIMEOUT_S while squeue retries the controller by itself)
        wait_for(lambda: (warnings or events) and impatient, 3 * SQUEUE_TIMEOUT_S,
                 "both followers to notice the outage")
        assert not events, f"tasks reported ended while the controller was down: {events}"
        assert (tmp_path / "done_0").exists() and (tmp_path / "done_1").exists()  # both ended meanwhile
        restarted = time.monotonic()
        _start_slurmctld(conf, old)
        thread.join(timeout=60)
        assert not thread.is_alive() and not errors, (errors, warnings)
    finally:
        if not _pid(pidfile):  # restore the fixture's Slurm for the tests after this one
            _start_slurmctld(conf, old)
        cancel_array(job)
    assert len(warnings) == 1 and job in warnings[0], warnings  # one line per outage
    # outage_s exceeded (squeue asked again, with the one warning line first): one error naming
    # the array, how long and what to do, never a task taken for ended
    (e,) = impatient
    assert len(impatient_warnings) == 1 and "asking again for up to 3 s" in impatient_warnings[0], impatient_warnings
    waited = float(re.search(r"has not answered for (\d+) s", str(e)).group(1))
    assert waited >= 3, str(e)
    assert isinstance(e, QueueUnreachable) and f"job array {job}:" in str(e) and "run the same command again" in str(
        e) and "\n" not in str(e), repr(e)
    assert sorted(i for _, i in events) == [0, 1]
    assert all(t > restarted > stopped for t, _ in events)  # reported once Slurm answered again
    st = during["state"]
    assert st["state"] == "UNKNOWN" and st["source"] == "unreachable" and not ended(st), st
    assert isinstance(during["refused"], ValueError) and "cannot ask Slurm whether job" in str(during["refused"]), \
        during
    assert ended(job_state(task_id(job, 0)))  # once Slurm answers: the task has ended
    check_no_queued_job(run)
