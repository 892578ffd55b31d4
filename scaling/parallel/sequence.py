"""Sequence-parallel packed attention: Ulysses, ring, and both (USP).

Every kernel here has the signature of the local kernels in `models/attention.py`,
`kernel(q_LHD, k_LHD, v_LHD, meta) -> out_LHD`, and is handed to the model with
`VideoDiT.set_attention`. q/k/v are this rank's contiguous slice of the packed sequence;
`meta.bounds` / `meta.seq_len` are global and `meta.offset` is where the slice starts.

- Ulysses (DeepSpeed-Ulysses): all-to-all from sequence-sharded [L/u, H, Dh] to
  head-sharded [L, H/u, Dh], any packed kernel on the whole sequence, all-to-all back.
- Ring: each rank keeps its queries; K/V blocks travel around the ring and the partial
  results are merged with the log-sum-exp (online softmax) rule. Only the (query, key)
  pairs of the same video (or both padding) are ever scored, so the pack stays
  block-diagonal across rank boundaries. Backward passes K/V around again and dK/dV
  travel with them back to their owner.
- USP (Fang & Zhao 2024): Ulysses inside a group of neighbouring ranks, ring across
  groups; the ring then sees the Ulysses group's contiguous block with H/u heads.

Communication is done inside autograd Functions so gradients are exact; byte counters
(`sent_bytes`) let the benchmark compare the traffic with the analytic volume.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from vidscale.models.attention import FLASH_DTYPES, PackedAttentionKernel, flash_inputs
from vidscale.models.packed import PackedMeta
from vidscale.scaling.parallel import collectives


# -- Ulysses: all-to-all between sequence and head sharding ------------------------------
def _seq_to_head(x_LSHD: torch.Tensor, group, u: int) -> torch.Tensor:
    """[Lr, S, H, Dh] (my tokens, all heads) -> [u*Lr, S, H/u, Dh] (group's tokens, my heads)."""
    Lr, S, H, D = x_LSHD.shape
    send = x_LSHD.reshape(Lr, S, u, H // u, D).permute(2, 0, 1, 3, 4).contiguous()  # chunk i -> rank i
    recv = torch.empty_like(send)
    collectives.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens, my heads
    return recv.reshape(u * Lr, S, H // u, D)


def _head_to_seq(y_LSHD: torch.Tensor, group, u: int) -> torch.Tensor:
    """Inverse of `_seq_to_head`: [u*Lr, S, H/u, Dh] -> [Lr, S, H, Dh]."""
    L, S, Hu, D = y_LSHD.shape
    send = y_LSHD.reshape(u, L // u, S, Hu, D).contiguous()  # tokens of rank j -> rank j
    recv = torch.empty_like(send)
    collectives.all_to_all_single(recv, send, group=group)  # recv[i]: head chunk i of my tokens
    return recv.permute(1, 2, 0, 3, 4).reshape(L // u, S, u * Hu, D)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        owner.sent_bytes += _a2a_bytes(x, owner.size)
        return _seq_to_head(x, owner.group, owner.size)

    @staticmethod
    def backward(ctx, g):
        o = ctx.owner
        o.sent_bytes += _a2a_bytes(g, o.size)
        return _head_to_seq(g.contiguous(), o.group, o.size), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, owner):
        ctx.owner = owner
        owner.sent_bytes += _a2a_bytes(y, owner.size)
        return _head_to_seq(y, owner.group, owner.size)

    @staticmethod
    def backward(ctx, g):
        o = ctx.owner
        o.sent_bytes += _a2a_bytes(g, o.size)
        return _seq_to_head(g.contiguous(), o.group, o.size), None


def _a2a_bytes(x: torch.Tensor, u: int) -> int:
    """Bytes this rank sends in one all-to-all (its own chunk stays)."""
    return x.numel() * x.element_size() * (u - 1) // u


def kernel_inputs(q_LHD, k_LHD, v_LHD, cuda: bool | None = None):
    """q, k, v as the CUDA flash kernels take them (`cuda`: default, q is on a CUDA device).

    Under CUDA bf16 autocast the QK-norm runs in fp32 (rms_norm is on autocast's fp32 list), so
    q and k arrive fp32 beside a bf16 v: cast them to v's dtype before anything combines the
    three (Ulysses' stack would promote all to fp32, send twice the bytes and leave the ring
    on its exact fp32 fallback). An fp32 recipe, and the CPU, keep their dtypes."""
    cuda = q_LHD.device.type == "cuda" if cuda is None else cuda
    if cuda and v_LHD.dtype in FLASH_DTYPES:
        return flash_inputs(q_LHD, k_LHD, v_LHD)
    return q_LHD, k_LHD, v_LHD


class UlyssesAttention:
    """All-to-all to head sharding, `inner` on the Ulysses group's whole block, back."""

    def __init__(self, group, size: int, rank: int, inner: PackedAttentionKernel):
        self.group, self.size, self.rank, self.inner = group, size, rank, inner
        self.sent_bytes = 0

    def __call__(self, q_LHD, k_LHD, v_LHD, meta: PackedMeta):
        Lr, H, _ = q_LHD.shape
        assert H % self.size == 0, "scaling.config.check_layout checks heads % ulysses"
        qkv = _SeqToHead.apply(torch.stack(kernel_inputs(q_LHD, k_LHD, v_LHD), 1), self)  # [u*Lr, 3, H/u, Dh]
        # the group's block starts where its first rank's slice starts; only the offset
        # (and the global bounds) matter to the inner kernels, not the per-token fields
        inner_meta = replace(meta, offset=meta.offset - self.rank * Lr)
        out = self.inner(qkv[:, 0], qkv[:, 1], qkv[:, 2], inner_meta)  # [u*Lr, H/u, Dh]
        return _HeadToSeq.apply(out.unsqueeze(1), self)[:, 0]  # [Lr, H, Dh]


# -- Ring: K/V blocks around the ring, log-sum-exp merge ----------------------------------
def _pairs(segments, q0: int, k0: int, n: int) -> list[tuple[int, int, int, int]]:
    """Local (q_start, q_end, k_start, k_end) of every segment present in both blocks."""
    out = []
    for s, e in segments:
        qa, qb, ka, kb = max(s, q0), min(e, q0 + n), max(s, k0), min(e, k0 + n)
        if qb > qa and kb > ka:
            out.append((qa - q0, qb - q0, ka - k0, kb - k0))
    return out


def _cuda_flash(q_QHD) -> bool:
    """The CUDA flash kernel takes this block: fp16/bf16, head dim a multiple of 8 up to 256."""
    Dh = q_QHD.shape[-1]
    return q_QHD.device.type == "cuda" and q_QHD.dtype in FLASH_DTYPES and Dh % 8 == 0 and Dh <= 256


def _cu(n: int, device) -> torch.Tensor:
    return torch.tensor([0, n], dtype=torch.int32, device=device)


_LSE_SHAPES: dict[tuple[int, int], tuple[int, ...]] = {}
"""(heads, queries) -> the shape the CUDA kernel gave its log-sum-exp: its backward takes the same."""


def _lse_HQ(lse: torch.Tensor, H: int, Q: int) -> torch.Tensor:
    """The kernel's log-sum-exp ([H, Q], or [1, H, Q'] with Q' >= Q by version) as [H, Q]."""
    _LSE_SHAPES[(H, Q)] = tuple(lse.shape)
    return lse.reshape(H, -1)[:, :Q]


def _kernel_lse(lse_HQ: torch.Tensor) -> torch.Tensor:
    """The merged [H, Q] log-sum-exp in the layout the kernel's forward used."""
    H, Q = lse_HQ.shape
    shape = _LSE_SHAPES.get((H, Q), (H, Q))
    if shape == (H, Q):
        return lse_HQ.float().contiguous()
    full = lse_HQ.new_zeros(shape, dtype=torch.float32)
    full.view(H, -1)[:, :Q] = lse_HQ
    return full


def _block_attn(q_QHD, k_KHD, v_KHD, scale: float, cpu_flash: bool = True, chunk: int = 1024):
    """Attention of q over one K/V block: (out [Q, H, Dh] fp32, lse [H, Q] fp32).

    CPU: torch's flash kernel, which returns the log-sum-exp and never materialises the
    scores. CUDA with fp16/bf16 inputs: the CUDA flash kernel (fp32 log-sum-exp). Elsewhere:
    exact fp32 matmuls over `chunk` queries at a time (scores [H, chunk, K]), with autocast
    off so that the forward and `_block_attn_grad` compute the same fp32 scores.
    """
    Q, H, _ = q_QHD.shape
    if cpu_flash and q_QHD.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(t.transpose(0, 1)[None] for t in (q_QHD, k_KHD, v_KHD)), 0.0, False, scale=scale)
        return o[0].transpose(0, 1).float(), lse[0].float()
    if _cuda_flash(q_QHD):
        K = k_KHD.shape[0]
        o, lse, *_ = torch.ops.aten._flash_attention_forward(
            q_QHD, k_KHD, v_KHD, _cu(Q, q_QHD.device), _cu(K, q_QHD.device), Q, K, 0.0, False, False, scale=scale)
        return o.float(), _lse_HQ(lse, H, Q).float()
    with torch.autocast(q_QHD.device.type, enabled=False):
        kf, vf = k_KHD.float(), v_KHD.float()
        outs, lses = [], []
        for i in range(0, Q, chunk):
            s_HQK = torch.einsum("qhd,khd->hqk", q_QHD[i:i + chunk].float(), kf) * scale
            lse = torch.logsumexp(s_HQK, -1)
            outs.append(torch.einsum("hqk,khd->qhd", torch.exp(s_HQK - lse[..., None]), vf))
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, 1)


def _block_attn_grad(do_QHD, q_QHD, k_KHD, v_KHD, out_QHD, lse_HQ, scale: float, cpu_flash: bool = True,
                     chunk: int = 1024):
    """(dq, dk, dv) of one block's share, given the MERGED output and log-sum-exp.

    With the global lse, exp(s - lse) is this block's slice of the full softmax, and
    rowsum(dO * O) uses the full output: the blocks' gradients then simply add up.
    """
    if cpu_flash and q_QHD.device.type == "cpu":
        t = lambda x: x.transpose(0, 1)[None].to(q_QHD.dtype)  # noqa: E731  [1, H, L, Dh]
        lse_dtype = torch.float64 if q_QHD.dtype == torch.float64 else torch.float32  # as the kernel's
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(do_QHD), t(q_QHD), t(k_KHD), t(v_KHD), t(out_QHD), lse_HQ[None].to(lse_dtype), 0.0, False, scale=scale)
        return tuple(g[0].transpose(0, 1).float() for g in grads)
    if _cuda_flash(q_QHD):
        Q, H, _ = q_QHD.shape
        K = k_KHD.shape[0]
        dev = q_QHD.device
        rng = torch.zeros(2, dtype=torch.int64, device=dev)  # no dropout: the kernel never reads it
        grads = torch.ops.aten._flash_attention_backward(
            do_QHD.to(q_QHD.dtype).contiguous(), q_QHD, k_KHD, v_KHD, out_QHD.to(q_QHD.dtype).contiguous(),
            _kernel_lse(lse_HQ), _cu(Q, dev), _cu(K, dev), Q, K, 0.0, False, rng, rng, scale=scale)
        return tuple(g.float() for g in grads)
    with torch.autocast(q_QHD.device.type, enabled=False):
        kf, vf = k_KHD.float(), v_KHD.float()
        dk, dv, dqs = torch.zeros_like(kf), torch.zeros_like(vf), []
        for i in range(0, q_QHD.shape[0], chunk):
            qf, do, o = (x[i:i + chunk].float() for x in (q_QHD, do_QHD, out_QHD))
            p_HQK = torch.exp(torch.einsum("qhd,khd->hqk", qf, kf) * scale - lse_HQ[:, i:i + chunk, None])
            dv += torch.einsum("hqk,qhd->khd", p_HQK, do)
            delta = (do * o).sum(-1).T  # [H, q]
            ds = p_HQK * (torch.einsum("qhd,khd->hqk", do, vf) - delta[..., None]) * scale
            dqs.append(torch.einsum("hqk,khd->qhd", ds, kf))
            dk += torch.einsum("hqk,qhd->khd", ds, qf)
        return torch.cat(dqs), dk, dv


class _RingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, segments, offset):
        R, r, n = ring.size, ring.rank, q.shape[0]
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [n, H, Dh]
        lse = torch.full((q.shape[1], n), -math.inf, dtype=torch.float32, device=q.device)  # [H, n]
        kv = torch.stack([k, v])
        for step in range(R):
            pending = ring.shift_start(kv) if step < R - 1 else None  # overlap with the compute
            src = (r - step) % R
            for a, b, c, d in _pairs(segments, offset, offset + (src - r) * n, n):
                o_b, lse_b = _block_attn(q[a:b], kv[0, c:d], kv[1, c:d], scale)
                new = torch.logaddexp(lse[:, a:b], lse_b)  # online softmax merge
                out[a:b] = (out[a:b] * torch.exp(lse[:, a:b] - new).T[..., None]
                            + o_b * torch.exp(lse_b - new).T[..., None])
                lse[:, a:b] = new
            if pending is not None:
                kv = ring.shift_wait(*pending)
        ctx.ring, ctx.segments, ctx.offset = ring, segments, offset
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, segments, offset = ctx.ring, ctx.segments, ctx.offset
        R, r, n = ring.size, ring.rank, q.shape[0]
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with kv
        for step in range(R):
            pending = ring.shift_start(kv) if step < R - 1 else None
            src = (r - step) % R
            for a, b, c, d in _pairs(segments, offset, offset + (src - r) * n, n):
                dq_b, dk_b, dv_b = _block_attn_grad(dout[a:b], q[a:b], kv[0, c:d], kv[1, c:d],
                                                    out[a:b], lse[:, a:b], scale)
                dq[a:b] += dq_b
                dkv[0, c:d] += dk_b
                dkv[1, c:d] += dv_b
            # the accumulated dK/dV move on with their block; after R moves they are home
            dkv = ring.shift_wait(*ring.shift_start(dkv, tag=1))
            if pending is not None:
                kv = ring.shift_wait(*pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class RingAttention:
    """Ring attention over one ring group. `ranks` are the group's global ranks in ring order."""

    def __init__(self, group, ranks: list[int], rank: int):
        self.group, self.ranks, self.rank, self.size = group, ranks, rank, len(ranks)
        self.sent_bytes = 0

    def shift_start(self, x: torch.Tensor, tag: int = 0):
        """Send `x` to the next rank, receive the previous rank's block (asynchronously).

        K/V (tag 0) and dK/dV (tag 1) can be in flight together: distinct tags keep them apart.
        """
        x = x.contiguous()
        nxt, prv = self.ranks[(self.rank + 1) % self.size], self.ranks[(self.rank - 1) % self.size]
        self.sent_bytes += x.numel() * x.element_size()
        return collectives.exchange(x, nxt, prv, self.group, tag)

    @staticmethod
    def shift_wait(reqs, recv: torch.Tensor) -> torch.Tensor:
        collectives.wait(reqs)
        return recv

    def __call__(self, q_LHD, k_LHD, v_LHD, meta: PackedMeta):
        q_LHD, k_LHD, v_LHD = kernel_inputs(q_LHD, k_LHD, v_LHD)  # fp32 q, k from QK-norm under autocast
        return _RingAttn.apply(q_LHD, k_LHD, v_LHD, self, meta.segments(), meta.offset)


# -- the one constructor the engine calls ---------------------------------------------------
def build_sp_attention(dims, local: PackedAttentionKernel) -> PackedAttentionKernel:
    """The packed attention kernel for this rank's layout (`local` when sp == 1).

    Ulysses inside, ring across: `ParallelDims` makes the Ulysses group `ulysses`
    neighbouring ranks, so each Ulysses group holds one contiguous block of the sequence
    and the ring passes those blocks around.
    """
    if dims.sp == 1:
        return local
    kernel = local
    if dims.ring > 1:
        ranks = next(g for g in dims._group_ranks("ring") if dims.rank in g)
        kernel = RingAttention(dims.group("ring"), ranks, dims.ring_rank)
    if dims.ulysses > 1:
        kernel = UlyssesAttention(dims.group("ulysses"), dims.ulysses, dims.ulysses_rank, kernel)
    return kernel


def sent_bytes(kernel) -> int:
    """Bytes this rank has sent through `kernel` (and the kernels it wraps)."""
    total = 0
    while kernel is not None:
        total += getattr(kernel, "sent_bytes", 0)
        kernel = getattr(kernel, "inner", None)
    return total
