"""VideoDiT: a Diffusion Transformer over packed spatiotemporal patch sequences.

Latent diffusion -> DiT -> Sora: a C x T x H x W video latent is cut into pt x ph x pw
patches (done by the data pipeline, see `models.packed.patchify`), embedded linearly,
given 3D rotary positions, and processed by DiT blocks with adaLN-Zero timestep
conditioning and cross-attention to text-encoder tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import CrossAttention, PackedAttentionKernel, SelfAttention, get_kernel
from models.embeddings import CaptionEmbedder, RoPE3D, TimestepEmbedder
from models.packed import PackedMeta


@dataclass
class DiTConfig:
    hidden: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 384
    qk_norm: bool = True
    rope_theta: float = 10000.0
    attn_backend: str = "sdpa"

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch[0] * self.patch[1] * self.patch[2]

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


def modulate(x_LD, shift_LD, scale_LD):
    return x_LD * (1 + scale_LD) + shift_LD


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))

    def init_weights(self):
        for m in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class DiTBlock(nn.Module):
    """Self-attention and MLP under adaLN-Zero modulation, cross-attention to text between."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, cfg.heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=True, eps=1e-6)
        self.cross = CrossAttention(D, cfg.heads, cfg.qk_norm)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, cfg.mlp_hidden)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x_LD, c_VD, rope, text_TD, meta: PackedMeta):
        # modulation once per video ([V+1, 6D], last row for padding), gathered per token
        mod = self.adaLN(c_VD)[meta.seg_ids]  # [L, 6D]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        x_LD = x_LD + gate_a * self.attn(modulate(self.norm1(x_LD), shift_a, scale_a), rope, meta)
        x_LD = x_LD + self.cross(self.norm2(x_LD), text_TD, meta)
        x_LD = x_LD + gate_m * self.mlp(modulate(self.norm3(x_LD), shift_m, scale_m))
        return x_LD

    def init_weights(self):
        self.attn.init_weights()
        self.cross.init_weights()
        self.mlp.init_weights()
        nn.init.ones_(self.norm2.weight)
        nn.init.zeros_(self.norm2.bias)
        # adaLN-Zero: gates (and shifts/scales) start at zero, so the block starts as identity
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, cfg.patch_dim)

    def forward(self, x_LD, c_VD, meta: PackedMeta):
        shift, scale = self.adaLN(c_VD)[meta.seg_ids].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_LD), shift, scale))  # [L, P]

    def init_weights(self):
        for m in (self.adaLN[1], self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


class VideoDiT(nn.Module):
    """Packed video DiT. forward(tokens [L, P], t [V], meta) -> prediction [L, P]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.x_embed = nn.Linear(cfg.patch_dim, D)  # == Conv3d(kernel=stride=patch) on patches
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = CaptionEmbedder(cfg.text_dim, D)
        self.rope = RoPE3D(D // cfg.heads, cfg.rope_theta)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(cfg)
        self.set_attention(get_kernel(cfg.attn_backend))

    def set_attention(self, kernel: PackedAttentionKernel) -> None:
        """Plug in the packed self-attention kernel (local, or sequence-parallel)."""
        for blk in self.blocks:
            # blocks may be wrapped (activation checkpointing); reach the attention module
            for m in blk.modules():
                if isinstance(m, SelfAttention):
                    m.kernel = kernel

    def forward(self, x_LP: torch.Tensor, t_V: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        x = self.x_embed(x_LP)  # [L, D]
        c = self.t_embed(t_V)  # [V, D]
        c = torch.cat([c, c.new_zeros(1, c.shape[1])], 0)  # [V+1, D]: row V for padding
        text = self.y_embed(meta.text.to(x.dtype))  # [Lt, D]
        rope = self.rope(meta.coords)  # ([L, Dh/2], [L, Dh/2])
        for blk in self.blocks:
            x = blk(x, c, rope, text, meta)
        return self.final(x, c, meta)  # [L, P]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (after meta-device construction or re-use)."""
        nn.init.xavier_uniform_(self.x_embed.weight)
        nn.init.zeros_(self.x_embed.bias)
        self.t_embed.init_weights()
        self.y_embed.init_weights()
        for blk in self.blocks:
            blk.init_weights()
        self.final.init_weights()
