"""Checkpoints of the single-process engine (plain torch, debug model, in this process):
atomic commit, manifest, damage detection, failed writes, retention, RNG state, export."""
import hashlib
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import load_file

from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.checkpoint.manager import CheckpointError, CorruptCheckpoint, resolve, rng_state, set_rng_state
from vidscale.scaling.checkpoint.weights import load_weights
from vidscale.scaling.cli.export import export
from vidscale.scaling.train import signals
from vidscale.scaling.train.loop import Trainer, train

from conftest import short_run  # noqa: E402


def _train(run_dir, *over) -> dict:
    return train(short_run(run_dir, *over))


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


def test_the_step_counts_tokens_on_the_device_and_a_save_holds_every_one(tmp_path):
    """A step's real-token count stays a tensor on the training device (it used to be read on the
    host every step, stalling a GPU's queue); `tokens_seen` and the TrainState a checkpoint saves
    still count every real token of every step (reference: the same loader, built again)."""
    from vidscale.scaling.train.loop import Trainer
    tr = Trainer(short_run(tmp_path, "train.steps=3", "train.grad_accum=2", "train.val_videos=0",
                           "checkpoint.async_save=false"))
    ref, want = tr.task.build_loader(0, 1), 0
    try:
        for _ in range(3):
            out = tr.train_step()
            assert isinstance(out["global_real"], torch.Tensor) and out["global_real"].device == tr.device
            want += sum(next(ref)[1].num_real for _ in range(2))
        path = tr.save()
        assert json.loads((path / "state.json").read_text())["tokens_seen"] == want
        assert tr.tokens_seen == want
    finally:
        tr.close()


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


