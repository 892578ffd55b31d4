"""`train.init_from` on real engines: run A trains on 2 ZeRO-3 ranks; B starts from A's weights on
another layout and engine. B's first loss equals a single-process reference computed from the
exported weights on B's first batch; a run directory gives its latest checkpoint's live (or
EMA) weights exactly; a resize re-initialises only the resized parameters."""
import json
import os

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from vidscale.cluster.local import spawn_ranks
from vidscale.scaling.checkpoint import zero as ckpt_zero
from vidscale.scaling.cli.export import export
from vidscale.scaling.train import init_from

from conftest import debug_config, loader_for, read_losses  # noqa: E402

pytestmark = pytest.mark.dist
SMALL = ["train.tokens_per_batch=256", "model.hidden=48", "model.depth=2", "optim.warmup=2", "optim.ema_decay=0.9",
         "logging.every=1", "train.val_videos=2", "parallel.zero_stage=3"]


def _cfg(run_dir, *overrides):
    return debug_config(*SMALL, f"train.run_dir={run_dir}", *overrides)


def _train(rank, world, port, run_dir, overrides):
    torch.set_num_threads(1)
    from vidscale.scaling.train.loop import train
    train(_cfg(run_dir, *overrides))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """A: 2 steps on 2 ZeRO-3 ranks (a checkpoint at step 2, EMA on), and its export."""
    root = tmp_path_factory.mktemp("init_from")
    codes = spawn_ranks(_train, 2, (str(root / "A"), ["train.steps=2", "checkpoint.every=2"]))
    assert (root / "A/model.safetensors").exists(), codes
    export(str(root / "A"), root / "A.safetensors")
    return root


def _one_rank(monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)


def _initial_weights(cfg) -> tuple[dict, dict]:
    """The consolidated weights of a run right after it starts (before any step), and its record."""
    from vidscale.scaling.train.loop import Trainer
    tr = Trainer(cfg)
    try:
        weights = tr.engine.full_state_dict()
        return weights, json.loads((tr.run_dir / init_from.RECORD_FILE).read_text()) if tr.init else {}
    finally:
        tr.close()
        tr.dims.destroy()


def _reference_first_loss(cfg, weights_file, dp, sp) -> float:
    """Plain torch, one process: the loss of the file's weights on the dp ranks' first batches."""
    from vidscale.scaling.checkpoint.weights import load_weights
    from vidscale.scaling.objective import build_objective, diffusion_inputs, drop_captions, step_generator
    model, _ = load_weights(weights_file)
    objective = build_objective(cfg.objective)
    total, real = 0.0, 0
    with torch.no_grad():
        for r in range(dp):
            x0, meta = next(loader_for(cfg, r, dp, multiple=sp))
            gen = step_generator(cfg.train.seed, 0, 0, r)
            meta = drop_captions(meta, cfg.objective.caption_dropout, gen)
            t, noise = diffusion_inputs(objective, x0, meta, gen)
            terms = objective.loss_terms(lambda xt, tm: model(xt, tm, meta), x0, t, noise, meta.seg_ids)
            total += (terms * meta.real_mask()).sum().item()
            real += int(meta.num_real)
    return total / real


def test_export_into_zero3_dp2_sp2_matches_the_single_process_loss(run_a, tmp_path):
    """A (dp 2) -> export -> B on dp 2 x sp 2 (Ulysses), 4 ZeRO-3 ranks each loading its own
    partition: B's first loss is the exported weights' loss on B's first batch; B trains on."""
    f = run_a / "A.safetensors"
    b = ["train.steps=2", f"train.init_from={f}", "parallel.ulysses=2", "train.seed=3"]
    codes = spawn_ranks(_train, 4, (str(tmp_path / "B"), b))
    losses = read_losses(tmp_path / "B")
    assert sorted(losses) == [1, 2], (codes, losses)
    want = _reference_first_loss(_cfg(tmp_path / "ref", *b), f, dp=2, sp=2)
    print(f"init_from dp2 x sp2: first loss {losses[1]:.9f}, reference {want:.9f}")
    assert abs(losses[1] - want) <= 9e-7, (losses, want)  # the bound of the ZeRO parity tests
    assert losses[2] == losses[2] and losses[2] != losses[1]
    rec = json.loads((tmp_path / "B" / init_from.RECORD_FILE).read_text())
    assert rec["init_from"] == str(f) and rec["xxh3_128"] == xxhash.xxh3_128(f.read_bytes()).hexdigest() and rec["step"] == 2
    first = json.loads((tmp_path / "B/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["init_from"]["xxh3_128"] == rec["xxh3_128"]
    meta_end = json.loads(_metadata(tmp_path / "B/model.safetensors")["init_from"])
    assert meta_end["init_from"] == str(f)


def _metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_a_run_directory_gives_its_latest_checkpoints_live_weights_to_zero3(run_a, tmp_path, monkeypatch):
    """ZeRO checkpoint -> DeepSpeed's universal conversion, one fp32 file per parameter ->
    a ZeRO-3 engine's partitions: the starting weights are A's step-2 weights exactly."""
    _one_rank(monkeypatch)
    got, rec = _initial_weights(_cfg(tmp_path / "B", f"train.init_from={run_a / 'A'}"))
    want = load_file(str(run_a / "A/model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert rec["kind"] == "checkpoint" and rec["step"] == 2 and rec["init_from"].endswith("step_00000002")
    # the conversion went into B's directory and is gone once loaded: A is only read
    assert not ckpt_zero.universal_dir(run_a / "A/checkpoints/step_00000002").exists()
    assert not (tmp_path / "B" / init_from.SCRATCH_DIR).exists()


def test_a_run_directory_with_init_from_ema_gives_its_ema_to_plain_torch(run_a, tmp_path, monkeypatch):
    """The EMA shards of 2 ranks, re-cut per tensor, into a one-process plain-torch engine."""
    _one_rank(monkeypatch)
    got, rec = _initial_weights(_cfg(tmp_path / "B", f"train.init_from={run_a / 'A'}", "train.init_from_ema=true",
                                     "parallel.zero_stage=0"))
    want = load_file(str(run_a / "A/ema.safetensors"))
    live = load_file(str(run_a / "A/model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want) and rec["ema"] is True
    assert any(not torch.equal(want[k], live[k]) for k in want)  # the EMA is not the live weights


def test_resize_reinitialises_only_the_resized_parameters(run_a, tmp_path, monkeypatch):
    """model.in_channels 4 -> 8 with init_allow_resize: the embedding and the output layer keep
    the fresh initialisation a run without init_from has; every other parameter is A's."""
    _one_rank(monkeypatch)
    f = run_a / "A.safetensors"
    eight = ["model.in_channels=8", "parallel.zero_stage=0"]
    got, rec = _initial_weights(_cfg(tmp_path / "B", f"train.init_from={f}", "train.init_allow_resize=true", *eight))
    fresh, _ = _initial_weights(_cfg(tmp_path / "fresh", *eight))
    want = load_file(str(f))
    resized = sorted(n for n, _, _ in rec["resized"])
    assert resized == ["final.linear.bias", "final.linear.weight", "x_embed.weight"], rec
    for k in got:
        ref = fresh[k] if k in resized else want[k]
        assert torch.equal(got[k], ref), k
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
