"""Packing efficiency on a mixed-resolution, mixed-duration video distribution.

Videos: 144p, 240p, 360p, 480p, 720p (30% portrait), 1..8 latent frames, through an 8x
spatial VAE and 1x2x2 patches (144 .. 28800 tokens). Three ways to fill micro-batches of a
fixed token budget, same videos, same order:
  ours     NaViT packing (data/packing.py): real tokens / (bins x budget)
  pad      batches padded to their longest video, as many videos as fit the budget:
           real tokens / sum(videos x longest) (only the padded tokens are paid for)
  bucket   resolution x frames buckets, each batch holds videos of one bucket (as many as
           fit the budget): real tokens / (batches x budget)
"""
from __future__ import annotations

import random
import time
from collections import defaultdict

from vidscale.data.packing import Item, pack_all

RESOLUTIONS = [(144, 256), (240, 432), (368, 640), (480, 848), (720, 1280)]  # (H, W), multiples of 16


def video_distribution(n: int, seed: int = 0, vae: int = 8, patch: int = 2, max_frames: int = 8):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        H, W = rng.choice(RESOLUTIONS)
        if rng.random() < 0.3:
            H, W = W, H
        T = rng.randint(1, max_frames)
        out.append(((T, H, W), T * (H // (vae * patch)) * (W // (vae * patch))))
    return out


def pad_efficiency(tokens: list[int], budget: int) -> float:
    paid, batch_max, count = 0, 0, 0
    for t in tokens:
        m = max(batch_max, t)
        if count and (count + 1) * m > budget:
            paid += count * batch_max
            batch_max, count = 0, 0
            m = t
        batch_max, count = m, count + 1
    paid += count * batch_max
    return sum(tokens) / paid


def bucket_efficiency(videos, budget: int) -> float:
    buckets: dict = defaultdict(list)
    for shape, t in videos:
        buckets[shape].append(t)
    batches = 0
    for shape, ts in buckets.items():
        per = max(1, budget // ts[0])
        batches += -(-len(ts) // per)
    return sum(t for _, t in videos) / (batches * budget)


QUICK = {"videos": 200}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET: list[str] = []
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--videos", type=int, default=4000, help="videos in the distribution (default 4000)")
    p.add_argument("--budget", type=int, default=32768, help="token budget per micro-batch (default 32768)")
    p.add_argument("--lookahead", type=int, default=64, help="packer lookahead (default 64)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    videos = video_distribution(args.videos, args.seed)
    tokens = [t for _, t in videos]
    t0 = time.perf_counter()
    bins = list(pack_all([Item(i, t) for i, t in enumerate(tokens)], args.budget, args.lookahead))
    dt = time.perf_counter() - t0
    assert max(b.used for b in bins) <= args.budget
    eff = sum(tokens) / (len(bins) * args.budget)
    pad, bucket = pad_efficiency(tokens, args.budget), bucket_efficiency(videos, args.budget)
    return {"efficiency": eff, "pad_efficiency": pad, "bucket_efficiency": bucket,
            "efficiency_full_bins": sum(b.used for b in bins[:-1]) / (max(len(bins) - 1, 1) * args.budget),
            "bins": len(bins), "videos": len(videos), "budget": args.budget, "lookahead": args.lookahead,
            "tokens_min": min(tokens), "tokens_max": max(tokens), "pack_videos_per_s": len(videos) / dt,
            "goal_efficiency": 0.99, "goal_met": eff >= 0.99}
