"""The fast paths compute what the straightforward model computes (to 1e-5), forward and backward.

The reference below is the model written the plain way, from the same parameters: adaLN
modulation gathered to every token, LayerNorm then modulate, one dense SDPA with a
block-diagonal mask, cross-attention with a dense video/text mask, rotary pairs rotated
with explicit cos/sin. The optimised model (per-video runs, split instead of slices,
fused layer_norm modulation, batched equal-length segments, complex RoPE) must match it.
"""
import pytest
import torch
import torch.nn.functional as F

from vidscale.models.attention import equal_runs, sdpa_loop
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.scaling.parallel.sequence import _block_attn, _block_attn_grad

from conftest import dit_config  # noqa: E402


def cfg_(**kw):
    return dit_config(**{**dict(hidden=48, depth=2, heads=4, in_channels=3, patch=(1, 2, 2), text_dim=32), **kw})


def model_(cfg, dtype=torch.float64):
    torch.manual_seed(0)
    m = VideoDiT(cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():  # randomise the zero-initialised parts: exercise every path
            p.add_(0.05 * torch.randn_like(p))
    return m.to(dtype)


def batch(dtype=torch.float64, pad_to=96, empty_caption=True):
    """Mixed sizes, two equal-length videos side by side (a batched run), padding, an empty caption."""
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 2, 4, 6), (3, 3, 4, 4), (3, 3, 4, 4), (3, 1, 8, 8)]
    lats = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    n_text = [5, 0 if empty_caption else 3, 2, 7]
    texts = [torch.randn(n, 32, generator=g, dtype=dtype) for n in n_text]
    x, meta = pack(lats, texts, (1, 2, 2), pad_to=pad_to)
    t = torch.tensor([10.0, 500.0, 900.0, 30.0], dtype=dtype)
    return x, t, meta


# -- the reference ----------------------------------------------------------------------
def ref_rope(x, cos, sin):
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def ref_forward(m: VideoDiT, x_LP, t_V, meta):
    cfg = m.cfg
    H, Dh = cfg.heads, cfg.hidden // cfg.heads
    L = x_LP.shape[0]
    seg = meta.seg_ids
    vid_of_text = torch.repeat_interleave(torch.arange(meta.num_videos), torch.tensor(
        [meta.text_bounds[i + 1] - meta.text_bounds[i] for i in range(meta.num_videos)]))
    self_mask = seg[:, None] == seg[None, :]  # block diagonal (padding attends to padding)
    cross_mask = seg[:, None] == vid_of_text[None, :]

    def ln(x):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def attn(q, k, v, mask):  # [L, H, Dh] each; rows with nothing to attend to give zeros
        s = torch.einsum("qhd,khd->hqk", q, k) / Dh ** 0.5
        s = s.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        return torch.einsum("hqk,khd->qhd", p, v)

    x = m.x_embed(x_LP)
    c = m.t_embed(t_V)
    c = torch.cat([c, c.new_zeros(1, c.shape[1])], 0)
    text = m.y_embed(meta.text.to(x.dtype))
    cos, sin = m.rope(meta.coords)
    for blk in m.blocks:
        mod = blk.adaLN(c)[seg]
        sa, ca, ga, sm, cm, gm = mod.chunk(6, -1)
        h = ln(x) * (1 + ca) + sa
        a = blk.attn
        q, k, v = a.qkv(h).view(L, 3, H, Dh).unbind(1)
        q, k = rms(q, a.q_norm.weight), rms(k, a.k_norm.weight)
        q, k = ref_rope(q, cos, sin), ref_rope(k, cos, sin)
        x = x + ga * a.proj(attn(q, k, v, self_mask).reshape(L, -1))
        cr = blk.cross
        h = blk.norm2(x)
        q = rms(cr.q(h).view(L, H, Dh), cr.q_norm.weight)
        k, v = cr.kv(text).view(-1, 2, H, Dh).unbind(1)
        k = rms(k, cr.k_norm.weight)
        x = x + cr.proj(attn(q, k, v, cross_mask).reshape(L, -1))
        h = ln(x) * (1 + cm) + sm
        x = x + gm * blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))
    shift, scale = m.final.adaLN(c)[seg].chunk(2, -1)
    return m.final.linear(ln(x) * (1 + scale) + shift)


