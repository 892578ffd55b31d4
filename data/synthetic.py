"""Synthetic latents with learnable structure, for runs before real shards exist.

Each video is a few drifting sinusoidal blobs whose frequencies, phases and velocities
come from its seed; its "caption" is a fixed random projection of those parameters, so
text conditioning carries real information and the loss can fall well below the prior.
"""
from __future__ import annotations

import math

import torch


def synthetic_video(index: int, seed: int, channels: int, frames: list[int], sizes: list[list[int]],
                    text_tokens: list[int], text_dim: int, patch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    pt = patch[0]
    lo, hi = frames[0] // pt, frames[1] // pt
    T = int(torch.randint(lo, hi + 1, (1,), generator=g)) * pt
    H, W = sizes[int(torch.randint(0, len(sizes), (1,), generator=g))]
    params = torch.rand(channels, 4, generator=g)  # freq_y, freq_x, phase, velocity
    t = torch.arange(T).float()[:, None, None]
    y = torch.arange(H).float()[None, :, None] / H
    x = torch.arange(W).float()[None, None, :] / W
    lat = torch.stack([
        torch.sin(2 * math.pi * (1 + 2 * p[0]) * y + 2 * math.pi * p[2] + 0.5 * p[3] * t)
        * torch.cos(2 * math.pi * (1 + 2 * p[1]) * (x - 0.1 * p[3] * t))
        for p in params])  # C x T x H x W, unit-ish scale
    n_text = int(torch.randint(text_tokens[0], text_tokens[1] + 1, (1,), generator=g))
    proj = torch.Generator().manual_seed(12345)  # the same "text encoder" for every video
    W_proj = torch.randn(channels * 4, text_dim, generator=proj) / math.sqrt(channels * 4)
    text = (params.flatten() @ W_proj)[None].repeat(n_text, 1)
    text = text + 0.1 * torch.randn(n_text, text_dim, generator=g)
    return lat, text
