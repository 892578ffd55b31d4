"""A run directory is owned: nothing overwrites or deletes a finished run or its last good
checkpoint, whatever the CLI is handed. Each test drives `vidscale` in a subprocess as a user
would (or as an attacker would, with odd paths), and compares the directories byte for byte."""
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from vidscale.scaling.config import load_config

from conftest import QUIET, ROOT, set_args, vidscale, vidscale_cmd, wait_for

pytestmark = pytest.mark.e2e

FAST = set_args([*QUIET, "parallel.zero_stage=0", "train.val_videos=0", "data.synthetic_videos=16",
                 "optim.warmup=1", "logging.every=1"])


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path`."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def train(run_dir, *extra, steps=4, every=2):
    return vidscale("train", "recipes/debug.yaml", "--run-dir", str(run_dir), *FAST,
                    "--set", f"train.steps={steps}", "--set", f"checkpoint.every={every}", *extra)


def test_odd_run_dir_names_are_kept_exactly_and_never_reach_another_run(tmp_path):
    victim = tmp_path / "victim"
    r = train(victim)
    assert r.returncode == 0, r.stderr[-2000:]
    before = tree(victim)
    for name in ["victim #2", "true", "${oc.env:HOME}", "it's \"quoted\""]:
        r = train(tmp_path / name, steps=2)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert (tmp_path / name / "checkpoints" / "latest").is_file(), name
    assert tree(victim) == before  # the finished run is untouched
    r = train(str(tmp_path / "a") + "\nb", steps=2)
    assert r.returncode == 2 and "newline" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_fresh_run_refuses_a_directory_with_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    assert train(run).returncode == 0
    before = tree(run)
    r = train(run)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "vidscale resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tree(run) == before
    r = train(run, "--resume", "auto", steps=6)  # continuing it is what --resume auto is for
    assert r.returncode == 0, r.stderr[-2000:]


def test_two_runs_on_one_directory_the_second_fails_fast_naming_the_first(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(vidscale_cmd("train", "recipes/debug.yaml", "--run-dir", run, *FAST,
                                          "--set", "train.steps=40", "--set", "checkpoint.every=5"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), 300, "the first run's first checkpoint")
        holder = json.loads((run / ".lock").read_text())
        t0 = time.monotonic()
        second = vidscale("resume", run)
        assert second.returncode == 1 and time.monotonic() - t0 < 60, second.stderr[-2000:]
        assert f"pid {holder['pid']}" in second.stderr and "in use" in second.stderr, second.stderr
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    assert load_config(run / "config.yaml").train.steps == 40  # the first run's recipe
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_bad_numbers_are_refused_before_anything_starts(tmp_path):
    for over, key in [("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.betas=[0.9,1.5]",
                      "optim.betas"), ("optim.ema_decay=1.0", "optim.ema_decay"), ("optim.eps=0", "optim.eps"),
                      ("data.drop_tokens=-0.1", "data.drop_tokens"), ("parallel.timeout_s=0", "parallel.timeout_s")]:
        r = train(tmp_path / "never", "--set", over)
        assert r.returncode == 2 and key in r.stderr and len(r.stderr.strip().splitlines()) == 1, (over, r.stderr)
    assert not (tmp_path / "never").exists()


def test_a_diverging_run_stops_nonzero_and_keeps_its_last_finite_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = train(run, "--set", "optim.lr=10", "--set", "optim.grad_clip=0", "--set", "optim.warmup=0",
              "--set", "checkpoint.keep_last=1", "--set", "logging.every=2", steps=40, every=2)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "non-finite" in r.stderr and len(r.stderr.strip().splitlines()[-1:]) == 1
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, ckpts  # retention kept the last good one, nothing was saved after
    from safetensors.torch import load_file
    from vidscale.scaling.checkpoint import storage
    storage.verify(run / "checkpoints" / ckpts[0])
    weights = load_file(str(run / "checkpoints" / ckpts[0] / "model.safetensors"))
    assert all(bool(v.isfinite().all()) for v in weights.values())
    step = int(ckpts[0].split("_")[1])
    assert f"at step {step + 1}" in r.stderr or f"at step {step + 2}" in r.stderr, r.stderr


def test_resume_with_every_checkpoint_damaged_fails_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert train(run).returncode == 0
    for ck in (run / "checkpoints").glob("step_*"):
        f = ck / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    before = tree(run / "checkpoints")
    metrics = (run / "metrics.jsonl").read_bytes()
    r = vidscale("resume", run, "--set", "train.steps=8")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "none of its 2 checkpoint(s) passed verification" in r.stderr, r.stderr
    assert tree(run / "checkpoints") == before
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_a_failed_resume_leaves_the_recipe_and_a_torn_metrics_line_is_dropped(tmp_path):
    run = tmp_path / "run"
    assert train(run).returncode == 0
    recipe = (run / "config.yaml").read_bytes()
    r = vidscale("resume", run, "--set", "model.size=tiny", "--set", "train.steps=6")
    assert r.returncode == 2 and "does not fit this run's model (Error(s) in loading state_dict" in r.stderr, \
        r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("vidscale resume: error: ") and "step_00000004" in r.stderr
    assert (run / "config.yaml").read_bytes() == recipe
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a process died while appending
    r = vidscale("resume", run, "--set", "train.steps=6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dropped a torn last line" in r.stdout + r.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert load_config(run / "config.yaml").train.steps == 6


def test_resume_auto_refuses_a_finished_run_whose_checkpoints_are_gone(tmp_path):
    """`--resume auto` starts fresh where there is no checkpoint; a finished run whose
    checkpoints were deleted (to save space) must not be trained again over its weights,
    final.json and metrics."""
    run = tmp_path / "run"
    assert train(run, "--set", "train.val_videos=2").returncode == 0
    assert (run / "final.json").is_file() and (run / "model.safetensors").is_file()
    for ck in (run / "checkpoints").glob("step_*"):
        subprocess.run(["rm", "-rf", str(ck)], check=True)
    before = tree(run)
    r = train(run, "--resume", "auto")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "holds a finished run (final.json) and no checkpoint to continue from" in r.stderr, r.stderr
    assert tree(run) == before


def test_a_rewind_retires_the_later_checkpoints_and_a_restart_continues_the_rewound_line(tmp_path):
    """Resuming an earlier checkpoint of the same run (a rewind, e.g. before a loss spike) keeps
    the later checkpoints as `rewound-*` (never deleted) so that `auto`, what a requeued or
    restarted job resumes from, takes the rewound line, not the abandoned one."""
    from vidscale.scaling.checkpoint.rundir import restart_resume
    run = tmp_path / "run"
    keep = ("--set", "checkpoint.keep_last=5")
    assert train(run, *keep, steps=6).returncode == 0
    ck = run / "checkpoints"
    first = {p.name: tree(p) for p in ck.glob("step_*")}
    assert sorted(first) == ["step_00000002", "step_00000004", "step_00000006"]
    r = train(run, *keep, "--resume", str(ck / "step_00000002"), steps=4)  # a shorter schedule: other weights
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rewound to step_00000002" in r.stdout + r.stderr
    # the abandoned line is kept whole, out of resume's way
    assert {p.name[len("rewound-"):]: tree(p) for p in ck.glob("rewound-*")} == {
        t: first[t] for t in ("step_00000004", "step_00000006")}
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert tree(ck / "step_00000004") != first["step_00000004"]  # the new line's own save
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # a requeue of a job started with that explicit path continues from the newest of its line
    assert restart_resume(run, str(ck / "step_00000002")) == "auto"
    assert restart_resume(tmp_path / "elsewhere", str(ck / "step_00000002")) == str(ck / "step_00000002")
    assert restart_resume(tmp_path / "elsewhere", "") == "auto"
    # what a Slurm rank (plain or Ray on Slurm) does with it: only once Slurm has requeued the job
    from dataclasses import replace
    from vidscale.cluster.slurm_task import resume_after_requeue
    from vidscale.scaling.config import load_config
    cfg = load_config(run / "config.yaml")
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(ck / "step_00000002")))
    assert resume_after_requeue(cfg, {}).checkpoint.resume == str(ck / "step_00000002")
    assert resume_after_requeue(cfg, {"SLURM_RESTART_COUNT": "0"}).checkpoint.resume == str(ck / "step_00000002")
    assert resume_after_requeue(cfg, {"SLURM_RESTART_COUNT": "2"}).checkpoint.resume == "auto"
