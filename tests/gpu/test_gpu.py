"""The GPU tier (`make gpu-check`): the CUDA paths against their references, on one GPU.

Skipped, and reported as skipped, without CUDA. One GPU cannot hold two nccl ranks, so the
distributed code runs at world size 1 on nccl (ZeRO-3 forces a process group even then):
every collective the project issues goes through nccl with the device placement a real
multi-GPU run uses. Kernels are compared with fp32 references on the same inputs."""
import math

import pytest
import torch

from vidscale.data.synthetic import synthetic_video
from vidscale.models.attention import flash_inputs, sdpa_dense, sdpa_loop, varlen
from vidscale.models.diffusion import DDPM
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.parallel.parallelize import build_model
from vidscale.scaling.parallel.sequence import _block_attn, _block_attn_grad
from vidscale.scaling.train.flops import measure_peak_flops

from conftest import DEBUG, QUIET, read_losses, set_args, vidscale

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
CUDA = torch.device("cuda")


def _packed(n_videos=3, sizes=((8, 16), (16, 16)), frames=(2, 5), dim=16, seed=0):
    vids = [synthetic_video(i, seed, 4, list(frames), [list(s) for s in sizes], [2, 6], dim, [1, 2, 2])
            for i in range(n_videos)]
    return pack([v[0] for v in vids], [v[1] for v in vids], (1, 2, 2), multiple=8)


