"""Loader throughput from real shards vs what the training step consumes.

Writes captioned shape videos with PyAV, prepares them into shards (`vidscale prepare`
with the pixel encoder and MiniLM), then measures in one run:
  loader_batches_per_s   packed batches per second out of the loader (reading the tars,
                         decoding the samples, packing), averaged over several epochs
  step_batches_per_s     micro-batches per second the training step consumes (the debug
                         recipe's model on the same shards, after one warm-up step)
Goal: loader >= 5x the step (`loader_speedup`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vidscale.data.loader import build_loader
from vidscale.data.prepare import prepare
from vidscale.data.shapes import make_videos
from vidscale.scaling.config import load_config
from vidscale.scaling.train.loop import Trainer


QUICK = {"videos": 4, "batches": 5, "steps": 1}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET = ["train.tokens_per_batch=256"]
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--recipe", default="recipes/debug.yaml", help="recipe of the training step")
    p.add_argument("--videos", type=int, default=32, help="videos to prepare (default 32)")
    p.add_argument("--batches", type=int, default=200, help="loader batches to time (default 200)")
    p.add_argument("--steps", type=int, default=5, help="training steps to time (default 5)")
    p.add_argument("--workers", type=int, default=-1, help="loader workers (default: the recipe's data.workers)")


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="vidscale-bench-loader-") as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", args.videos, seed=0)
        t0 = time.perf_counter()
        pcfg = load_config(args.recipe, args.overrides)
        index = prepare(tmp / "videos", tmp / "shards", pcfg.data, channels=pcfg.model.in_channels,
                        patch=pcfg.model.patch, progress=False)
        prep_s = time.perf_counter() - t0
        over = list(args.overrides) + [f"data.source={tmp / 'shards'}", f"train.run_dir={tmp / 'run'}",
                                       "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]
        if args.workers >= 0:
            over.append(f"data.workers={args.workers}")
        cfg = load_config(args.recipe, over)

        loader = build_loader(cfg.data, seed=cfg.train.seed, tokens_per_batch=cfg.train.tokens_per_batch,
                              patch=cfg.model.patch, channels=cfg.model.in_channels, text_dim=cfg.model.text_dim)
        next(loader)  # workers started, first plan made
        t0 = time.perf_counter()
        videos = 0
        for _ in range(args.batches):
            _, meta = next(loader)
            videos += meta.num_videos
        loader_bps = args.batches / (time.perf_counter() - t0)

        tr = Trainer(cfg)
        tr.train_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step()
        step_bps = args.steps * cfg.train.grad_accum / (time.perf_counter() - t0)
        tr.dims.destroy()
    return {"loader_batches_per_s": loader_bps, "step_batches_per_s": step_bps,
            "loader_speedup": loader_bps / step_bps, "goal_speedup": 5.0, "goal_met": loader_bps >= 5 * step_bps,
            "videos_per_batch": videos / args.batches, "packing_efficiency": loader.efficiency,
            "samples": index["samples"], "shards": len(index["shards"]), "prepare_s": prep_s,
            "workers": cfg.data.workers, "tokens_per_batch": cfg.train.tokens_per_batch, "model": cfg.model.size}
