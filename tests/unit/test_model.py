"""VideoDiT: packing is exact, adaLN-Zero starts as identity, sizes and FLOPs are computed."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vidscale.models.dit import DiTBlock, VideoDiT
from vidscale.models.packed import pack, patchify, unpack, unpatchify
from vidscale.models.sizes import SIZES, param_count
from vidscale.scaling.train.flops import batch_forward_flops, train_flops

from conftest import dit_config  # noqa: E402

torch.manual_seed(0)


def tiny_cfg(**kw):
    return dit_config(hidden=48, depth=2, heads=4, in_channels=3, patch=(1, 2, 2), text_dim=32, **kw)


def trained_like(cfg):
    """A model whose zero-initialised parts are randomised, so every path is exercised."""
    m = VideoDiT(cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.double()


def videos():
    g = torch.Generator().manual_seed(1)
    lats = [torch.randn(3, 2, 4, 6, generator=g), torch.randn(3, 3, 6, 4, generator=g),
            torch.randn(3, 1, 8, 8, generator=g)]
    texts = [torch.randn(5, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(7, 32, generator=g)]
    return lats, texts


def test_patchify_roundtrip():
    x = torch.randn(4, 4, 6, 8)
    assert torch.equal(unpatchify(patchify(x, (2, 2, 2)), (2, 3, 4), 4, (2, 2, 2)), x)


@pytest.mark.parametrize("backend", ["sdpa", "dense"])
def test_packed_equals_each_video_alone(backend):
    cfg = tiny_cfg(attn_backend=backend)
    m = trained_like(cfg)
    lats, texts = videos()
    t = torch.tensor([10.0, 500.0, 900.0], dtype=torch.float64)
    x, meta = pack([l.double() for l in lats], [tt.double() for tt in texts], cfg.patch, pad_to=64)
    assert meta.seq_len == 64 and meta.num_real < 64  # padding present
    out = m(x, t, meta)
    for i, (lat, txt) in enumerate(zip(lats, texts)):
        xi, mi = pack([lat.double()], [txt.double()], cfg.patch)
        oi = m(xi, t[i:i + 1], mi)
        s, e = meta.bounds[i], meta.bounds[i + 1]
        assert (out[s:e] - oi).abs().max().item() <= 1e-5
    # padding never leaks into real tokens: change the padding, real outputs stay
    x2 = x.clone()
    x2[meta.num_real:] = torch.randn_like(x2[meta.num_real:])
    assert torch.equal(m(x2, t, meta)[:meta.num_real], out[:meta.num_real])


def test_fp32_packed_equivalence():
    cfg = tiny_cfg()
    m = trained_like(cfg).float()
    lats, texts = videos()
    t = torch.tensor([3.0, 40.0, 700.0])
    x, meta = pack(lats, texts, cfg.patch)
    out = m(x, t, meta)
    for i in range(3):
        xi, mi = pack([lats[i]], [texts[i]], cfg.patch)
        assert (out[meta.bounds[i]:meta.bounds[i + 1]] - m(xi, t[i:i + 1], mi)).abs().max() <= 1e-5


def test_adaln_zero_block_is_identity():
    cfg = tiny_cfg()
    blk = DiTBlock(cfg)
    blk.init_weights()
    m = VideoDiT(cfg)
    lats, texts = videos()
    x, meta = pack(lats, texts, cfg.patch)
    h = torch.randn(x.shape[0], cfg.hidden)
    c = torch.randn(meta.num_videos + 1, cfg.hidden)
    text = torch.randn(meta.text.shape[0], cfg.hidden)
    out = blk(h, c, m.rope(meta.coords), text, meta)
    assert torch.equal(out, h)


def test_fresh_model_predicts_zero():
    cfg = tiny_cfg()
    m = VideoDiT(cfg)
    m.init_weights()
    lats, texts = videos()
    x, meta = pack(lats, texts, cfg.patch)
    assert m(x, torch.tensor([1.0, 2.0, 3.0]), meta).abs().max() == 0


def test_meta_device_then_init_weights_touches_everything():
    cfg = tiny_cfg()
    with torch.device("meta"):
        m = VideoDiT(cfg)
    m = m.to_empty(device="cpu")
    for p in m.parameters():
        p.data.fill_(float("nan"))
    m.init_weights()
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all(), n
    lats, texts = videos()
    x, meta = pack(lats, texts, cfg.patch)
    assert torch.isfinite(m(x, torch.ones(3), meta)).all()


@pytest.mark.parametrize("size", list(SIZES))
def test_param_count_is_computed(size):
    cfg = dit_config(size=size)
    with torch.device("meta"):
        m = VideoDiT(cfg)
    assert sum(p.numel() for p in m.parameters()) == param_count(cfg)


def test_size_table_spans_debug_to_30b():
    assert 0.5e6 < param_count(dit_config(size="debug")) < 2e6
    for name, lo, hi in [("1B", 0.8e9, 1.3e9), ("3B", 2.5e9, 3.5e9), ("7B", 6e9, 8.5e9),
                         ("14B", 12e9, 16e9), ("30B", 26e9, 34e9)]:
        assert lo < param_count(dit_config(size=name)) < hi, name


def test_any_resolution_and_duration():
    cfg = tiny_cfg()
    m = trained_like(cfg).float()
    for shape in [(3, 1, 2, 2), (3, 7, 10, 6), (3, 16, 4, 30)]:
        x, meta = pack([torch.randn(*shape)], [torch.randn(3, 32)], cfg.patch)
        out = m(x, torch.tensor([5.0]), meta)
        assert unpack(out, meta, 3, cfg.patch)[0].shape == shape


def count_flops(m, x, meta, t, backward=False):
    """torch's FLOP counter over a forward (and backward) with SDPA on its math path, so the
    attention matmuls are aten.bmm calls the counter sees (the fused CPU/GPU kernels are not
    counted on every backend). Returns (total, {op: flops})."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = m(x, t, meta)
        if backward:
            out.square().sum().backward()
    return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("pad_to", [64, None])  # with a padding segment, and without
