"""Async checkpoints under DeepSpeed ZeRO-3 in this process (a world of one): the background
writer saves what a synchronous save saves, DeepSpeed's shards included."""
import json

import pytest
import torch

from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.checkpoint import zero
from vidscale.scaling.train.loop import train

from conftest import short_run  # noqa: E402

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_async_save_writes_the_same_checkpoint(tmp_path, zero_stage, monkeypatch):
    """The background writer (host snapshots, DeepSpeed's shards included) writes what a
    synchronous save writes: our files byte for byte, DeepSpeed's torch.save shards with
    equal contents (torch.save stamps each file with a fresh serialization id)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    z = f"parallel.zero_stage={zero_stage}"
    train(short_run(tmp_path / "sync", "train.steps=3", "checkpoint.every=3", z))
    r = train(short_run(tmp_path / "async", "train.steps=3", "checkpoint.every=3", "checkpoint.async_save=true", z))
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


def test_every_file_of_a_zero3_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    """What DeepSpeed writes (its shards and their universal conversion) loads through our
    loader with weights_only=True and the allow-list, and resume / conversion / export work
    with every torch.load turned into that."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    train(short_run(tmp_path / "run", "train.steps=2", "checkpoint.every=2", "parallel.zero_stage=3"))
    root = tmp_path / "run/checkpoints"
    ckpt = root / "step_00000002"
    zero.convert_universal(ckpt)
    files = sorted(root.rglob("*.pt"))
    assert len([f for f in files if ".universal" in f.parts]) > 10 and len(files) > 12, files
    for f in files:
        zero.load_torch(f, map_location="cpu")
    assert len(zero.export_weights(ckpt, ema=False)) > 10
    train(short_run(tmp_path / "run", "train.steps=3", "checkpoint.every=3", "parallel.zero_stage=3",
                    "checkpoint.resume=auto"))  # DeepSpeed's own load_checkpoint, under the same loads
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps


def test_universal_conversion_is_verified_rebuilt_when_damaged_and_dropped_when_its_step_is_saved_again(
        tmp_path, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    train(short_run(tmp_path / "run", "train.steps=2", "checkpoint.every=2", "parallel.zero_stage=3"))
    root = tmp_path / "run/checkpoints"
    ckpt = root / "step_00000002"
    out = zero.convert_universal(ckpt)
    man = ckpt_io.verify(out)  # it has a manifest of its own
    assert man["meta"]["source"] == ckpt_io.source_id(ckpt) and len(man["files"]) > 10
    victim = out / next(rel for rel in sorted(man["files"]) if rel.endswith("fp32.pt"))
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # damaged: truncated
    said = []
    assert zero.convert_universal(ckpt, report=said.append) == out
    assert len(said) == 1 and str(victim) in said[0] and "truncated" in said[0], said
    assert victim.read_bytes() == good and ckpt_io.verify(out)
    # the step saved again (same tag): its old conversion goes at once
    ckpt_io.prepare(root, "step_00000002")
    assert not out.exists()


def _commit_fails_on_rank_0(rank, world, port, out_dir, run_dir):
    """One rank of an async-save run whose step-2 commit fails on rank 0 alone: what each rank raised."""
    import json as json_
    import os as os_
    from vidscale.scaling.checkpoint import storage
    from vidscale.scaling.train.loop import train
    from conftest import short_run
    os_.environ[storage.FAULT_ENV] = "commit@2"
    cfg = short_run(run_dir, "train.steps=6", "checkpoint.every=2", "checkpoint.async_save=true",
                    "parallel.timeout_s=900", "parallel.zero_stage=1")
    try:
        train(cfg)
        out = {"raised": None}
    except BaseException as e:  # noqa: BLE001 - what this rank saw is the result
        out = {"raised": type(e).__name__, "message": str(e)}
    with open(os_.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json_.dump(out, f)


def test_a_background_commit_only_rank_0_sees_fail_stops_every_rank_at_the_next_save(tmp_path):
    """checkpoint.async_save on 2 ranks: rank 0's commit of step 2 fails (ENOSPC) in its
    background thread, where rank 1 cannot see it. At the step-4 save both ranks raise a
    CheckpointError (rank 0 its own, naming the path; rank 1 that another rank failed),
    instead of rank 1 meeting a dead or silent peer in the save's collectives."""
    from vidscale.cluster.local import spawn_ranks
    run = tmp_path / "run"
    codes = spawn_ranks(_commit_fails_on_rank_0, 2, (str(tmp_path), str(run)), timeout_s=600)
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert all(f.exists() for f in files), f"ranks exited with {codes} before writing results"
    r0, r1 = (json.loads(f.read_text()) for f in files)
    assert r0["raised"] == "CheckpointError" and "step_00000002" in r0["message"], r0
    assert "No space left" in r0["message"], r0
    assert r1 == {"raised": "CheckpointError", "message": "checkpoint: the background save of step 2 failed on "
                  "another rank (its error names the cause)"}, r1
    root = run / "checkpoints"  # nothing was committed after the failure
    assert ckpt_io.committed(root) == [] and ckpt_io.read_latest(root) is None


def test_zero2_resumes_exactly_and_with_the_recipes_optimizer_settings(tmp_path, monkeypatch, capsys):
    """ZeRO-2 (stages 1 and 2 share DeepSpeed's optimizer code): its shards pickle a
    `fragment_address` besides tensors, which the weights-only loader refused, so no stage 1
    or 2 run could resume. Now: a resume continues bit for bit, and one with `--set
    optim.lr=...` trains with that lr."""
    from vidscale.scaling.train.engine import lr_lambda
    from vidscale.scaling.train.loop import Trainer
    from vidscale.scaling.train.metrics import read_metrics
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    z = ["parallel.zero_stage=2", "train.val_videos=0", "checkpoint.every=2"]
    whole = tmp_path / "whole"
    train(short_run(whole, "train.steps=4", *z))
    part = tmp_path / "part"
    train(short_run(part, "train.steps=4", *z, "checkpoint.resume=" + str(whole / "checkpoints/step_00000002")))
    losses = {r["step"]: r["loss"] for r in read_metrics(whole)}
    assert {r["step"]: r["loss"] for r in read_metrics(part)} == {s: losses[s] for s in (3, 4)}
    capsys.readouterr()
    tr = Trainer(short_run(whole, "train.steps=4", *z, "checkpoint.resume=auto", "optim.lr=5e-4"))
    try:
        f = lr_lambda(tr.cfg.optim.warmup, 4, tr.cfg.optim.min_lr_ratio, tr.cfg.optim.schedule)
        assert tr.engine.ds.lr_scheduler.base_lrs == [5e-4] * len(tr.engine.optimizer.param_groups)
        assert all(g["lr"] == 5e-4 * f(4) for g in tr.engine.optimizer.param_groups)
    finally:
        tr.close()
    assert "optim.lr: 0.001 -> 0.0005" in capsys.readouterr().out
