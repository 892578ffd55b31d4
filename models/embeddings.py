"""Embeddings: timesteps, patches, captions and 3D rotary positions over (t, y, x)."""
from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the diffusion timestep followed by an MLP (as in DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoid(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device,
                                                               dtype=torch.float32) / half)
        args = t_B.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t_B, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)  # [B, D]

    def init_weights(self) -> None:
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)


class CaptionEmbedder(nn.Module):
    """Projects text-encoder tokens to the model width (PixArt-style caption projection)."""

    def __init__(self, text_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, text_TD: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(text_TD), approximate="tanh"))

    def init_weights(self) -> None:
        for m in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class RoPE3D(nn.Module):
    """Rotary positions split over the head dimension as (t, y, x) thirds.

    Rotary angles depend only on integer patch coordinates, so any resolution and any
    duration get positions (and longer or larger videos than seen in training extrapolate
    the way RoPE does). Returns (cos, sin) of shape [L, head_dim // 2].
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim {head_dim} must be even for rotary positions")
        half = head_dim // 2
        # pairs per axis: y and x get equal shares, t takes the remainder
        ny = nx = half // 3
        nt = half - ny - nx
        self.split = (nt, ny, nx)
        self.theta = theta

    def _freqs(self, n: int, device) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(n, device=device, dtype=torch.float32) / max(n, 1)))

    def forward(self, coords_L3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = [coords_L3[:, i:i + 1].float() * self._freqs(n, coords_L3.device)[None]
                  for i, n in enumerate(self.split)]
        ang = torch.cat(angles, dim=-1)  # [L, head_dim/2]
        return ang.cos(), ang.sin()


def apply_rope(x_LHD: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) of the head dim by the per-token angles.

    As one complex multiply: (x0 + i x1)(cos + i sin). Measured on CPU ~5x faster forward and
    backward than the select/stack form (whose backward zero-fills the full tensor per select).
    """
    dt = torch.promote_types(x_LHD.dtype, torch.float32)  # bf16 rotates in fp32
    if torch.compiler.is_compiling():  # inductor fuses the real form; it does not lower complex
        x = x_LHD.to(dt).unflatten(-1, (-1, 2))
        x0, x1, c, s = x[..., 0], x[..., 1], cos_LK.to(dt)[:, None], sin_LK.to(dt)[:, None]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x_LHD.dtype)
    x = torch.view_as_complex(x_LHD.to(dt).unflatten(-1, (-1, 2)))  # [L, H, D/2]
    rot = torch.complex(cos_LK.to(dt), sin_LK.to(dt))[:, None]  # [L, 1, D/2]
    return torch.view_as_real(x * rot).flatten(-2).to(x_LHD.dtype)
