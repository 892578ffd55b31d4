"""The deterministic validation loss a sweep fits: a fixed held-out set, fixed timesteps and
noise, the same number on every batch grouping (one process; tests/dist checks the layouts)."""
from dataclasses import replace

import pytest
import torch

from vidscale.models.diffusion import make_objective
from vidscale.data.shards import ShardSource, read_index
from vidscale.scaling.train.evaluate import VAL_OFFSET, evaluate, split_by_weight, validation_batches, validation_videos
from vidscale.scaling.train.loop import Trainer
from vidscale.scaling.train.samples import TrainingSamples

from conftest import debug_config, write_shards  # noqa: E402


def _cfg(*over):
    return debug_config("train.val_videos=5", *over)


def test_validation_set_is_held_out_and_fixed():
    obj = make_objective("flow")
    a = validation_batches(_cfg("train.seed=0", "train.tokens_per_batch=4096"), obj, multiple=1)
    b = validation_batches(_cfg("train.seed=7", "train.tokens_per_batch=128"), obj, multiple=2)
    assert len(a) == 1 and len(b) > 1  # grouped differently ...

    def per_video(batches):
        out = []
        for tokens, meta, t_V, noise in batches:
            for v in range(meta.num_videos):
                s, e = meta.bounds[v], meta.bounds[v + 1]
                out.append((tokens[s:e], noise[s:e], float(t_V[v])))
        return out
    va, vb = per_video(a), per_video(b)
    assert len(va) == len(vb) == 5
    for (x1, n1, t1), (x2, n2, t2) in zip(va, vb):  # ... but the same videos, timesteps and noise
        assert torch.equal(x1, x2) and torch.equal(n1, n2) and t1 == t2
    # held out: no index of a training epoch (0 .. synthetic_videos - 1) reaches VAL_OFFSET
    assert _cfg().data.synthetic_videos < VAL_OFFSET


def test_val_loss_does_not_depend_on_grouping(tmp_path):
    tr = Trainer(_cfg("parallel.zero_stage=0", f"train.run_dir={tmp_path / 'run'}"))
    with torch.no_grad():  # adaLN-Zero starts at a zero output: give the model a real one
        for p in tr.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    losses = []

    def score(cfg):
        return evaluate(tr.model, tr.task.objective, cfg, tr.dims, tr.device)
    for tpb in (96, 512, 4096):
        cfg = replace(tr.cfg, train=replace(tr.cfg.train, tokens_per_batch=tpb))
        losses.append(score(cfg))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[1] == pytest.approx(losses[2], rel=1e-5)
    assert score(cfg) == losses[-1]  # deterministic
    assert 0.1 < losses[0] < 10


def test_a_mixture_is_scored_on_its_own_sources_by_weight(tmp_path):
    """data.sources: the held-out videos are its sources' samples (never synthetic ones),
    val_videos split by weight: 5 videos over weights 1:3 -> 1 from a, 4 from b."""
    a, b = write_shards(tmp_path / "a", n=12, seed=1), write_shards(tmp_path / "b", n=9, seed=2)
    mix = _cfg(f"data.sources=[{{path: '{a}', weight: 1}}, {{path: '{b}', weight: 3}}]")
    got = validation_videos(mix)
    want = (validation_videos(_cfg(f"data.source={a}", "train.val_videos=1"))
            + validation_videos(_cfg(f"data.source={b}", "train.val_videos=4")))
    assert len(got) == len(want) == 5
    assert all(torch.equal(x, y) and torch.equal(tx, ty) for (x, tx), (y, ty) in zip(got, want))
    for (lat, text), src in zip(got, [a] + [b] * 4):  # each one is a sample of its own shards
        shards = ShardSource(src, seed=0, patch=(1, 2, 2))
        assert any(torch.equal(lat, s[0].float()) and torch.equal(text, s[1].float())
                   for _, s, _ in shards.stream(list(range(len(shards)))))
    first = read_index(a)["shards"][0]["shapes"][0]  # training samples take the first source's shape
    assert TrainingSamples(mix, None, torch.device("cpu"))._latent_shape() == (4, *first)


def test_split_by_weight_gives_every_source_one_and_sums_to_n():
    assert split_by_weight(5, [1, 3]) == [1, 4] and split_by_weight(7, [1.0]) == [7]
    assert split_by_weight(5, [1, 1, 1]) == [2, 2, 1] and split_by_weight(4, [100, 1, 1]) == [2, 1, 1]
    assert split_by_weight(1, [1, 1]) == [1, 1]  # fewer videos than sources: one each
