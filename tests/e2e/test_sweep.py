"""`vidscale sweep` end to end: results, report, and resuming an interrupted sweep."""
import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, vidscale_cmd, write_two_run_sweep  # noqa: E402

pytestmark = pytest.mark.e2e


def _sweep_cmd(path, *extra):
    return vidscale_cmd("sweep", path, "--progress-every", "2", *extra)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_run_sweep_writes_results_and_report(tmp_path):
    p = write_two_run_sweep(tmp_path, "two")
    r = subprocess.run(_sweep_cmd(p), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    rows = _rows(out)
    assert [x["status"] for x in rows] == ["done", "done"]
    assert list(rows[0])[:7] == ["name", "params", "tokens", "flops", "loss", "status", "wall_time"]
    plan = {x["name"]: x for x in json.loads((out / "plan.json").read_text())}
    for x in rows:
        fin = json.loads((out / "runs" / x["name"] / "final.json").read_text())
        assert float(x["loss"]) == pytest.approx(fin["val_loss"], rel=1e-5) and 0 < fin["val_loss"] < 5
        assert fin["steps"] == plan[x["name"]]["steps"] and int(x["tokens"]) == fin["tokens"]
        # the counted FLOPs of the run are the planned budget, to the step-rounding and batch noise
        assert float(x["flops"]) == pytest.approx(1e9, rel=0.25)
        assert float(x["wall_time"]) > 0
    assert "done 2/2" in r.stdout and "report:" in r.stdout
    report = (out / "report.md").read_text()
    assert "h32d1-C1e9" in report and "h48d1-C1e9" in report


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(tmp_path):
    """Kill the sweep while its second run trains (after it saved a checkpoint), run the same
    command again: the first run is skipped, the second resumes from its checkpoint."""
    p = write_two_run_sweep(tmp_path, "two", budgets=("3e9",), set={"checkpoint.every": 2})
    out = tmp_path / "out"
    first, second = out / "runs" / "h32d1-C3e9", out / "runs" / "h48d1-C3e9"
    log = open(tmp_path / "sweep1.log", "w")
    proc = subprocess.Popen(_sweep_cmd(p), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            metrics = second / "metrics.jsonl"
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and max(steps) >= 4:  # the step-2 checkpoint is complete (saves are synchronous)
                break
            time.sleep(0.3)
        assert proc.poll() is None, (tmp_path / "sweep1.log").read_text()[-2000:]
        assert (first / "final.json").exists() and not (second / "final.json").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert [x["status"] for x in _rows(out)] == ["done", "interrupted"]
    first_final = (first / "final.json").stat().st_mtime_ns
    r = subprocess.run(_sweep_cmd(p), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 finished run(s) skipped; 1 to run" in r.stdout
    assert "started h32d1-C3e9" not in r.stdout and "started h48d1-C3e9" in r.stdout
    assert (first / "final.json").stat().st_mtime_ns == first_final
    assert [x["status"] for x in _rows(out)] == ["done", "done"]
    run_log = (out / "logs" / "h48d1-C3e9.log").read_text()
    assert "resumed from" in run_log, run_log[-2000:]
    steps = [json.loads(l)["step"] for l in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == json.loads((second / "final.json").read_text())["steps"]
    assert json.loads((out / "state.json").read_text())["h48d1-C3e9"]["attempts"] == 2


def test_wsd_branch_trains_only_its_cooldown_and_equals_an_independent_run(tmp_path):
    """A wsd-branches sweep: the small budget's run starts from the trunk's checkpoint at its
    cooldown and its losses are those of the same run trained from scratch, bit for bit."""
    from conftest import read_losses, vidscale
    p = write_two_run_sweep(tmp_path, "two", hidden=(32,), budgets=("1e9", "3e9"), schedule="wsd-branches")
    dry = subprocess.run(_sweep_cmd(p, "--dry-run"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "h32d1-C3e9 @ step" in dry.stdout and "(1 branches)" in dry.stdout, dry.stdout
    r = subprocess.run(_sweep_cmd(p), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    assert [x["status"] for x in _rows(out)] == ["done", "done"]
    plan = {x["name"]: x for x in json.loads((out / "plan.json").read_text())}
    branch, trunk = plan["h32d1-C1e9"], plan["h32d1-C3e9"]
    assert branch["trunk"] == "h32d1-C3e9" and 0 < branch["branch_step"] < branch["steps"]
    start = branch["branch_step"]
    # the trunk kept its checkpoint at the branch point; the branch trained only its cooldown
    assert (out / "runs" / "h32d1-C3e9" / "checkpoints" / f"step_{start:08d}").is_dir()
    losses = read_losses(out / "runs" / "h32d1-C1e9")
    assert sorted(losses) == list(range(start + 1, branch["steps"] + 1))
    cost = json.loads((out / "cost.json").read_text())
    spent = trunk["flops"] + branch["flops"] * (branch["steps"] - start) / branch["steps"]
    assert cost["sweep_flops"] == pytest.approx(spent) and cost["grid_flops"] == pytest.approx(trunk["flops"] + branch["flops"])
    assert cost["sweep_flops_ratio"] < 0.85
    # the same recipe trained from scratch (no branch): the same numbers
    alone = tmp_path / "alone"
    r = vidscale("train", out / "recipes" / "h32d1-C1e9.yaml", "--run-dir", alone, "--set", 'checkpoint.branch_from=""',
                 "--set", 'checkpoint.resume=""', timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = read_losses(alone)
    assert {s: ref[s] for s in losses} == losses
    assert json.loads((alone / "final.json").read_text())["val_loss"] == \
        json.loads((out / "runs" / "h32d1-C1e9" / "final.json").read_text())["val_loss"]


def test_gpu_sweep_template_dry_run_plans_branches_and_gpu_hours():
    """recipes/sweeps/video-gpu.yaml: 5 shapes x 5 budgets, one trunk per shape; GPU-hours per
    run from the FLOPs model at the sweep's peak and MFU add up to the total."""
    r = subprocess.run(_sweep_cmd("recipes/sweeps/video-gpu.yaml", "--dry-run"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    runs = [l.split() for l in lines[1:] if l.startswith("h")]
    assert len(runs) == 25 and sum(1 for x in runs if x[-1] == "scratch") == 5
    params = sorted({int(x[1]) for x in runs})
    assert 1e7 < params[0] < 5e7 and 5e8 < params[-1] < 1.5e9
    hours = sum(float(x[6]) for x in runs)
    total = float(lines[-1].split(":")[-1])
    assert total == pytest.approx(hours, rel=0.01)
    trained = sum(float(x[5]) for x in runs)
    assert total == pytest.approx(trained / (989e12 * 0.35) / 3600, rel=0.01)
