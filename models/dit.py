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

from vidscale.models.attention import CrossAttention, PackedAttentionKernel, SelfAttention, get_kernel, local_pieces
from vidscale.models.embeddings import CaptionEmbedder, RoPE3D, TimestepEmbedder
from vidscale.models.fused import segment_gated_add
from vidscale.models.packed import PackedMeta


@dataclass
class DiTConfig:
    """The resolved architecture. No defaults but RoPE's base: a recipe's `model` section
    (scaling/config/model.py `ModelArgs`, with the size table of models/sizes.py) holds them, and
    `scaling.config.model_config` builds this from it."""
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float
    in_channels: int
    patch: tuple[int, int, int]
    text_dim: int
    qk_norm: bool
    attn_backend: str
    """A key of `models.attention.KERNELS`."""
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch[0] * self.patch[1] * self.patch[2]

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


def modulate(x_LD, shift_LD, scale_LD):
    return x_LD * (1 + scale_LD) + shift_LD


class Segments:
    """This rank's tokens as runs of one video each: per-video rows broadcast over their run.

    adaLN computes its modulation once per video ([V+1, k*D], row V for padding). Gathering
    it to every token materialises [L, 6D] per block and its backward is a scatter-add;
    broadcasting each video's row over its own contiguous run of tokens does the same
    arithmetic without either (measured ~10% of a CPU step on the 30M model). On CUDA,
    where a Python loop over videos costs kernel launches, the gather is kept.
    """

    def __init__(self, meta: PackedMeta, L: int, device: torch.device, gather: bool | None = None):
        pieces, _ = local_pieces(meta, L)
        self.sizes = [e - s for s, e, _ in pieces]
        self.rows = [meta.num_videos if b is None else b for _, _, b in pieces]
        self.pieces = [(s, e, r) for (s, e, _), r in zip(pieces, self.rows)]
        self.gather = device.type != "cpu" if gather is None else gather
        self.seg_ids = meta.seg_ids

    def norm_modulate(self, x_LD, shift_VD, scale_VD, eps: float):
        """modulate(LayerNorm(x), shift, scale): one fused layer_norm per run (scale, shift as affine)."""
        D = x_LD.shape[-1]
        if self.gather:
            h = torch.nn.functional.layer_norm(x_LD, (D,), eps=eps)
            return modulate(h, shift_VD[self.seg_ids], scale_VD[self.seg_ids])
        w, b = (1 + scale_VD).unbind(0), shift_VD.unbind(0)
        # (an out= form per run measured no faster: layer_norm's out= variant computes, then copies)
        outs = [torch.nn.functional.layer_norm(xs, (D,), w[r], b[r], eps)
                for xs, (_, _, r) in zip(x_LD.split(self.sizes), self.pieces)]
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

    def gated_add(self, x_LD, gate_VD, y_LD):
        """x + gate * y with the gate of each token's video."""
        if self.gather:
            return torch.addcmul(x_LD, gate_VD[self.seg_ids], y_LD)
        return segment_gated_add(x_LD, gate_VD.to(x_LD.dtype), y_LD.to(x_LD.dtype), self.pieces)


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

    def forward(self, x_LD, c_VD, rope, text_TD, meta: PackedMeta, segs: Segments | None = None):
        segs = segs or Segments(meta, x_LD.shape[0], x_LD.device)
        # modulation once per video ([V+1, 6D], last row for padding), broadcast over its tokens
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c_VD).chunk(6, dim=-1)  # [V+1, D]
        h = segs.norm_modulate(x_LD, shift_a, scale_a, self.norm1.eps)
        x_LD = segs.gated_add(x_LD, gate_a, self.attn(h, rope, meta))
        x_LD = x_LD + self.cross(self.norm2(x_LD), text_TD, meta)
        h = segs.norm_modulate(x_LD, shift_m, scale_m, self.norm3.eps)
        return segs.gated_add(x_LD, gate_m, self.mlp(h))

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

    def forward(self, x_LD, c_VD, meta: PackedMeta, segs: Segments | None = None):
        segs = segs or Segments(meta, x_LD.shape[0], x_LD.device)
        shift, scale = self.adaLN(c_VD).chunk(2, dim=-1)  # [V+1, D]
        return self.linear(segs.norm_modulate(x_LD, shift, scale, self.norm.eps))  # [L, P]

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
        self.gather_modulation: bool | None = None
        """adaLN rows to tokens: None picks by device (broadcast per video on CPU, gather on GPU)."""

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
        segs = Segments(meta, x.shape[0], x.device, self.gather_modulation)  # host-side, once per forward
        for blk in self.blocks:
            x = blk(x, c, rope, text, meta, segs)
        return self.final(x, c, meta, segs)  # [L, P]

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
