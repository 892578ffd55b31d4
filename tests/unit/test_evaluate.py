"""The deterministic validation loss a sweep fits: a fixed held-out set, fixed timesteps and
noise, the same number on every batch grouping (one process; tests/dist checks the layouts)."""
from dataclasses import replace

import pytest
import torch

from vidscale.models.diffusion import make_objective
from vidscale.scaling.train.evaluate import VAL_OFFSET, evaluate, validation_batches
from vidscale.scaling.train.loop import Trainer

from conftest import debug_config  # noqa: E402


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
