"""Sweep recipes, run lengths from the FLOPs model, and `vidscale sweep` end to end."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vidscale.scaling.config import RecipeError

from conftest import ROOT  # noqa: E402
DEBUG = ROOT / "recipes" / "debug.yaml"


def write_sweep(tmp_path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"base: {DEBUG}\nsweep_dir: {tmp_path / 'out'}\n" + text)
    return p


def _err(tmp_path, text):
    from vidscale.scaling.study.plan import load_sweep
    with pytest.raises(RecipeError) as e:
        load_sweep(write_sweep(tmp_path, text, "bad.yaml"))
    msg = str(e.value)
    assert "\n" not in msg and "bad.yaml" in msg
    return msg


def test_sweep_mistakes_are_one_line_errors(tmp_path):
    assert "budgets" in _err(tmp_path, "models: [debug]\nbudgets: []\n")
    assert "budgets" in _err(tmp_path, "models: [debug]\nbudgets: [-1e9]\n")
    assert "model.size" in _err(tmp_path, "models: [huge]\nbudgets: [1e10]\n")
    assert "modls" in _err(tmp_path, "modls: [debug]\nbudgets: [1e10]\n")
    assert "aspect" in _err(tmp_path, "depths: [2]\nbudgets: [1e10]\n")
    assert "cells[0].model" in _err(tmp_path, "models: [debug]\nbudgets: [1e10]\ncells: [{model: nope, lr: 1e-3}]\n")
    assert "train.stpes" in _err(tmp_path, "models: [debug]\nbudgets: [1e10]\nset: {train.stpes: 3}\n")
    assert "divisible" in _err(tmp_path, "models: [{hidden: 96, depth: 1, heads: 5}]\nbudgets: [1e10]\n")


def test_budget_too_small_for_a_run(tmp_path):
    from vidscale.scaling.study.plan import load_sweep, plan
    s = load_sweep(write_sweep(tmp_path, "models: [debug]\nbudgets: [1e3]\n"))
    with pytest.raises(RecipeError, match="min_steps"):
        plan(s)


def test_steps_follow_from_the_flops_model(tmp_path):
    """steps = round(budget / E[FLOPs of a step]), E over the run's own packed batches."""
    import torch  # noqa: F401
    from vidscale.data.loader import build_loader
    from vidscale.scaling.config import model_config
    from vidscale.scaling.train.flops import train_flops
    from vidscale.scaling.study.plan import PROBE_BATCHES, load_sweep, plan

    s = load_sweep(write_sweep(tmp_path, """
models: [tiny, {name: narrow, hidden: 64, depth: 2}]
aspect: 32
depths: [1]
budgets: [1e11, 3e11]
tokens_per_batch: [512]
lr: [1e-3]
cells: [{model: narrow, budget: 3e11, lr: 3e-3}]
"""))
    runs = plan(s)
    # sorted by budget, then parameters; the lr is in the name once a cell sets one
    assert [r.name for r in runs] == ["h32d1-C1e11-lr0.001", "narrow-C1e11-lr0.001", "tiny-C1e11-lr0.001",
                                      "h32d1-C3e11-lr0.001", "narrow-C3e11-lr0.003", "tiny-C3e11-lr0.001"]
    by = {(r.model, r.budget): r for r in runs}
    assert len(runs) == 6 and by[("narrow", 3e11)].lr == 3e-3 and by[("narrow", 1e11)].lr == 1e-3
    for r in runs:
        cfg = r.cfg
        loader = build_loader(cfg, 0, 1, multiple=1)
        mcfg = model_config(cfg.model)
        per_batch = sum(train_flops(mcfg, next(loader)[1]) for _ in range(PROBE_BATCHES)) / PROBE_BATCHES
        assert r.steps == round(r.budget / per_batch), r.name
        assert r.flops == pytest.approx(r.budget, rel=0.5 / r.steps + 1e-9)
        assert cfg.train.steps == r.steps and cfg.checkpoint.resume == "auto"
        assert cfg.train.tokens_per_batch == 512 and Path(cfg.train.run_dir) == s.dir / "runs" / r.name
    # IsoFLOP: 3x the budget is 3x the steps; a bigger model gets fewer steps
    assert by[("tiny", 3e11)].steps == pytest.approx(3 * by[("tiny", 1e11)].steps, abs=2)
    assert by[("h32d1", 1e11)].params < by[("tiny", 1e11)].params
    assert by[("h32d1", 1e11)].steps > by[("tiny", 1e11)].steps
    # attention is in the count: its quadratic term is over 1% of a step here
    from vidscale.scaling.train.flops import forward_flops
    r = by[("tiny", 1e11)]
    loader = build_loader(r.cfg, 0, 1, multiple=1)
    metas = [next(loader)[1] for _ in range(PROBE_BATCHES)]
    mcfg = model_config(r.cfg.model)
    attn = sum(3 * (sum(forward_flops(mcfg, [e - s for s, e in m.segments()],
                                         [m.text_bounds[i + 1] - m.text_bounds[i] for i in range(m.num_videos)],
                                         m.num_videos, split=True)[k] for k in ("attention_core",))) for m in metas)
    assert attn > 0.01 * r.flops / r.steps * PROBE_BATCHES


def _sweep_cmd(path, *extra):
    return [sys.executable, "-m", "vidscale.scaling.cli", "sweep", str(path), "--progress-every", "2", *extra]


TINY = """
name: two
models: [{hidden: 32, depth: 1}, {hidden: 48, depth: 1}]
budgets: [1e9]
min_steps: 3
set: {train.val_videos: 3, logging.every: 1, logging.tensorboard: false, checkpoint.every: 0,
      train.tokens_per_batch: 512}
"""


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_two_run_sweep_writes_results_and_report(tmp_path):
    p = write_sweep(tmp_path, TINY)
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


@pytest.mark.e2e
def test_interrupted_sweep_resumes_without_rerunning_finished_runs(tmp_path):
    """Kill the sweep while its second run trains (after it saved a checkpoint), run the same
    command again: the first run is skipped, the second resumes from its checkpoint."""
    p = write_sweep(tmp_path, TINY.replace("checkpoint.every: 0", "checkpoint.every: 2")
                    .replace("budgets: [1e9]", "budgets: [3e9]"))
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
