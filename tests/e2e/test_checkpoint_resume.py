"""Resume through the CLI, with the DeepSpeed ZeRO-3 engine: kill -9 in the middle of a save,
exact resume at the same layout, and resume on another layout (dp=2 -> dp=1 through the
universal checkpoint; dp=1 x sp=2 -> dp=2 after a SIGUSR1 pre-emption)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.train.metrics import read_metrics

from conftest import DEBUG, ROOT, cli_env, set_args, vidscale, vidscale_cmd  # noqa: E402

pytestmark = pytest.mark.e2e
COMMON = set_args(["logging.every=1", "logging.progress=false", "logging.tensorboard=false", "optim.warmup=2",
                   "data.synthetic_videos=48", "train.val_videos=2", "checkpoint.keep_last=3"])


def _env(**extra):
    env = cli_env(**extra)
    env.pop(ckpt_io.FAULT_ENV, None)
    env.update(extra)
    return env


def _vidscale(*args, env=None, timeout=300):
    return vidscale(*args, timeout=timeout, env=env or _env())


def _wait_for(cond, proc, timeout=240, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the `python -m vidscale.scaling.train.loop` children of a local launcher."""
    out = {}
    for c in psutil.Process(launcher).children(recursive=True):
        try:
            env = c.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "vidscale.scaling.train.loop" in " ".join(c.cmdline()):
            out[int(env["RANK"])] = c.pid
    return out


