"""The GPU path's defects, caught on the CPU where they can be: dtypes under autocast (varlen
inputs, the ring's fp32 fallback, recompute under activation checkpointing, samples and the
VAE's PSNR with bf16 weights), tables and buffers that follow their device (DDPM's
alphas_cumprod, the Wan VAE's latent mean/std, cu_seqlens), the CUDA device of a rank, Ray
workers without GPUs, and DeepSpeed's gradient dtypes under bf16. The GPU tier (tests/gpu)
runs the same paths on a GPU."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vidscale.cluster.ray_launcher import worker_config
from vidscale.data.synthetic import synthetic_video
from vidscale.models.attention import RMSNorm, flash_inputs, sdpa_dense, varlen_available
from vidscale.models.diffusion import DDPM, RectifiedFlow
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.models.vae import VideoVAE
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.parallel.dims import ParallelDims, cuda_index
from vidscale.scaling.parallel.parallelize import build_model, parallelize
from vidscale.scaling.parallel.sequence import _block_attn, _block_attn_grad, kernel_inputs
from vidscale.scaling.train.engine import TorchEngine
from vidscale.scaling.train.samples import TrainingSamples
from vidscale.scaling.train.tasks import VAETask, build_objective, vae_config
from vidscale.scaling.train.zero import deepspeed_config

from conftest import DEBUG, ROOT, debug_config


# -- varlen inputs: one flash dtype for q, k, v ----------------------------------------------------
def test_qk_norm_under_autocast_gives_fp32_q_k_and_flash_inputs_cast_them_to_v():
    norm = RMSNorm(8)
    x = torch.randn(6, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = torch.nn.Linear(8, 8)
        v = lin(x)  # bf16 under autocast
        q = norm(v.float())  # what QK-norm hands on: fp32
    assert v.dtype == torch.bfloat16 and q.dtype == torch.float32
    out = flash_inputs(q, q, v)
    assert [t.dtype for t in out] == [torch.bfloat16] * 3
    assert torch.equal(out[0], q.to(torch.bfloat16)) and out[2] is v
    # an fp32 recipe: all three go to bf16 (the varlen kernel casts its output back)
    assert {t.dtype for t in flash_inputs(q, q, q)} == {torch.bfloat16}
    half = v.half()
    assert {t.dtype for t in flash_inputs(q, q, half)} == {torch.float16}


def test_sequence_parallel_attention_casts_qk_norm_outputs_before_the_all_to_all():
    """Ulysses stacks q, k, v for its all-to-all: with fp32 q, k (QK-norm under CUDA autocast)
    beside a bf16 v the stack promoted all three to fp32, so twice the bytes travelled and the
    ring never reached its flash kernel. `kernel_inputs` casts them to v's dtype first."""
    q, k = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    v = torch.randn(6, 2, 8).to(torch.bfloat16)
    got = kernel_inputs(q, k, v, cuda=True)  # what a CUDA rank stacks
    assert [t.dtype for t in got] == [torch.bfloat16] * 3 and got[2] is v
    assert torch.equal(got[0], q.to(torch.bfloat16)) and torch.equal(got[1], k.to(torch.bfloat16))
    assert torch.stack(got, 1).dtype == torch.bfloat16 and torch.stack([q, k, v], 1).dtype == torch.float32
    assert [t.dtype for t in kernel_inputs(q, k, v.half(), cuda=True)] == [torch.float16] * 3
    # an fp32 recipe keeps the ring's exact fp32 path; the CPU (q's device by default) is left as it was
    for args in ((q, k, q, True), (q, k, v, None)):
        assert all(a is b for a, b in zip(kernel_inputs(*args[:3], cuda=args[3]), args[:3]))


def test_a_varlen_kernel_exists_for_the_installed_torch():
    # torch >= 2.10 ships torch.nn.attention.varlen; older ones fall back to SDPA per video
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 10):
        pytest.skip(f"torch {torch.__version__}: no torch varlen kernel (SDPA per video is used)")
    assert varlen_available()


