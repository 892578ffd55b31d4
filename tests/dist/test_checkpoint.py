"""Checkpoints of the single-process engine: atomic commit, manifest, damage detection,
failed writes, retention, RNG state, async save. In-process and fast (debug model)."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.checkpoint.manager import CheckpointError, CorruptCheckpoint, resolve, rng_state, set_rng_state
from vidscale.scaling.config import load_config
from vidscale.scaling.train.loop import train

from conftest import ROOT  # noqa: E402
FAST = ["parallel.zero_stage=0", "logging.progress=false", "logging.tensorboard=false", "logging.every=1", "optim.warmup=2",
        "data.synthetic_videos=32", "train.val_videos=2"]


def _cfg(run_dir, *over):
    return load_config(ROOT / "recipes/debug.yaml", FAST + [f"train.run_dir={run_dir}", *over])


def _train(run_dir, *over) -> dict:
    return train(_cfg(run_dir, *over))


@pytest.mark.parametrize("checksum", ["xxh3_128", "sha256"])
def test_save_commits_complete_checkpoints_with_manifest(tmp_path, checksum):
    _train(tmp_path, "train.steps=4", "checkpoint.every=2", f"checkpoint.checksum={checksum}")
    root = tmp_path / "checkpoints"
    assert [t for _, t in ckpt_io.committed(root)] == ["step_00000002", "step_00000004"]
    assert ckpt_io.read_latest(root) == "step_00000004"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporaries left
    ck = root / "step_00000004"
    man = json.loads((ck / "manifest.json").read_text())
    files = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(man["files"]) == files
    for rel, e in man["files"].items():
        data = (ck / rel).read_bytes()
        want = xxhash.xxh3_128(data) if checksum == "xxh3_128" else hashlib.sha256(data)
        assert e["size"] == len(data) and e[checksum] == want.hexdigest(), rel
    for f in ("model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.json", "state.json",
              "config.yaml", "rng/rank00000.json", "loader/dp00000.json"):
        assert f in man["files"], f
    st = json.loads((ck / "state.json").read_text())
    assert st["step"] == 4 and st["tokens_seen"] > 0
    assert st["layout"] == {"world": 1, "dp": 1, "sp": 1, "ulysses": 1, "ring": 1, "zero_stage": 0, "engine": "torch"}
    # the optimizer file holds tensors and plain containers only: loadable without unpickling objects
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert opt["state"] and "param_groups" in opt


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    _train(tmp_path, "train.steps=4", "checkpoint.every=2")
    root = tmp_path / "checkpoints"
    victim = root / "step_00000004" / "model.safetensors"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte altered: only the checksum sees it
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:
        victim.unlink()
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        ckpt_io.verify(root / "step_00000004")
    reports = []
    assert resolve("auto", root, report=reports.append) == root / "step_00000002"
    assert len(reports) == 1 and str(victim) in reports[0]


def test_missing_manifest_means_incomplete(tmp_path):
    _train(tmp_path, "train.steps=4", "checkpoint.every=2")
    root = tmp_path / "checkpoints"
    (root / "step_00000004" / "manifest.json").unlink()
    reports = []
    assert resolve("auto", root, report=reports.append) == root / "step_00000002"
    assert "manifest.json is missing" in reports[0]


def test_failed_write_names_the_path_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt_io.FAULT_ENV, "enospc@4")
    with pytest.raises(CheckpointError, match=r"cannot write .*\.tmp-step_00000004.*No space left on device"):
        _train(tmp_path, "train.steps=4", "checkpoint.every=2")
    root = tmp_path / "checkpoints"
    assert [t for _, t in ckpt_io.committed(root)] == ["step_00000002"]
    assert ckpt_io.read_latest(root) == "step_00000002"
    ckpt_io.verify(root / "step_00000002")
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def _can_mount_tmpfs(where: Path) -> bool:
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    except FileNotFoundError:
        return False
    if r.returncode == 0:
        subprocess.run(["umount", str(where)], check=True)
    return r.returncode == 0


def test_disk_full_on_a_real_tmpfs(tmp_path):
    """A real ENOSPC: the run dir on a tmpfs with room for one checkpoint, not two."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs permission to mount a tmpfs (root); the injected-ENOSPC test covers the logic")
    one = tmp_path / "probe"
    _train(one, "train.steps=1", "checkpoint.every=1", "train.val_videos=1")
    size = sum(p.stat().st_size for p in (one / "checkpoints").rglob("*") if p.is_file())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) + (1 << 20)}", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(CheckpointError, match=r"cannot write .*mnt/run/checkpoints/\.tmp-step_00000004.*"
                                                  r"No space left on device"):
            _train(mnt / "run", "train.steps=4", "checkpoint.every=2")
        root = mnt / "run" / "checkpoints"
        assert [t for _, t in ckpt_io.committed(root)] == ["step_00000002"]
        assert ckpt_io.read_latest(root) == "step_00000002"
        ckpt_io.verify(root / "step_00000002")
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # space given back
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    _train(tmp_path, "train.steps=7", "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.keep_every=3",
           "data.synthetic_videos=16")
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt_io.committed(root)] == [3, 6, 7]
    assert ckpt_io.read_latest(root) == "step_00000007"


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    s = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(s)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_async_save_writes_the_same_checkpoint(tmp_path, zero_stage, monkeypatch):
    """The background writer (host snapshots, DeepSpeed's shards included) writes what a
    synchronous save writes: our files byte for byte, DeepSpeed's torch.save shards with
    equal contents (torch.save stamps each file with a fresh serialization id)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    z = f"parallel.zero_stage={zero_stage}"
    _train(tmp_path / "sync", "train.steps=3", "checkpoint.every=3", z)
    r = _train(tmp_path / "async", "train.steps=3", "checkpoint.every=3", "checkpoint.async_save=true", z)
    assert len(r["checkpoint_stall_s"]) == 1
    man = [json.loads((tmp_path / k / "checkpoints/step_00000003/manifest.json").read_text())["files"]
           for k in ("sync", "async")]
    want = ["model.safetensors", "ema.safetensors", "optimizer.pt"] if zero_stage == 0 else ["ema/rank00000.safetensors"]
    shards = [] if zero_stage == 0 else ["zero/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                         "zero/state/zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert set(man[0]) == set(man[1]) and set(want + shards) <= set(man[0]), sorted(man[0])
    for f in want + ["loader/dp00000.json", "rng/rank00000.json"]:
        assert man[0][f]["xxh3_128"] == man[1][f]["xxh3_128"], f
    for f in shards:
        a, b = (torch.load(tmp_path / k / "checkpoints/step_00000003" / f, weights_only=False) for k in ("sync", "async"))
        _assert_same_state(a, b, f)


def _assert_same_state(a, b, where):
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float, str, bool, type(None))):
        assert a == b, where
    else:  # objects (DeepSpeed's loss scaler): the same type and attributes
        assert type(a) is type(b) and repr(vars(a)) == repr(vars(b)), where


def test_export_loads_into_videodit_without_deepspeed(tmp_path):
    from safetensors.torch import load_file

    from vidscale.scaling.cli.export import export
    from vidscale.scaling.checkpoint.weights import load_weights
    _train(tmp_path, "train.steps=2", "checkpoint.every=2")
    for ema in (False, True):
        out = tmp_path / f"w{int(ema)}.safetensors"
        export(str(tmp_path), out, ema=ema)
        model, cfg = load_weights(out)
        saved = load_file(str(tmp_path / "checkpoints/step_00000002" / ("ema" if ema else "model")) + ".safetensors")
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), saved[n]), n
        assert cfg.model.size == "debug"


def test_signal_requests_a_save_and_stops(tmp_path):
    from vidscale.scaling.train import signals
    cfg = _cfg(tmp_path, "train.steps=6", "checkpoint.every=0")
    from vidscale.scaling.train.loop import Trainer
    # the flag is read at the step boundary: request it before the first step ends
    orig = Trainer.train_step

    def step_then_signal(self):
        out = orig(self)
        if self.step == 2:
            os.kill(os.getpid(), __import__("signal").SIGUSR1)
        return out
    Trainer.train_step = step_then_signal
    try:
        r = train(cfg)
    finally:
        Trainer.train_step = orig
        signals.clear()
    assert r["preempted"] and r["steps"] == 2
    assert [s for s, _ in ckpt_io.committed(tmp_path / "checkpoints")] == [2]


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run([sys.executable, "-m", "vidscale.scaling.cli", "resume", str(run)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "config.yaml: not found" in r.stderr
    (run / "config.yaml").write_text((ROOT / "recipes/debug.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "vidscale.scaling.cli", "resume", str(run)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no checkpoint to resume from" in lines[0], r.stderr
    assert not (run / "checkpoints").exists()