def _qkv(L, H=4, Dh=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(L, H, Dh, device=CUDA, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def test_varlen_matches_fp32_sdpa_in_outputs_and_gradients():
    _, meta = _packed()
    meta = meta.to(CUDA)
    q, k, v = _qkv(meta.seq_len)
    out = varlen(q, k, v, meta)
    do = torch.randn_like(out)
    out.backward(do)
    got = [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = sdpa_dense(*ref_in, meta)
    ref.backward(do.float())
    want = [ref, *(t.grad for t in ref_in)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)


def test_varlen_takes_fp32_q_k_from_qk_norm_under_autocast():
    _, meta = _packed()
    meta = meta.to(CUDA)
    q, k, v = _qkv(meta.seq_len)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = varlen(q.float(), k.float(), v, meta)  # what QK-norm (fp32 under autocast) hands on
    assert out.dtype == torch.bfloat16
    ref = sdpa_loop(*flash_inputs(q, k, v), meta)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_ring_block_kernel_on_cuda_matches_the_fp32_reference():
    q, k, v = (t.detach() for t in _qkv(256))
    do = torch.randn_like(q)
    scale = 1 / math.sqrt(q.shape[-1])
    o, lse = _block_attn(q, k, v, scale)  # the CUDA flash kernel (bf16 in, fp32 lse)
    ro, rlse = _block_attn(q.float(), k.float(), v.float(), scale)  # fp32 matmuls
    torch.testing.assert_close(o, ro, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, rlse, rtol=1e-2, atol=1e-2)
    got = _block_attn_grad(do, q, k, v, o, lse, scale)
    want = _block_attn_grad(do.float(), q.float(), k.float(), v.float(), ro, rlse, scale)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2, msg=name)


def test_ulysses_and_ring_take_fp32_q_k_from_qk_norm_in_bf16():
    """Ulysses around ring (world size 1 on nccl): fp32 q, k beside a bf16 v, as QK-norm hands
    them on under autocast, go through the all-to-all and the ring's flash kernel in bf16 (the
    stack used to promote them to fp32 and the ring took its fp32 fallback). Forward only: a
    one-rank ring's backward would send dK/dV to itself."""
    import torch.distributed as dist
    from vidscale.scaling.parallel.sequence import RingAttention, UlyssesAttention
    _, meta = _packed()
    meta = meta.to(CUDA)
    q, k, v = (t.detach() for t in _qkv(meta.seq_len))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = dist.group.WORLD
        usp = UlyssesAttention(world, 1, 0, RingAttention(world, [0], 0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = usp(q.float(), k.float(), v, meta)
    finally:
        if started:
            dist.destroy_process_group()
    assert out.dtype == torch.bfloat16  # the ring returns its q's dtype
    ref = sdpa_dense(*(t.float() for t in flash_inputs(q, k, v)), meta)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_gather_modulation_matches_the_per_video_path():
    cfg = load_config(DEBUG)
    model = build_model(lambda: VideoDiT(model_config(cfg.model)), CUDA, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, meta = _packed(dim=cfg.model.text_dim)
    x, meta, t = x.to(CUDA), meta.to(CUDA), torch.tensor([100.0, 500.0, 900.0], device=CUDA)
    model.gather_modulation = True
    a = model(x, t, meta)
    model.gather_modulation = False
    b = model(x, t, meta)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ddpm_trains_and_samples_on_cuda():
    ddpm = DDPM(num_steps=50)
    x0, noise = torch.randn(10, 4, device=CUDA), torch.randn(10, 4, device=CUDA)
    t = torch.tensor([3] * 10, device=CUDA)
    abar = float(ddpm.alphas_cumprod[3])
    torch.testing.assert_close(ddpm.q_sample(x0, t, noise), math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise)
    out = ddpm.sample(lambda x, tv: torch.zeros_like(x), noise, 1, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_gemm_peak_is_a_large_fraction_of_a_modern_gpu():
    peak = measure_peak_flops(CUDA, torch.bfloat16, seconds=0.5)
    assert peak > 1e14, f"bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s: launch-bound, not a peak"


GPU_ZERO3 = [*QUIET, "train.device=cuda", "train.dtype=bf16", "parallel.zero_stage=3", "parallel.backend=nccl",
             "model.attn_backend=varlen", "model.activation_checkpointing=true", "train.steps=6",
             "optim.warmup=2", "logging.every=1", "data.synthetic_videos=32", "train.val_videos=2",
             "logging.sample_every=3", "logging.sample_format=png", "logging.split_every=0"]


def test_zero3_bf16_on_nccl_trains_samples_and_resumes(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    r = vidscale("train", DEBUG, "--run-dir", full, *set_args(GPU_ZERO3 + ["checkpoint.every=3"]), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = read_losses(full)
    assert sorted(ref) == list(range(1, 7)) and all(math.isfinite(v) for v in ref.values())
    assert list((full / "samples").glob("*.png")), "no training samples written"  # png: no PyAV there
    # the same run stopped after 3 steps and resumed: every later loss equal
    r = vidscale("train", DEBUG, "--run-dir", part, *set_args(GPU_ZERO3 + ["checkpoint.every=3", "train.steps=3"]),
                 timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    r = vidscale("train", DEBUG, "--run-dir", part, *set_args(GPU_ZERO3 + ["checkpoint.every=3",
                                                                          "checkpoint.resume=auto"]), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_losses(part)
    # the flash backward accumulates dQ with atomics (not bit-reproducible even between two
    # uninterrupted runs): equal to bf16 noise, where a resume that lost state is far off
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=2e-3), (step, got[step], ref[step])
    # exported weights are the fp32 masters
    from safetensors.torch import load_file
    weights = load_file(str(full / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_async_save_snapshots_reuse_pinned_buffers():
    from vidscale.scaling.checkpoint.storage import PINNED, host_copy
    state = {"w": torch.randn(64, 64, device=CUDA), "b": torch.randn(64, device=CUDA)}
    PINNED.begin()
    first = host_copy(state)
    assert all(v.is_pinned() and torch.equal(v, state[k].cpu()) for k, v in first.items())
    ptrs = {k: v.data_ptr() for k, v in first.items()}
    for v in state.values():
        v.add_(1)
    PINNED.begin()  # the next save: the first snapshot was written
    second = host_copy(state)
    assert {k: v.data_ptr() for k, v in second.items()} == ptrs  # the same buffers, new values
    assert all(torch.equal(v, state[k].cpu()) for k, v in second.items())
