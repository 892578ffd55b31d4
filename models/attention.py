"""Attention over packed sequences.

A *packed attention kernel* maps q, k, v of shape [L, H, Dh] plus `PackedMeta` to an
output [L, H, Dh] in which no token attends across a video boundary. The local kernels
here see the whole sequence. Sequence-parallel kernels (in `scaling/parallel/sequence.py`)
wrap a local kernel and are handed to the model by `VideoDiT.set_attention`; the model
never knows how the sequence is distributed.
"""
from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vidscale.models.embeddings import apply_rope
from vidscale.models.fused import rms_norm
from vidscale.models.packed import PackedMeta


class PackedAttentionKernel(Protocol):
    def __call__(self, q_LHD: torch.Tensor, k_LHD: torch.Tensor, v_LHD: torch.Tensor,
                 meta: PackedMeta) -> torch.Tensor: ...


def equal_runs(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Group consecutive segments of equal length: [(count, length)] covering them in order.

    The packer emits bins largest video first, so equal-sized videos sit side by side and
    one batched SDPA call covers a whole run."""
    runs: list[tuple[int, int]] = []
    for s, e in segments:
        if runs and runs[-1][1] == e - s:
            runs[-1] = (runs[-1][0] + 1, e - s)
        else:
            runs.append((1, e - s))
    return runs


def sdpa_loop(q_LHD, k_LHD, v_LHD, meta: PackedMeta):
    """SDPA per video segment: no mask, no wasted FLOPs (fastest on CPU, measured).

    Why it is shaped this way (each measured on the 30M model, 4k tokens, CPU):
    - `split` rather than slicing: the backward of a slice allocates a zeroed tensor of the
      whole sequence per segment (quadratic in the number of videos); split's backward is
      one cat.
    - 4-D [B, H, l, Dh] inputs: only those reach the fused flash kernel on CPU; 3-D ones fall
      back to the unfused math path (bmm + softmax + masks).
    - one call per run of equal-length segments (batched over the run).
    """
    L, H, Dh = q_LHD.shape
    runs = equal_runs(meta.segments())
    sizes = [n * l for n, l in runs]
    assert sum(sizes) == L, f"segments cover {sum(sizes)} tokens, the kernel got {L}"
    outs = []
    for (n, l), q, k, v in zip(runs, *(t.split(sizes) for t in (q_LHD, k_LHD, v_LHD))):
        q, k, v = (t.view(n, l, H, Dh).transpose(1, 2) for t in (q, k, v))  # [n, H, l, Dh]
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * l, H, Dh))
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def sdpa_dense(q_LHD, k_LHD, v_LHD, meta: PackedMeta):
    """Reference: one SDPA with a block-diagonal mask. Quadratic in the packed length."""
    seg = torch.repeat_interleave(
        torch.arange(len(meta.segments()), device=q_LHD.device),
        torch.tensor([e - s for s, e in meta.segments()], device=q_LHD.device))
    mask = seg[:, None] == seg[None, :]
    q, k, v = (t.transpose(0, 1) for t in (q_LHD, k_LHD, v_LHD))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_inputs(q_LHD, k_LHD, v_LHD):
    """q, k, v in one dtype the flash kernels take (fp16/bf16).

    Under CUDA autocast the QK-RMSNorm runs in fp32 (rms_norm is on autocast's fp32 list), so q
    and k reach the kernel fp32 while v is bf16; an fp32 recipe has all three fp32. Both are cast
    to v's dtype when that is a flash dtype, else to bf16 (the caller casts the output back)."""
    dtype = v_LHD.dtype if v_LHD.dtype in FLASH_DTYPES else torch.bfloat16
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q_LHD, k_LHD, v_LHD))


def varlen_available() -> bool:
    """A varlen flash kernel is importable: flash-attn, or torch's own (torch >= 2.10)."""
    try:
        import flash_attn  # noqa: F401  (optional, GPU only)
        return True
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        return True
    except ImportError:
        return False


