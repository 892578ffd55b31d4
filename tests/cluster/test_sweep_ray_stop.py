"""A `vidscale sweep --launcher ray` stopped by SIGTERM stops its embedded Ray cluster: every
process of it (gcs, raylet, the dashboard and runtime-env agents that ignore SIGTERM, the
workers) is gone, the runs are marked interrupted, and the sweep exits 143."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, vidscale_cmd, wait_for, write_two_run_sweep  # noqa: E402

pytestmark = pytest.mark.cluster


def _stat(pid: int) -> list[str] | None:
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes() -> dict[int, tuple]:
    """pid -> (ppid, session id, start time, command line) of every living process."""
    out = {}
    for d in os.listdir("/proc"):
        s = _stat(int(d)) if d.isdigit() else None
        if s and s[0] not in "ZX":
            out[int(d)] = (int(s[1]), int(s[3]), int(s[19]), _cmdline(int(d)))
    return out


def _belongs(sweep_pid: int, session_dir: str):
    """The processes of the sweep's embedded cluster and runs, seen from outside in three ways:
    the sweep's session (Ray's workers change their process group, not their session), its
    descendants (the runs start sessions of their own), and Ray's session directory on a
    command line. Returns {(pid, start time): command line}."""
    procs = _processes()
    mine = {p for p, (_, sid, _, cmd) in procs.items() if sid == sweep_pid or (session_dir and session_dir in cmd)}
    todo = [sweep_pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, *_ ) in procs.items():
            if ppid == parent and p not in mine:
                mine.add(p)
                todo.append(p)
    return {(p, procs[p][2]): procs[p][3] for p in mine if p in procs}


def _session_dir(sweep_pid: int) -> str:
    """Ray's session directory, from its gcs_server's command line (`--log_dir=SESSION/logs`)."""
    for p, (_, sid, _, cmd) in _processes().items():
        if sid == sweep_pid and "gcs_server" in cmd and "--log_dir=" in cmd:
            return cmd.split("--log_dir=")[1].split()[0].rsplit("/logs", 1)[0]
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
            now = _processes()
            left = {k: c for k, c in seen.items() if k[0] in now and now[k[0]][2] == k[1]}
            left.update(_belongs(proc.pid, session))  # nothing new started either
            return not left or None
        try:
            wait_for(gone, 20, "the embedded cluster's processes to end")
        except AssertionError:
            now = _processes()
            raise AssertionError("left running: " + "; ".join(
                f"{pid} {c[:120]}" for (pid, st), c in seen.items() if pid in now and now[pid][2] == st))
        assert code == 143, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        now = _processes()  # whatever is left of this test's cluster, gone after a failure too
        for (pid, st) in {**seen, **_belongs(proc.pid, _session_dir(proc.pid))}:
            if pid in now and now[pid][2] == st:
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