def _losses(run: Path) -> dict[int, float]:
    recs = read_metrics(run)
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def test_kill9_mid_save_then_resume_is_exact(tmp_path):
    """ZeRO-3, one process: kill -9 while the step-6 checkpoint is half written; the step-3
    one stays intact and is resumed; the resumed losses equal an uninterrupted run's bit for bit."""
    train = ["train", "recipes/debug.yaml", "--set", "train.steps=6", "--set", "checkpoint.every=3", *COMMON]
    ref = _vidscale(*train, "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    p = subprocess.Popen(vidscale_cmd(*train, "--run-dir", run), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(**{ckpt_io.FAULT_ENV: "hang@6"}))  # stalls after the save's first file
    tmp = run / "checkpoints" / ".tmp-step_00000006"
    try:
        _wait_for(lambda: tmp.is_dir() and any(f.is_file() for f in tmp.rglob("*")), p, what="a half-written save")
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    root = run / "checkpoints"
    assert [t for _, t in ckpt_io.committed(root)] == ["step_00000003"]
    assert ckpt_io.read_latest(root) == "step_00000003"
    ckpt_io.verify(root / "step_00000003")

    r = _vidscale("resume", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "step_00000003" in r.stdout + r.stderr
    a, b = _losses(tmp_path / "ref"), _losses(run)
    assert sorted(b) == list(range(1, 7))
    assert a == b  # bit for bit, every step (steps 1-3 from the killed run, 4-6 resumed)
    assert ckpt_io.read_latest(root) == "step_00000006"

    # consolidated weights from the ZeRO shards load into a plain VideoDiT (no DeepSpeed)
    import torch
    from vidscale.scaling.checkpoint.weights import load_weights
    models = {}
    for ema in (False, True):
        out = tmp_path / f"w{int(ema)}.safetensors"
        e = _vidscale("export", str(run), "--out", str(out), *(["--ema"] if ema else []))
        assert e.returncode == 0, e.stderr[-3000:]
        assert json.loads(e.stdout.strip().splitlines()[-1])["checkpoint"].endswith("step_00000006")
        models[ema], cfg = load_weights(out)  # strict: every parameter present with its shape
        assert cfg.model.size == "debug"
    raw, ema = dict(models[False].named_parameters()), dict(models[True].named_parameters())
    assert all(torch.isfinite(p).all() for p in raw.values())
    assert any(not torch.equal(raw[n], ema[n]) for n in raw)  # the EMA lags the weights


_CHECK_STATE = r"""
import json, sys, torch, deepspeed
from vidscale.scaling.config import load_config
from vidscale.scaling.train.loop import Trainer
from vidscale.scaling.checkpoint.zero import export_weights
ckpt = sys.argv[1]
cfg = load_config(ckpt + "/config.yaml", ["cluster.nproc=1", "checkpoint.resume=" + ckpt, "train.run_dir=" + sys.argv[2]])
tr = Trainer(cfg)
from pathlib import Path
full, ema = export_weights(Path(ckpt), False), export_weights(Path(ckpt), True)
dw = de = 0.0
for n, p in tr.engine.model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        dw = max(dw, (p.detach().float() - full[n]).abs().max().item())
    de = max(de, (tr.engine.ema[n] - ema[n].reshape(-1)[:tr.engine.ema[n].numel()]).abs().max().item())
print(json.dumps({"step": tr.step, "dw": dw, "de": de, "lr": tr.engine.lr}))
"""


@pytest.mark.dist
def test_kill9_of_a_rank_mid_save_then_resume_dp2_as_dp1(tmp_path):
    """ZeRO-3 on 2 ranks: kill -9 rank 1 while the step-6 checkpoint is being written; the
    step-3 checkpoint is intact and `vidscale resume --nproc 1` continues from it through the
    universal checkpoint: weights and EMA equal the saved ones exactly, training completes."""
    run = tmp_path / "run"
    p = subprocess.Popen(vidscale_cmd("train", "recipes/debug.yaml", "--nproc", "2", "--set", "train.steps=6",
                                      "--set", "checkpoint.every=3", *COMMON, "--run-dir", run),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(**{ckpt_io.FAULT_ENV: "hang@6"}))
    tmp = run / "checkpoints" / ".tmp-step_00000006"
    try:
        _wait_for(lambda: tmp.is_dir() and any(f.is_file() for f in tmp.rglob("*")), p,
                  what="a half-written save")
        ranks = _rank_pids(p.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        code = p.wait(timeout=120)
    finally:
        p.kill()
        p.wait()
    # the launcher names the signal and exits as the shell reports a process it killed
    assert code == 128 + signal.SIGKILL and "rank 1 of 2 was killed by SIGKILL" in p.stderr.read(), code
    root = run / "checkpoints"
    assert [t for _, t in ckpt_io.committed(root)] == ["step_00000003"]
    ckpt_io.verify(root / "step_00000003")

    # the loaded state is exactly the saved one (weights and EMA gathered vs. consolidated)
    chk = subprocess.run([sys.executable, "-c", _CHECK_STATE, str(root / "step_00000003"), str(tmp_path / "chk")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"))
    assert chk.returncode == 0, chk.stderr[-3000:]
    st = json.loads(chk.stdout.strip().splitlines()[-1])
    assert st["step"] == 3 and st["dw"] == 0.0 and st["de"] == 0.0, st

    r = _vidscale("resume", str(run), "--nproc", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "saved with world 2 = dp 2 x sp 1, now world 1 = dp 1 x sp 1" in out, out[-2000:]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7))
    assert all(v == v and v < 10 for v in losses.values())
    assert ckpt_io.read_latest(root) == "step_00000006"


@pytest.mark.dist
def test_sigusr1_preemption_then_resume_sp2_as_dp2(tmp_path):
    """dp=1 x sp=2 with async saves: SIGUSR1 to ONE rank -> both finish the step, save, exit
    85; resumed as dp=2 x sp=1 with the loader remapped: the rest of the epoch is seen once."""
    run = tmp_path / "run"
    p = subprocess.Popen(vidscale_cmd("train", "recipes/debug.yaml", "--nproc", "2", "--set", "parallel.ulysses=2",
                                      "--set", "train.steps=8", "--set", "checkpoint.every=2",
                                      "--set", "checkpoint.async_save=true", *COMMON, "--run-dir", run),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: len(read_metrics(run)) >= 3, p, what="step 3")  # step 2 saved
        os.kill(_rank_pids(p.pid)[1], signal.SIGUSR1)
        code = p.wait(timeout=180)
    finally:
        p.kill()
        p.wait()
    assert code == 85, p.stderr.read()[-3000:]
    root = run / "checkpoints"
    ckpts = ckpt_io.committed(root)
    (prev, prev_tag), (step, tag) = ckpts[-2:]  # async saves every 2 steps, then the pre-emption one
    assert 3 <= step < 8 and ckpt_io.read_latest(root) == tag
    # damage the newest one: resume (2 ranks verifying a stripe each) must report it and use prev
    victim = root / tag / "ema/rank00001.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-8] + bytes(8))
    saved = [json.loads((root / prev_tag / "loader/dp00000.json").read_text())]

    r = _vidscale("resume", str(run), "--set", "parallel.ulysses=1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert f"file {victim} does not match its checksum (xxh3_128)" in out, out[-3000:]
    assert f"resumed from {root / prev_tag} (step {prev}, saved with world 2 = dp 1 x sp 2, now world 2 = dp 2 x sp 1" in out
    assert sorted(_losses(run)) == list(range(1, 9))
    # the two new ranks' loader states at the end cover the old rank's unconsumed samples once
    from vidscale.data.loader import _positions, remap_loader_states
    new = remap_loader_states(saved, 2)
    left = [set(_positions(s["ranges"])) for s in new]
    assert not (left[0] & left[1])
    old_left = set(_positions(saved[0]["ranges"])) - set(_positions(saved[0]["consumed"]))
    assert left[0] | left[1] == old_left


@pytest.mark.dist
def test_a_save_rank_0_cannot_start_stops_every_rank_at_once(tmp_path):
    """ZeRO-3 on 2 ranks: rank 0 cannot create the step-4 temporary directory (ENOSPC). The run
    stops with one line naming the path, long before the 300 s collective timeout (rank 1
    learns of it from rank 0 through an all-reduce; the local launcher would also stop it);
    the step-2 checkpoint stays the latest."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    r = _vidscale("train", "recipes/debug.yaml", "--nproc", "2", "--set", "train.steps=4", "--set", "checkpoint.every=2",
                  *COMMON, "--run-dir", str(run), env=_env(**{ckpt_io.FAULT_ENV: "mkdir@4"}))
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert f"cannot write {run / 'checkpoints' / '.tmp-step_00000004'}: No space left on device" in r.stderr, r.stderr[-3000:]
    assert took < 200, took  # not a collective timeout
    root = run / "checkpoints"
    assert [t for _, t in ckpt_io.committed(root)] == ["step_00000002"] and ckpt_io.read_latest(root) == "step_00000002"
    ckpt_io.verify(root / "step_00000002")


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    r = vidscale("resume", run, timeout=120)
    assert r.returncode == 2 and "config.yaml: not found" in r.stderr
    (run / "config.yaml").write_text(DEBUG.read_text())
    r = vidscale("resume", run, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no checkpoint to resume from" in lines[0], r.stderr
    assert not (run / "checkpoints").exists()
