"""A `vidscale sweep --launcher ray` stopped by SIGTERM stops its embedded Ray cluster: every
process of it (gcs, raylet, the dashboard and runtime-env agents that ignore SIGTERM, the
workers) is gone, the runs are marked interrupted, and the sweep exits 143."""
import json
import os
import signal
import subprocess

import pytest

from conftest import ROOT, vidscale_cmd, wait_for, write_two_run_sweep  # noqa: E402
from procs import descendants, processes  # noqa: E402

pytestmark = pytest.mark.cluster


def _belongs(sweep_pid: int, session_dir: str):
    """The processes of the sweep's embedded cluster and runs, seen from outside in three ways:
    the sweep's session (Ray's workers change their process group, not their session), its
    descendants (the runs start sessions of their own), and Ray's session directory on a
    command line. Returns {(pid, start time): command line}."""
    procs = processes()
    mine = {p.pid for p in procs.values() if p.sid == sweep_pid or (session_dir and session_dir in p.cmdline)}
    mine |= descendants(sweep_pid, procs)
    return {(p, procs[p].start): procs[p].cmdline for p in mine if p in procs}


def _session_dir(sweep_pid: int) -> str:
    """Ray's session directory, from its gcs_server's command line (`--log_dir=SESSION/logs`)."""
    for p in processes().values():
        if p.sid == sweep_pid and "gcs_server" in p.cmdline and "--log_dir=" in p.cmdline:
            return p.cmdline.split("--log_dir=")[1].split()[0].rsplit("/logs", 1)[0]
    return ""


def test_sigterm_stops_the_sweeps_embedded_ray_cluster(tmp_path):
    # the sweep tests' two runs at 1e10 (110 and 60 steps): both still training when the signal comes
    p = write_two_run_sweep(tmp_path, "stop2", budgets=("1e10",),
                            set={"checkpoint.every": 5, "parallel.zero_stage": 0})
    out = tmp_path / "out"
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(vidscale_cmd("sweep", p, "--launcher", "ray", "--cpus", "2", "--progress-every", "5"),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen: dict = {}
    try:
        def training():
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            return any((r / "metrics.jsonl").is_file() and (r / "metrics.jsonl").stat().st_size
                       for r in (out / "runs").glob("*"))
        wait_for(training, 240, "a run's first metrics line")
        session = _session_dir(proc.pid)
        assert session, "no gcs_server of the sweep's embedded cluster found"
        seen = _belongs(proc.pid, session)
        cmds = " | ".join(seen.values())
        assert "raylet" in cmds and "DashboardAgent" in cmds and "RuntimeEnvAgent" in cmds, cmds
        assert "RayTrainWorker" in cmds and " train " in cmds, cmds  # workers and the runs' drivers too

        proc.send_signal(signal.SIGTERM)  # the sweep only, not its process group
        code = proc.wait(timeout=60)

        def gone():
            now = processes()
            left = {k: c for k, c in seen.items() if k[0] in now and now[k[0]].start == k[1]}
            left.update(_belongs(proc.pid, session))  # nothing new started either
            return not left or None
        try:
            wait_for(gone, 20, "the embedded cluster's processes to end")
        except AssertionError:
            now = processes()
            raise AssertionError("left running: " + "; ".join(
                f"{pid} {c[:120]}" for (pid, st), c in seen.items() if pid in now and now[pid].start == st))
        assert code == 143, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        now = processes()  # whatever is left of this test's cluster, gone after a failure too
        for (pid, st) in {**seen, **_belongs(proc.pid, _session_dir(proc.pid))}:
            if pid in now and now[pid].start == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()

    state = json.loads((out / "state.json").read_text())
    assert {s["status"] for s in state.values()} == {"interrupted"}, state
    assert "interrupted (SIGTERM)" in (tmp_path / "sweep.log").read_text()
    for run in (out / "runs").iterdir():
        assert not (run / "final.json").exists()  # unfinished: `vidscale sweep` again resumes them