def varlen(q_LHD, k_LHD, v_LHD, meta: PackedMeta):
    """Variable-length (flash) attention on GPU: one kernel over the whole pack."""
    cu = meta.cu_seqlens(q_LHD.device)  # built once per batch by `PackedMeta.to` (no host copy per layer)
    max_len = meta.max_segment
    q, k, v = flash_inputs(q_LHD, k_LHD, v_LHD)
    try:
        from flash_attn import flash_attn_varlen_func  # optional, GPU only
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
    except ImportError:
        from torch.nn.attention.varlen import varlen_attn
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len)
    return out.to(v_LHD.dtype)


KERNELS = {"sdpa": sdpa_loop, "dense": sdpa_dense, "varlen": varlen}
"""Packed attention kernels by name (`model.attn_backend`; recipe validation reads this table)."""


def get_kernel(name: str) -> PackedAttentionKernel:
    if name not in KERNELS:
        raise ValueError(f"model.attn_backend: unknown backend {name!r}, expected one of {sorted(KERNELS)}")
    if name == "varlen" and not torch.cuda.is_available():
        raise ValueError("model.attn_backend=varlen needs a CUDA GPU (flash/varlen kernels); "
                         "use 'sdpa' on CPU")
    if name == "varlen" and not varlen_available():
        # torch < 2.10 without flash-attn has no varlen kernel: SDPA per video computes the same
        warnings.warn("model.attn_backend=varlen: no varlen kernel here (torch < 2.10, no flash-attn); "
                      "using SDPA per video")
        return sdpa_loop
    return KERNELS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

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
        q, k, v = self.project(x_LD, *rope)  # [L, H, Dh]
        out = self.kernel(q, k, v, meta)  # [L, H, Dh]
        return self.proj(out.reshape(x_LD.shape[0], -1))

    def project(self, x_LD, cos_LK, sin_LK):
        """Token-wise part (fused QKV, QK-norm, RoPE): static shapes, what `model.compile` compiles."""
        L = x_LD.shape[0]
        q, k, v = self.qkv(x_LD).view(L, 3, self.heads, self.head_dim).unbind(1)  # [L, H, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos_LK, sin_LK), apply_rope(k, cos_LK, sin_LK), v

    def init_weights(self):
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        for n in (self.q_norm, self.k_norm):
            if isinstance(n, RMSNorm):
                n.init_weights()


def _text_sizes(meta: PackedMeta) -> list[int]:
    tb = meta.text_bounds
    return [tb[i + 1] - tb[i] for i in range(meta.num_videos)] + [meta.text.shape[0] - tb[-1]]


def local_pieces(meta: PackedMeta, L: int) -> tuple[list[tuple[int, int, int | None]], list[bool]]:
    """This rank's tokens cut at video boundaries: [(start, end, video or None)] in local
    indices covering [0, L), and per video whether it has caption tokens. Host-side only,
    so it works unchanged under sequence parallelism (each rank holds a contiguous slice)."""
    lo, hi = meta.offset, meta.offset + L
    pieces, pos = [], lo
    for b in range(meta.num_videos):
        s, e = max(meta.bounds[b], lo), min(meta.bounds[b + 1], hi)
        if e > s:
            assert s == pos
            pieces.append((s - lo, e - lo, b))
            pos = e
    if pos < hi:
        pieces.append((pos - lo, L, None))  # padding
    attend = [meta.text_bounds[b + 1] > meta.text_bounds[b] for b in range(meta.num_videos)]
    return pieces, attend


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
        # split (not slice) so the backward is one cat, not a zeroed full-length tensor per video
        pieces, attend = local_pieces(meta, L)
        qs = q.split([e - s for s, e, _ in pieces])
        ks, vs = k.split(_text_sizes(meta)), v.split(_text_sizes(meta))
        outs = []
        for (s, e, b), qb in zip(pieces, qs):
            if b is None or not attend[b]:  # padding, or an empty (dropped) caption
                outs.append(qb.new_zeros(qb.shape))
                continue
            o = F.scaled_dot_product_attention(qb.transpose(0, 1).unsqueeze(0), ks[b].transpose(0, 1).unsqueeze(0),
                                               vs[b].transpose(0, 1).unsqueeze(0))  # [1, H, l, Dh]
            outs.append(o.squeeze(0).transpose(0, 1))  # a view (indexing's backward zero-fills)
        out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
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