def test_export_loads_into_videodit_without_deepspeed(tmp_path):
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
    cfg = short_run(tmp_path, "train.steps=6", "checkpoint.every=0")
    # the flag is read at the step boundary: request it before the first step ends
    orig = Trainer.train_step

    def step_then_signal(self):
        out = orig(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out
    Trainer.train_step = step_then_signal
    try:
        r = train(cfg)
    finally:
        Trainer.train_step = orig
        signals.clear()
    assert r["preempted"] and r["steps"] == 2
    assert [s for s, _ in ckpt_io.committed(tmp_path / "checkpoints")] == [2]


def test_commit_puts_every_folder_and_every_library_written_file_on_disk(tmp_path, monkeypatch):
    """A save is published by a rename: before it, every file (also those a library wrote on its
    own, which no rank recorded) and every folder of the checkpoint must be fsynced, or a node
    that loses power after the rename can come back with a checkpoint missing files."""
    synced: list[Path] = []
    real = ckpt_io.fsync_path
    monkeypatch.setattr(ckpt_io, "fsync_path", lambda p: (synced.append(Path(p)), real(p))[1])
    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step_00000001"
    (tmp / "zero" / "state").mkdir(parents=True)
    ckpt_io.write_bytes(tmp / "zero" / "state" / "part.bin", b"recorded")  # through our writer
    (tmp / "zero" / "zero_to_fp32.py").write_text("# copied by the library\n")  # not recorded
    ckpt_io.write_part(tmp, 0)
    final = ckpt_io.commit(root, tmp, "step_00000001", 1, {})
    ckpt_io.verify(final)
    published = synced.index(tmp)  # the last fsync of the folder before the rename
    before = {p.relative_to(tmp).as_posix() for p in synced[:published] if p.is_relative_to(tmp)}
    assert {"zero", "zero/state", "zero/zero_to_fp32.py"} <= before, before
    assert root in synced[published:]  # and the rename itself


def _commit(root: Path, tag: str, payload: bytes) -> Path:
    """One rank's save of a single file, committed as `tag` (the storage protocol by hand)."""
    tmp = ckpt_io.prepare(root, tag)
    ckpt_io.write_bytes(tmp / "payload.bin", payload)
    ckpt_io.write_part(tmp, 0)
    return ckpt_io.commit(root, tmp, tag, 1, {})


def test_a_resave_of_a_committed_step_swaps_the_directories_in_one_step(tmp_path, monkeypatch):
    """Re-saving a step that is committed never leaves a moment without it: the new directory
    and the old one trade places in one rename (RENAME_EXCHANGE), on a filesystem that has it."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "which").write_text("a"), (b / "which").write_text("b")
    if not ckpt_io.exchange(a, b):
        pytest.skip("this filesystem has no atomic exchange (the two-rename path is tested below)")
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"
    root = tmp_path / "checkpoints"
    _commit(root, "step_00000002", b"old")
    renames: list[tuple[str, str]] = []
    real = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, t: (renames.append((self.name, Path(t).name)), real(self, t))[1])
    final = _commit(root, "step_00000002", b"new")
    assert (final / "payload.bin").read_bytes() == b"new" and ckpt_io.read_latest(root) == "step_00000002"
    ckpt_io.verify(final)
    assert renames == []  # no step where step_00000002 was renamed away
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


def test_a_resave_interrupted_between_two_renames_is_put_back(tmp_path, monkeypatch, capsys):
    """Where there is no atomic exchange (NFS), the old save is renamed to `.old-TAG` before the
    new one takes its place; a crash in between leaves no `TAG`. The next save or resume puts
    the old one back (it was complete) instead of deleting it, and the run resumes from it."""
    run = tmp_path / "run"
    _train(run, "train.steps=4", "checkpoint.every=2")
    root = run / "checkpoints"
    before = (root / "step_00000004" / "model.safetensors").read_bytes()
    monkeypatch.setattr(ckpt_io, "exchange", lambda a, b: False)
    real = Path.rename

    def rename(self, target):  # the process dies between the two renames (here: the second one fails)
        if self.name.startswith(".tmp-"):
            raise OSError(5, "Input/output error", str(target))
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointError):
        _commit(root, "step_00000004", b"a re-save")
    monkeypatch.setattr(Path, "rename", real)
    assert not (root / "step_00000004").exists() and (root / ".old-step_00000004").is_dir()
    capsys.readouterr()
    out = _train(run, "train.steps=6", "checkpoint.every=2", "checkpoint.resume=auto")
    said = capsys.readouterr().out
    assert f"{root / 'step_00000004'}: put back" in said and "resumed from" in said, said
    assert f"resumed from {root / 'step_00000004'}" in said, said
    assert out["steps"] == 6
    assert not list(root.glob(".old-*"))
    assert [t for _, t in ckpt_io.committed(root)][-2:] == ["step_00000004", "step_00000006"]
    # the step-4 save the resume restored is the one the interrupted re-save had renamed away
    assert (root / "step_00000004" / "model.safetensors").read_bytes() == before
    # and the next save's own clean-up puts one back too
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointError):
        _commit(root, "step_00000006", b"a re-save")
    monkeypatch.setattr(Path, "rename", real)
    ckpt_io.prepare(root, "step_00000008")
    ckpt_io.verify(root / "step_00000006")


def test_the_recipe_inside_a_weights_file_reads_nothing_else_and_errors_name_that_file(tmp_path):
    from safetensors.torch import save_file

    from vidscale.scaling.config import RecipeError
    for text, says in [("base: ../../etc/hostname\n", "names a base file"),
                       ("model:\n  hidden: -3\n", "model.hidden"),
                       ("[1, 2]\n", "not a mapping")]:
        path = tmp_path / "w.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "vidscale", "kind": "dit", "config": text})
        with pytest.raises((ValueError, RecipeError)) as e:
            load_weights(path)
        assert str(path) in str(e.value) and says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_resume_trains_with_the_recipes_optimizer_settings(tmp_path, capsys, zero_stage=0):
    """`vidscale resume RUN --set optim.lr=...` (what the divergence message advises): the
    checkpoint's optimizer and schedule state load, then the recipe's lr, betas, eps and
    weight_decay replace theirs, said in one line; unchanged settings resume as they were.
    (The DeepSpeed engine: tests/dist/test_checkpoint.py.)"""
    from vidscale.scaling.train.engine import lr_lambda
    run = tmp_path / "run"
    first = ["train.steps=4", "checkpoint.every=2", "train.val_videos=0", f"parallel.zero_stage={zero_stage}",
             "optim.lr=2e-3", "optim.weight_decay=0.0"]
    _train(run, *first)
    same = Trainer(short_run(run, *first[1:], "train.steps=8", "checkpoint.resume=auto"))
    try:
        group = same.engine.optimizer.param_groups[0]
        f = lr_lambda(2, 8, same.cfg.optim.min_lr_ratio, same.cfg.optim.schedule)
        assert group["lr"] == 2e-3 * f(4) and group["weight_decay"] == 0.0
    finally:
        same.close()
    # a longer run (train.steps 4 -> 8): the rate at the resumed step follows the new schedule
    assert "optimizer settings replace the checkpoint's (saved -> now): lr at step 4: 0.0002 -> 0.00155 (the " \
           "recipe's schedule)" in capsys.readouterr().out
    tr = Trainer(short_run(run, *first[1:], "train.steps=8", "checkpoint.resume=auto", "optim.lr=5e-4",
                           "optim.weight_decay=0.05", "optim.betas=[0.9,0.99]"))
    try:
        sch = tr.engine.scheduler if zero_stage == 0 else tr.engine.ds.lr_scheduler
        assert sch.base_lrs == [5e-4] * len(tr.engine.optimizer.param_groups)
        for g in tr.engine.optimizer.param_groups:
            assert g["lr"] == 5e-4 * f(4) and g["weight_decay"] == 0.05 and tuple(g["betas"]) == (0.9, 0.99)
        tr.train_step()  # the schedule goes on from the new peak
        assert tr.engine.lr == 5e-4 * f(5)
    finally:
        tr.close()
    said = capsys.readouterr().out
    assert "optimizer settings replace the checkpoint's (saved -> now): optim.betas: (0.9, 0.999) -> (0.9, 0.99); " \
           "optim.weight_decay: 0.0 -> 0.05; optim.lr: 0.002 -> 0.0005" in said, said
