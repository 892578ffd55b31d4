"""Deterministic validation loss: the number a scaling-law sweep fits.

Every run of a sweep is scored on the same held-out videos with the same timesteps and the
same noise, so losses compare like for like across model sizes, seeds, batch sizes and
parallel layouts:
  * videos: synthetic data uses indices the training epoch never draws (>= 10^9) under a
    fixed seed, so the set does not depend on `train.seed`; prepared shards use a fixed,
    evenly spaced subset of the index (independent of the epoch order); a mixture
    (`data.sources`) takes that from each source, `train.val_videos` split by weight
    (`split_by_weight`: largest remainders, at least one video from every source);
  * timesteps and noise are drawn per video from a generator keyed by the video's position
    in the set, never by its batch, rank or step;
  * the videos are packed in a fixed order into batches of at most `train.tokens_per_batch`
    real tokens; attention never crosses videos, so the grouping does not change a loss;
  * batches go round robin over data-parallel ranks, each sequence-parallel rank scores its
    slice, and one all-reduce over the world sums token losses. Every rank runs the same
    number of forwards (ZeRO-3 gathers parameters collectively): a rank with no batch left
    scores batch 0 with weight 0.
The loss is the mean over every real token of the set, with the weights the run trained
(not the EMA), in the run's dtype.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from vidscale.data.args import shard_sets
from vidscale.data.shards import ShardSource
from vidscale.data.synthetic import synthetic_video
from vidscale.models.packed import pack
from vidscale.scaling.checkpoint.storage import replace_durably
from vidscale.scaling.parallel import collectives

VAL_SEED = 2_718_281
VAL_OFFSET = 10 ** 9  # synthetic indices from here on are never in a training epoch


def validation_videos(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out (latent C x T x H x W, text [Lt, Dt]) pairs of a recipe's data."""
    n = cfg.train.val_videos
    if n < 1:
        raise ValueError(f"train.val_videos = {n}: expected a positive number of validation videos")
    d = cfg.data
    sets = shard_sets(d)  # data.sources, or the one data.source; none for synthetic data
    if not sets:
        c = cfg
        return [synthetic_video(VAL_OFFSET + i, VAL_SEED, c.model.in_channels, c.data.frames, c.data.sizes,
                                c.data.text_tokens, c.model.text_dim, c.model.patch) for i in range(n)]
    out = []
    for (path, key, _, _), k in zip(sets, split_by_weight(n, [w for _, _, w, _ in sets])):
        src = ShardSource(path, seed=cfg.train.seed, patch=cfg.model.patch, channels=cfg.model.in_channels,
                          text_dim=cfg.model.text_dim, tokens_per_batch=cfg.train.tokens_per_batch,
                          drop_tokens=d.drop_tokens, drop_min_tokens=d.drop_min_tokens, key=key)
        ids = sorted({j * len(src) // k for j in range(min(k, len(src)))})
        got = [(s[0].float(), s[1].float()) for _, s, _ in src.stream(ids) if s is not None]
        if not got:
            raise ValueError(f"{key}={path}: no readable validation sample among ids {ids[:8]}")
        out += got
    return out


def split_by_weight(n: int, weights: list[float]) -> list[int]:
    """n videos over sources by weight: the largest remainders of n * w / sum(w), at least one
    each (then the total is the number of sources if that is more than n); one source: [n]."""
    quota = [n * w / sum(weights) for w in weights]
    k = [max(1, math.floor(q)) for q in quota]
    while sum(k) < n:  # the furthest below its quota first; ties to the first source
        k[max(range(len(k)), key=lambda i: (quota[i] - k[i], -i))] += 1
    while sum(k) > n and max(k) > 1:  # a source raised to one took a video from the furthest above
        k[min((i for i in range(len(k)) if k[i] > 1), key=lambda i: (quota[i] - k[i], i))] -= 1
    return k


def validation_batches(cfg, objective, multiple: int):
    """[(tokens [L, P], meta, t [V], noise [L, P])] in a fixed order, padded to `multiple`."""
    videos = validation_videos(cfg)
    patch = tuple(cfg.model.patch)
    pt, ph, pw = patch
    groups, cur, cur_tokens = [], [], 0
    for j, (lat, _) in enumerate(videos):
        n = (lat.shape[1] // pt) * (lat.shape[2] // ph) * (lat.shape[3] // pw)
        if cur and cur_tokens + n > cfg.train.tokens_per_batch:
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(j)
        cur_tokens += n
    groups.append(cur)
    batches = []
    for g in groups:
        tokens, meta = pack([videos[j][0] for j in g], [videos[j][1] for j in g], patch, multiple=multiple)
        t_V, noise = [], []
        for j in g:
            gen = torch.Generator().manual_seed(VAL_SEED * 1_000_003 + j)
            n = meta.bounds[len(t_V) + 1] - meta.bounds[len(t_V)]
            t_V.append(objective.sample_t(1, gen, num_tokens=torch.tensor([n])))
            noise.append(torch.randn((n, tokens.shape[1]), generator=gen, dtype=tokens.dtype))
        pad = tokens.new_zeros((meta.seq_len - meta.num_real, tokens.shape[1]))
        batches.append((tokens, meta, torch.cat(t_V), torch.cat(noise + [pad])))
    return batches


@torch.no_grad()
def evaluate(model, objective, cfg, dims, device: torch.device, autocast=None) -> float:
    """Mean validation loss per real token; every rank of the world must call it.
    `model` is what the loop calls (the engine's module); `autocast` the forward's context."""
    batches = validation_batches(cfg, objective, multiple=dims.sp)
    rounds = math.ceil(len(batches) / dims.dp)
    total = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for r in range(rounds):
        b = r * dims.dp + dims.dp_rank
        weight = 1.0 if b < len(batches) else 0.0
        tokens_LP, meta, t_V, noise = batches[b if weight else 0]
        if dims.sp > 1:
            n = meta.seq_len // dims.sp
            sl = slice(dims.sp_rank * n, (dims.sp_rank + 1) * n)
            tokens_LP, noise, meta = tokens_LP[sl], noise[sl], meta.shard(dims.sp_rank, dims.sp)
        meta = meta.to(device)
        x0, noise, t_V = tokens_LP.to(device), noise.to(device), t_V.to(device)

        def model_fn(x_t, t_model):
            return model(x_t, t_model, meta)

        with autocast if autocast is not None else contextlib.nullcontext():
            terms = objective.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids)
        total += weight * (terms.double() * meta.real_mask()).sum().cpu()
    total = collectives.sum_(total)  # sp slices and dp batches: each real token exactly once
    model.train(was_training)
    return total / sum(m.num_real for _, m, _, _ in batches)


def write_final(run_dir: Path, final: dict) -> None:
    """RUN_DIR/final.json, atomically: a sweep reads its existence as "done" (rank 0 only)."""
    tmp = Path(run_dir) / "final.json.tmp"
    tmp.write_text(json.dumps(final, indent=1))
    replace_durably(tmp, Path(run_dir) / "final.json")