def test_cu_seqlens_are_built_once_on_the_batch_device():
    vids = [synthetic_video(i, 0, 4, [1, 2], [[8, 8]], [2, 4], 16, [1, 2, 2]) for i in range(3)]
    _, meta = pack([v[0] for v in vids], [v[1] for v in vids], (1, 2, 2), pad_to=64)
    moved = meta.to("meta")
    assert moved.cu is not None and moved.cu.device.type == "meta"
    assert moved.cu_seqlens("meta") is moved.cu  # every layer reuses it: no host copy per layer
    assert meta.cu_seqlens().tolist() == [0] + [e for _, e in meta.segments()]
    assert meta.to("cpu").cu is None  # CPU: nothing to copy


# -- tables and buffers follow their device ---------------------------------------------------------
class MixedDevices(TorchDispatchMode):
    """Records every op whose tensor arguments live on more than one device (a CPU scalar
    aside, which CUDA kernels accept): on a GPU each is an error; the meta device lets
    the CPU stand in for it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        devs = {a.device.type for a in flat if not (a.device.type == "cpu" and a.dim() == 0)}
        if len(devs) > 1:
            self.ops.append((str(func), sorted(devs)))
        return func(*args, **(kwargs or {}))


def test_ddpm_indexes_its_table_on_the_index_device():
    ddpm = DDPM(num_steps=50)
    x0, noise = torch.randn(5, 3, device="meta"), torch.randn(5, 3, device="meta")
    t_tok = torch.tensor([0, 10, 20, 30, 49], device="meta")
    with MixedDevices() as mixed:
        assert ddpm.q_sample(x0, t_tok, noise).device.type == "meta"
    assert mixed.ops == []
    # the same numbers on the CPU as the closed form
    x0c, nc = torch.randn(5, 3), torch.randn(5, 3)
    got = ddpm.q_sample(x0c, torch.tensor([0, 10, 20, 30, 49]), nc)
    abar = ddpm.alphas_cumprod[[0, 10, 20, 30, 49]].float()[:, None]
    torch.testing.assert_close(got, abar.sqrt() * x0c + (1 - abar).sqrt() * nc)


@pytest.mark.parametrize("objective", [DDPM(num_steps=20), RectifiedFlow()])
def test_samplers_hand_the_model_timesteps_on_the_noise_device(objective):
    seen = []

    def model_fn(x, t_V):
        seen.append(t_V.device.type)
        return torch.zeros_like(x)

    noise = torch.randn(6, 4).to("meta")
    with MixedDevices() as mixed:
        out = objective.sample(model_fn, noise, 1, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and seen and set(seen) == {"meta"}
    assert mixed.ops == []


def test_wan_vae_keeps_latent_mean_and_std_on_its_device(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the [vae] extra is not installed")
    from vidscale.models.latent import DiffusersVAE
    vae = diffusers.AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.5] * 4,
                                     latents_std=[2.0] * 4)
    vae.save_pretrained(tmp_path / "wan")
    enc = DiffusersVAE("wan", tmp_path / "wan", device="meta")
    assert enc.mean.device.type == "meta" and enc.std.device.type == "meta"


# -- which device a rank trains on ------------------------------------------------------------------
def test_each_rank_picks_a_visible_cuda_device():
    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))  # every GPU visible to every rank
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # Ray / Slurm: one GPU bound per rank
    assert [cuda_index(r, 2) for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="no CUDA device"):
        cuda_index(0, 0)


def test_ray_workers_without_gpus_train_on_the_cpu():
    cfg = load_config(DEBUG, ["cluster.launcher=ray", "cluster.nproc=2", "cluster.gpus_per_worker=0"])
    assert cfg.train.device == "auto" and worker_config(cfg).train.device == "cpu"
    gpu = load_config(DEBUG, ["cluster.launcher=ray", "cluster.gpus_per_worker=1"])
    assert worker_config(gpu).train.device == "auto"
    bad = load_config(DEBUG, ["cluster.launcher=ray", "train.device=cuda"])
    with pytest.raises(ValueError, match="gpus_per_worker") as e:
        worker_config(bad)
    assert "\n" not in str(e.value)


# -- numerics under bf16 ----------------------------------------------------------------------------
def _ac_grads(ac: bool, offload: bool = False):
    cfg = load_config(DEBUG, [f"model.activation_checkpointing={str(ac).lower()}", f"model.ac_offload={str(offload).lower()}",
                              "parallel.zero_stage=0"])
    model = parallelize(build_model(lambda: VideoDiT(model_config(cfg.model)), torch.device("cpu"), 0),
                        ParallelDims(world=1, rank=0), cfg.model)
    with torch.no_grad():  # adaLN-Zero starts at zero output: give every block a real one
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    vids = [synthetic_video(i, 0, 4, [1, 4], [[8, 8]], [4, 8], 384, [1, 2, 2]) for i in range(2)]
    tokens, meta = pack([v[0] for v in vids], [v[1] for v in vids], (1, 2, 2))
    obj = build_objective(cfg.objective)
    g = torch.Generator().manual_seed(1)
    t, noise = obj.sample_t(meta.num_videos, g), torch.randn(tokens.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = obj.loss_terms(lambda x, tm: model(x, tm, meta), tokens, t, noise, meta.seg_ids)
    (terms * meta.real_mask()).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("offload", [False, True])
def test_activation_checkpointing_recomputes_under_the_forwards_bf16_autocast(offload):
    ref = _ac_grads(False)
    got = _ac_grads(True, offload)
    for n in ref:  # the same bf16 computation, recomputed: equal gradients
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)


def test_ring_block_fallback_computes_fp32_under_autocast_in_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 2, 8, generator=g) for _ in range(3))
    do = torch.randn(16, 2, 8, generator=g)
    scale = 1 / math.sqrt(8)
    ref_o, ref_lse = _block_attn(q, k, v, scale, cpu_flash=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = _block_attn(q, k, v, scale, cpu_flash=False)
        grads = _block_attn_grad(do, q, k, v, o, lse, scale, cpu_flash=False)
    assert o.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    # the gradients are those of fp32 attention
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = sdpa_dense(qr, kr, vr, _one_segment(16))
    ref.backward(do)
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _one_segment(n):
    from vidscale.models.packed import PackedMeta
    return PackedMeta(bounds=(0, n), seq_len=n, coords=torch.zeros(n, 3, dtype=torch.long),
                      seg_ids=torch.zeros(n, dtype=torch.long), text=torch.zeros(0, 1), text_bounds=(0, 0),
                      grid=((n, 1, 1),))


def test_bf16_zero_reduces_and_accumulates_gradients_in_fp32_by_default():
    cfg = debug_config("train.dtype=bf16")
    dims = ParallelDims(world=2, rank=0)
    ds = deepspeed_config(cfg, dims, torch.device("cuda"))  # only the config: no GPU needed
    assert ds["bf16"]["enabled"] and ds["communication_data_type"] == "fp32"
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    ds = deepspeed_config(debug_config("train.dtype=bf16", "parallel.grad_dtype=bf16"), dims, torch.device("cuda"))
    assert ds["communication_data_type"] == "bf16"
    assert "communication_data_type" not in deepspeed_config(cfg, dims, torch.device("cpu"))  # CPU: fp32 states


def test_samples_during_training_run_under_the_recipes_autocast_with_bf16_weights(tmp_path):
    cfg = debug_config("train.dtype=bf16", "parallel.zero_stage=0", "logging.tensorboard=false",
                       "logging.sample_prompts=[a]")
    dims = ParallelDims(world=1, rank=0)
    model = build_model(lambda: VideoDiT(model_config(cfg.model)), torch.device("cpu"), 0)
    engine = TorchEngine(model, cfg.optim, 10)
    model.to(torch.bfloat16)  # what DeepSpeed holds under bf16 on GPU
    TrainingSamples(cfg, dims, torch.device("cpu")).write(engine, build_objective(cfg.objective), 1, tmp_path)
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 1


def test_vae_psnr_runs_under_the_recipes_autocast_with_bf16_weights():
    cfg = load_config(ROOT / "recipes/vae-debug.yaml", ["train.dtype=bf16"])
    task = VAETask(cfg, ParallelDims(world=1, rank=0), torch.device("cpu"))
    vae = VideoVAE(vae_config(cfg))
    vae.init_weights() if hasattr(vae, "init_weights") else None
    engine = TorchEngine(vae, cfg.optim, 10)
    vae.to(torch.bfloat16)
    task._val = [torch.rand(1, 3, 9, 32, 32) * 2 - 1]
    psnr = task.val_psnr(engine)
    assert math.isfinite(psnr) and psnr > 0
