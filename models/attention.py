"""Attention over packed sequences.

A *packed attention kernel* maps q, k, v of shape [L, H, Dh] plus `PackedMeta` to an
output [L, H, Dh] in which no token attends across a video boundary. The local kernels
here see the whole sequence. Sequence-parallel kernels (in `scaling/sequence_parallel.py`)
wrap a local kernel and are handed to the model by `VideoDiT.set_attention`; the model
never knows how the sequence is distributed.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.embeddings import apply_rope
from models.packed import PackedMeta


class PackedAttentionKernel(Protocol):
    def __call__(self, q_LHD: torch.Tensor, k_LHD: torch.Tensor, v_LHD: torch.Tensor,
                 meta: PackedMeta) -> torch.Tensor: ...


def sdpa_loop(q_LHD, k_LHD, v_LHD, meta: PackedMeta):
    """SDPA once per video segment: no mask, no wasted FLOPs (fastest on CPU, measured)."""
    outs = []
    for s, e in meta.segments():
        q, k, v = (t[s:e].transpose(0, 1) for t in (q_LHD, k_LHD, v_LHD))  # [H, l, Dh]
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1))
    return torch.cat(outs, 0)


def sdpa_dense(q_LHD, k_LHD, v_LHD, meta: PackedMeta):
    """Reference: one SDPA with a block-diagonal mask. Quadratic in the packed length."""
    seg = torch.repeat_interleave(
        torch.arange(len(meta.segments()), device=q_LHD.device),
        torch.tensor([e - s for s, e in meta.segments()], device=q_LHD.device))
    mask = seg[:, None] == seg[None, :]
    q, k, v = (t.transpose(0, 1) for t in (q_LHD, k_LHD, v_LHD))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


def varlen(q_LHD, k_LHD, v_LHD, meta: PackedMeta):
    """Variable-length (flash) attention on GPU: one kernel over the whole pack."""
    cu = meta.cu_seqlens(q_LHD.device)
    max_len = max(e - s for s, e in meta.segments())
    try:
        from flash_attn import flash_attn_varlen_func  # optional, GPU only
        return flash_attn_varlen_func(q_LHD, k_LHD, v_LHD, cu, cu, max_len, max_len)
    except ImportError:
        pass
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q_LHD, k_LHD, v_LHD, cu, cu, max_len, max_len)


KERNELS = {"sdpa": sdpa_loop, "dense": sdpa_dense, "varlen": varlen}


def get_kernel(name: str) -> PackedAttentionKernel:
    if name not in KERNELS:
        raise ValueError(f"model.attn_backend: unknown backend {name!r}, expected one of {sorted(KERNELS)}")
    if name == "varlen" and not torch.cuda.is_available():
        raise ValueError("model.attn_backend=varlen needs a CUDA GPU (flash/varlen kernels); "
                         "use 'sdpa' on CPU")
    return KERNELS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def init_weights(self):
        nn.init.ones_(self.weight)


class SelfAttention(nn.Module):
    """Packed multi-head self-attention: fused QKV, QK-RMSNorm, 3D RoPE, pluggable kernel."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.kernel: PackedAttentionKernel = sdpa_loop

    def forward(self, x_LD, rope, meta: PackedMeta):
        L = x_LD.shape[0]
        q, k, v = self.qkv(x_LD).view(L, 3, self.heads, self.head_dim).unbind(1)  # [L, H, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.kernel(q, k, v, meta)  # [L, H, Dh]
        return self.proj(out.reshape(L, -1))

    def init_weights(self):
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        for n in (self.q_norm, self.k_norm):
            if isinstance(n, RMSNorm):
                n.init_weights()


class CrossAttention(nn.Module):
    """Each video token attends to its own video's text tokens (never another video's).

    The loop runs over the videos present in this rank's contiguous slice; it uses only
    host-side boundaries, so it works unchanged under sequence parallelism.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_LD, text_TD, meta: PackedMeta):
        L = x_LD.shape[0]
        q = self.q_norm(self.q(x_LD).view(L, self.heads, self.head_dim))
        k, v = self.kv(text_TD).view(-1, 2, self.heads, self.head_dim).unbind(1)
        k = self.k_norm(k)
        out = q.new_zeros(L, self.heads, self.head_dim)
        lo, hi = meta.offset, meta.offset + L
        for b in range(meta.num_videos):
            s, e = max(meta.bounds[b], lo), min(meta.bounds[b + 1], hi)
            ts, te = meta.text_bounds[b], meta.text_bounds[b + 1]
            if e <= s or te <= ts:  # not on this rank, or an empty (dropped) caption
                continue
            o = F.scaled_dot_product_attention(q[s - lo:e - lo].transpose(0, 1),
                                               k[ts:te].transpose(0, 1), v[ts:te].transpose(0, 1))
            out[s - lo:e - lo] = o.transpose(0, 1)
        return self.proj(out.reshape(L, -1))

    def init_weights(self):
        for m in (self.q, self.kv):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        # zero output: with adaLN-Zero gates this makes a fresh block the identity
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        for n in (self.q_norm, self.k_norm):
            if isinstance(n, RMSNorm):
                n.init_weights()