def test_flops_model_matches_flop_counter(pad_to):
    # attention counted by the counter itself, never by the formula under test
    cfg = tiny_cfg()
    m = trained_like(cfg).float()
    lats, texts = videos()
    x, meta = pack(lats, texts, cfg.patch, pad_to=pad_to)
    t = torch.tensor([1.0, 2.0, 3.0])
    counted, ops = count_flops(m, x, meta, t)
    parts = batch_forward_flops(cfg, meta, split=True)
    total = sum(parts.values())
    assert abs(counted - total) / total < 1e-3, (counted, total, parts)
    # the attention products alone: self-attention per segment (padding too), cross-attention per video
    segs = [e - s for s, e in meta.segments()]
    vids = [(meta.bounds[i + 1] - meta.bounds[i], meta.text_bounds[i + 1] - meta.text_bounds[i])
            for i in range(meta.num_videos)]
    assert ops.get("aten.bmm", 0) > 0, ops
    assert ops["aten.bmm"] == parts["attention_core"] + 4 * cfg.hidden * cfg.depth * sum(lv * lt for lv, lt in vids)
    assert parts["attention_core"] == 4 * cfg.hidden * cfg.depth * sum(l * l for l in segs)


def test_train_flops_match_flop_counter():
    cfg = tiny_cfg()
    m = trained_like(cfg).float()
    lats, texts = videos()
    x, meta = pack(lats, texts, cfg.patch, pad_to=64)
    counted, _ = count_flops(m, x, meta, torch.tensor([1.0, 2.0, 3.0]), backward=True)
    # train = 3 x forward counts the input gradients of the three input layers (patch, text and
    # timestep embeddings) that autograd never computes: the counter must be short by exactly those
    L, Lt, V, D = meta.seq_len, meta.text.shape[0], meta.num_videos, cfg.hidden
    skipped = 2 * L * cfg.patch_dim * D + 2 * Lt * cfg.text_dim * D + 2 * V * 256 * D
    assert counted == train_flops(cfg, meta) - skipped, (counted, train_flops(cfg, meta), skipped)
