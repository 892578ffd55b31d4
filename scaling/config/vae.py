"""The `vae` section (what a `task: vae` recipe trains)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VAEArgs:
    """The video VAE that a `task: vae` recipe trains (models/vae.py)."""
    base: int = 64
    """Channels of the first level."""
    z_dim: int = 4
    """Latent channels (what the DiT's model.in_channels must then be)."""
    mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Channel multiplier per level; len - 1 spatial x2 downsamplings (x8)."""
    temporal_down: list[bool] = field(default_factory=lambda: [False, True, True])
    """Which downsamplings also halve time (two: x4)."""
    num_res: int = 1
    beta: float = 1.0e-6
    """Weight of the KL term (per element, like the reconstruction MSE)."""
    crop: list[int] = field(default_factory=lambda: [64, 64])
    """Random [H, W] crop of each training clip ([0, 0] = whole frames)."""
    frames: int = 17
    """Frames of each synthetic clip (data.source=synthetic)."""
    val_clips: int = 4
    """Held-out clips for the reconstruction PSNR in the logs."""
