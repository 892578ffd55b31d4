"""`vidscale bench wan`: VideoDiT against diffusers' WanTransformer3DModel at equal shape.

    vidscale bench wan --json [--set model.size=1B --set train.tokens_per_batch=32768 --set train.device=cuda]

Both models get the same width (Wan: heads x head_dim), depth, heads, MLP width (Wan's ffn_dim),
patch (1, 2, 2), latent channels and text width, and the same video: one latent of
T x H x W whose patches are `train.tokens_per_batch` tokens, with a caption of
`data.text_tokens[1]` tokens. Each timed repetition runs forward + backward of a mean-square loss
under the recipe's autocast, the two models alternating in one process (both see the same
machine load); each figure is the best repetition. Keys: vidscale_tokens_per_s, wan_tokens_per_s,
speedup (vidscale / wan), params of each, the shape, device and machine.
"""
from __future__ import annotations

import time

import torch

from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.models.sizes import param_count
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.parallel.dims import pick_device
from vidscale.scaling.parallel.parallelize import build_model
from vidscale.scaling.train.precision import autocast_for

DEFAULTS = ["model.size=30M", "model.in_channels=16", "train.tokens_per_batch=4096", "train.dtype=fp32"]
QUICK = {"reps": 1}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET = ["model.size=debug", "train.tokens_per_batch=256"]
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--reps", type=int, default=5, help="timed forward+backward pairs (default 5)")


def _video_shape(tokens: int, patch) -> tuple[int, int, int]:
    """(T, H, W) of a latent whose patches number `tokens`: H = W as square as the count allows."""
    pt, ph, pw = patch
    side = 1
    while side < 32 and (side * 2) ** 2 <= tokens and tokens % ((side * 2) ** 2) == 0:  # video-like: <= 32 x 32
        side *= 2
    return (tokens // side ** 2) * pt, side * ph, side * pw


def _timed(fn, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run(args) -> dict:
    from diffusers import WanTransformer3DModel  # optional: the [vae] extra

    cfg = load_config(None, DEFAULTS + list(args.overrides))
    device = pick_device(cfg.train.device)
    mcfg = model_config(cfg.model)
    T, H, W = _video_shape(cfg.train.tokens_per_batch, mcfg.patch)
    C, Lt = mcfg.in_channels, cfg.data.text_tokens[1]
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(C, T, H, W, generator=g)
    text = torch.randn(Lt, mcfg.text_dim, generator=g)

    ours = build_model(lambda: VideoDiT(mcfg), device, 0)
    tokens, meta = pack([latent], [text], mcfg.patch)
    tokens, meta = tokens.to(device), meta.to(device)
    t_ours = torch.tensor([500.0], device=device)
    wan = WanTransformer3DModel(patch_size=tuple(mcfg.patch), num_attention_heads=mcfg.heads,
                                attention_head_dim=mcfg.hidden // mcfg.heads, in_channels=C, out_channels=C,
                                text_dim=mcfg.text_dim, ffn_dim=mcfg.mlp_hidden, num_layers=mcfg.depth,
                                rope_max_seq_len=max(1024, T, H, W)).to(device)
    x_wan = latent[None].to(device)
    text_wan = text[None].to(device)
    t_wan = torch.tensor([500], device=device)

    def step_ours():
        with autocast_for(cfg.train.dtype, device):
            out = ours(tokens, t_ours, meta)
        out.float().pow(2).mean().backward()

    def step_wan():
        with autocast_for(cfg.train.dtype, device):
            out = wan(x_wan, t_wan, text_wan, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    for f in (step_ours, step_wan):  # warm up (kernels, allocator)
        f()
    best_ours = best_wan = float("inf")
    for _ in range(args.reps):
        best_ours = min(best_ours, _timed(step_ours, device))
        best_wan = min(best_wan, _timed(step_wan, device))
    L = tokens.shape[0]
    return {"vidscale_tokens_per_s": L / best_ours, "wan_tokens_per_s": L / best_wan, "speedup": best_wan / best_ours,
            "goal_speedup": 1.2, "tokens": L, "video_THW": [T, H, W], "hidden": mcfg.hidden, "depth": mcfg.depth,
            "heads": mcfg.heads, "mlp_hidden": mcfg.mlp_hidden, "params_vidscale": param_count(mcfg),
            "params_wan": sum(p.numel() for p in wan.parameters()), "dtype": cfg.train.dtype,
            "attn_backend": cfg.model.attn_backend, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "reps": args.reps}