def grads(m, fn):
    m.zero_grad(set_to_none=True)
    out = fn()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_close(a, b, tol=1e-5, what="", relative=False):
    """Max abs difference <= tol (outputs); gradients (summed over hundreds of tokens, |g| up to
    ~1e2 here) compare relative to their largest entry."""
    if relative:
        tol = tol * max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("modulation", ["segment", "gather"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_model_matches_reference_forward_and_backward(modulation, dtype):
    cfg = cfg_()
    m = model_(cfg, dtype)
    m.gather_modulation = modulation == "gather"
    x, t, meta = batch(dtype)
    assert meta.seq_len > meta.num_real and max(n for n, _ in equal_runs(meta.segments())) > 1  # padding, a run
    out, g = grads(m, lambda: m(x, t, meta))
    ref, g_ref = grads(m, lambda: ref_forward(m, x, t, meta))
    assert_close(out, ref, what="output")
    for n in g_ref:
        assert_close(g[n], g_ref[n], what=f"grad {n}", relative=True)


def test_sdpa_loop_matches_dense_mask():
    x, t, meta = batch()
    L, H, Dh = meta.seq_len, 4, 8
    q, k, v = (torch.randn(L, H, Dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    seg = meta.seg_ids
    mask = seg[:, None] == seg[None, :]
    dense = F.scaled_dot_product_attention(*(z.transpose(0, 1) for z in (q, k, v)), attn_mask=mask).transpose(0, 1)
    fast = sdpa_loop(q, k, v, meta)
    assert_close(fast, dense, 1e-10, "sdpa_loop")
    gd = torch.autograd.grad(dense.pow(2).sum(), (q, k, v))
    gf = torch.autograd.grad(fast.pow(2).sum(), (q, k, v))
    for a, b in zip(gf, gd):
        assert_close(a, b, 1e-10, "sdpa_loop grad")


def test_sequence_slices_match_the_full_sequence():
    """Segments and cross-attention on a rank's slice (offset > 0, cut mid-video) == the full rows."""
    cfg = cfg_()
    m = model_(cfg)
    x, t, meta = batch(pad_to=96)
    blk = m.blocks[0]
    h = torch.randn(meta.seq_len, cfg.hidden, dtype=torch.float64)
    text = torch.randn(meta.text.shape[0], cfg.hidden, dtype=torch.float64)
    full = blk.cross(h, text, meta)
    from vidscale.models.dit import Segments
    shift, scale = (torch.randn(meta.num_videos + 1, cfg.hidden, dtype=torch.float64) for _ in range(2))
    full_mod = Segments(meta, meta.seq_len, h.device).norm_modulate(h, shift, scale, 1e-6)
    for r in range(3):
        sub = meta.shard(r, 3)
        n = meta.seq_len // 3
        sl = slice(r * n, (r + 1) * n)
        assert_close(blk.cross(h[sl], text, sub), full[sl], 1e-12, f"cross rank {r}")
        segs = Segments(sub, n, h.device)
        assert_close(segs.norm_modulate(h[sl], shift, scale, 1e-6), full_mod[sl], 1e-12, f"modulation rank {r}")


def test_compile_matches_eager():
    """model.compile: compiled blocks give the eager outputs and gradients (inductor, CPU C++)."""
    from vidscale.scaling.parallel.compile import apply_compile

    cfg = cfg_(hidden=32, depth=1)
    m = model_(cfg, torch.float32)
    x, t, meta = batch(torch.float32)
    out, g = grads(m, lambda: m(x, t, meta))
    apply_compile(m)
    out_c, g_c = grads(m, lambda: m(x, t, meta))
    assert_close(out_c, out, what="compiled output")
    for n in g:
        assert_close(g_c[n], g[n], what=f"compiled grad {n}", relative=True)


def test_fused_rms_norm_and_gated_add_gradcheck():
    """The hand-written backward passes (models/fused.py) against autograd's numerical Jacobian,
    and their outputs against the plain torch ops."""
    from vidscale.models.fused import rms_norm, segment_gated_add

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(8, dtype=torch.float64, generator=g)).requires_grad_()
    assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (8,), w, 1e-6), 1e-12, "rms_norm")
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    pieces = [(0, 3, 1), (3, 4, 0), (4, 9, 1), (9, 10, 2)]  # a row used by two runs, padding row 2
    xs = torch.randn(10, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ys = torch.randn(10, 5, dtype=torch.float64, generator=g, requires_grad=True)
    gate = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.tensor([r for s, e, r in pieces for _ in range(e - s)])
    assert_close(segment_gated_add(xs, gate, ys, pieces), xs + gate[rows] * ys, 1e-12, "gated add")
    assert torch.autograd.gradcheck(lambda a, b, c: segment_gated_add(a, b, c, pieces), (xs, gate, ys))


def test_ring_block_math_matches_torch_flash_kernel():
    """The matmul path (used off CPU) and the CPU flash path agree, forward and backward."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 4, 16, generator=g, dtype=torch.float64) for n in (30, 45, 45))
    do = torch.randn(30, 4, 16, generator=g, dtype=torch.float64)
    o1, l1 = _block_attn(q, k, v, 0.25, cpu_flash=True)
    o2, l2 = _block_attn(q, k, v, 0.25, cpu_flash=False, chunk=7)  # several query chunks
    assert (o1 - o2).abs().max() < 1e-6 and (l1 - l2).abs().max() < 1e-6
    g1 = _block_attn_grad(do, q, k, v, o1, l1, 0.25, cpu_flash=True)
    g2 = _block_attn_grad(do, q, k, v, o1, l1, 0.25, cpu_flash=False, chunk=7)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(torch.einsum("qhd,khd->hqk", qr, kr) * 0.25, -1)
    torch.einsum("hqk,khd->qhd", ref, vr).backward(do)
    for a, b, r in zip(g1, g2, (qr.grad, kr.grad, vr.grad)):
        assert (a - r).abs().max() < 1e-6 and (b - r).abs().max() < 1e-6
