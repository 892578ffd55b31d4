"""Hand-written forward/backward pairs for the memory-bound parts of a block.

Each of these computes exactly what the plain composition of torch ops computes (checked
by `torch.autograd.gradcheck` and against the reference model in
tests/test_perf_numerics.py); they exist because autograd's generic backward of the
composition makes more passes over [L, ...] activations than needed, and on a CPU (or any
memory-bound op) every pass is paid:

- `rms_norm`: torch's RMSNorm backward on CPU is the autograd of pow/mean/rsqrt/mul
  (about ten passes plus copies); this one is five.
- `segment_gated_add`: adaLN-Zero's gated residual over packed videos. Each video's
  tokens are a contiguous run with its own gate row. The straightforward per-run form
  (split x and y, one addcmul per run, cat) pays a cat in forward and two in backward (the
  splits'); this writes every run straight into one output (and one gradient) buffer
  with addcmul's and mul's `out=` forms: no cat at all (measured 4.9 -> 2.9 ms forward +
  backward for [4096, 384] over 33 videos). LayerNorm's `out=` form computes and then
  copies, so the modulated norm keeps its per-run form.

Runs are given as `pieces`: [(start, end, row)] covering [0, L) in order, row indexing
the per-video tensors ([V+1, D], row V for padding tokens).
"""
from __future__ import annotations

import torch


# -- RMSNorm over the last dimension -----------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        D = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).square_().div_(D).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        D = x.shape[-1]
        xhat = torch.mul(x, rstd)
        dw = (dy * xhat).reshape(-1, D).sum(0) if ctx.needs_input_grad[1] else None
        g = dy * weight
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        c = torch.linalg.vecdot(g, xhat, dim=-1).unsqueeze_(-1).div_(D)
        return torch.addcmul(g, xhat, c, value=-1).mul_(rstd), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, (D,), weight, eps)` with a five-pass backward (fp32/fp64 on CPU; elsewhere,
    and under torch.compile, torch's own: fused CUDA kernels, bf16 statistics in fp32)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype
            or torch.compiler.is_compiling()):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNorm.apply(x, weight, eps)


# -- adaLN over packed runs --------------------------------------------------------------------
class _SegmentGatedAdd(torch.autograd.Function):
    """out[s:e] = x[s:e] + g[row] * y[s:e] for every piece (s, e, row)."""

    @staticmethod
    def forward(ctx, x, g_VD, y, pieces):
        out = torch.empty_like(x)
        for s, e, r in pieces:
            torch.addcmul(x[s:e], g_VD[r], y[s:e], out=out[s:e])
        ctx.save_for_backward(g_VD, y)
        ctx.pieces = pieces
        return out

    @staticmethod
    def backward(ctx, dout):
        g_VD, y = ctx.saved_tensors
        dout = dout.contiguous()
        dy = torch.empty_like(y) if ctx.needs_input_grad[2] else None
        dg = torch.zeros_like(g_VD) if ctx.needs_input_grad[1] else None
        for s, e, r in ctx.pieces:
            if dy is not None:
                torch.mul(dout[s:e], g_VD[r], out=dy[s:e])
            if dg is not None:
                dg[r] += torch.linalg.vecdot(dout[s:e], y[s:e], dim=0)
        return dout, dg, dy, None


def segment_gated_add(x_LD, g_VD, y_LD, pieces):
    """x + gate * y with the gate row of each token's video."""
    return _SegmentGatedAdd.apply(x_LD.contiguous(), g_VD.contiguous(), y_LD.contiguous(), pieces)
