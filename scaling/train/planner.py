"""Will a recipe fit its GPUs, and how long will it take? Memory per rank and step time, before launch.

    p = plan(cfg, gpus=8, gpu_memory_gb=80)      # {"memory": {...}, "fits": bool, "time": {...}}
    fix = smallest_fix(cfg, gpus=8, gpu_memory_gb=80)   # (overrides, plan) or None

Memory (bytes on one rank, what the device holds at the backward's peak):
  parameters, master weights, optimizer moments, gradients, EMA   by ZeRO stage, dtype, offload
  zero3_gathered        what ZeRO-3 keeps gathered: up to `parallel.max_live_parameters` (reused
                        within that distance), the prefetch bucket and the two largest modules
  zero3_persistent      parameters below `parallel.persistence_threshold`, whole on every rank
  reduce_bucket         the gradient bucket ZeRO reduces from (stages 2, 3)
  activations           the bytes autograd saves for backward, TRACED: the recipe's model is
                        built on the meta device (no memory, no compute) and one forward of this
                        rank's tokens is run under `saved_tensors_hooks`, counting each saved
                        storage once and no parameter; with activation checkpointing, the block
                        inputs plus one block recomputed; with `ac_offload`, only that block
  attention_workspace   the kernel's own buffers (ring: K/V in flight and fp32 accumulators;
                        Ulysses: all-to-all buffers; dense: the [H, L, L] scores)
  loader                the packed batch on the device (tokens, noise, targets, text)
  runtime               CUDA context and allocator slack (`plan.runtime_gb`)
Time: training FLOPs of a full batch (scaling/train/flops.py, x4/3 with recomputation) at
`plan.mfu` of `--gpu-tflops`, plus ZeRO's parameter all-gathers and gradient reduce-scatter and
the sequence-parallel all-to-all / ring traffic at `plan.bandwidth_gb_s` per rank, and offload's
host copies at `plan.host_bandwidth_gb_s`, not overlapped (an upper bound on a step; DeepSpeed
overlaps part of it; the host optimizer's own time under offload is not modelled).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from vidscale.models.attention import SelfAttention
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import PackedMeta
from vidscale.models.sizes import param_count
from vidscale.scaling.config import Config, model_config, set_values
from vidscale.scaling.parallel.parallelize import apply_ac
from vidscale.scaling.train.flops import forward_flops

GB = 2 ** 30


class _FlashLike(torch.autograd.Function):
    """What a flash / varlen / per-video SDPA kernel keeps for backward: q, k, v, out and an fp32
    log-sum-exp [H, L]. Used only to trace saved bytes on the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(v)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # never run: the trace only counts
        return g, g, g


def _dense_like(q, k, v, meta):
    """The dense reference: SDPA with a mask, which keeps the [H, L, L] scores (math kernel)."""
    s = torch.empty(q.shape[1], q.shape[0], k.shape[0], dtype=q.dtype, device=q.device, requires_grad=True)
    return _FlashLike.apply(q, k, v) + 0 * s.sum()


def _trace_meta(cfg: Config, tokens: int, dtype: torch.dtype, device: str) -> PackedMeta:
    """One video of `tokens` tokens with the recipe's longest caption."""
    text = cfg.data.text_tokens[1]
    return PackedMeta(bounds=(0, tokens), seq_len=tokens, coords=torch.zeros(tokens, 3, dtype=torch.long, device=device),
                      seg_ids=torch.zeros(tokens, dtype=torch.long, device=device),
                      text=torch.zeros(text, cfg.model.text_dim, dtype=dtype, device=device), text_bounds=(0, text),
                      grid=((1, 1, tokens),))


def saved_bytes(cfg: Config, tokens: int, dtype: torch.dtype, checkpointed: bool = False,
                depth: int | None = None, device: str = "cuda") -> int:
    """Bytes autograd keeps for backward after one forward of `tokens` tokens.

    device "cuda": traced on the meta device (no memory, no compute; any model size) with the
    GPU's code paths (gathered modulation, a flash-like kernel). device "cpu": one real forward on
    the CPU with the CPU's own paths (for `vidscale bench plan`'s small models)."""
    # the kernel is replaced for the trace (meta), or the CPU's own runs: no GPU needed to plan varlen
    mcfg = replace(model_config(cfg.model), attn_backend="sdpa")
    if depth is not None:
        mcfg = replace(mcfg, depth=depth)
    on = "meta" if device == "cuda" else "cpu"
    with torch.device(on):
        model = VideoDiT(mcfg).to(dtype)
    if on == "meta":
        kernel = _dense_like if cfg.model.attn_backend == "dense" else (lambda q, k, v, meta: _FlashLike.apply(q, k, v))
        for m in model.modules():
            if isinstance(m, SelfAttention):
                m.kernel = kernel
        model.gather_modulation = True  # the GPU path
    else:
        model.init_weights()
    if checkpointed:
        apply_ac(model, offload=False)
    key = (lambda st: st._cdata) if on == "meta" else (lambda st: st.data_ptr())
    params = {key(p.untyped_storage()) for p in model.parameters()}
    seen: dict[int, int] = {}
    keep = []

    def pack(t):
        st = t.untyped_storage()
        if key(st) not in params:
            seen[key(st)] = st.nbytes()
            keep.append(t)  # alive until counted: storages are not reused meanwhile
        return t

    x = torch.zeros(tokens, mcfg.patch_dim, dtype=dtype, device=on)
    t = torch.full((1,), 500.0, dtype=dtype, device=on)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, _trace_meta(cfg, tokens, dtype, on))
    return sum(seen.values())


def _bf16(cfg: Config, device: str = "cuda") -> bool:
    """DeepSpeed holds bf16 weights: bf16 recipes on GPU (on the CPU bf16 is autocast only)."""
    return cfg.train.dtype == "bf16" and device == "cuda"


def memory(cfg: Config, gpus: int, device: str = "cuda") -> dict[str, int]:
    """Bytes per rank on the device, by part (module docstring). `device` "cpu": the CPU run's
    figures (fp32 weights, the CPU's code paths, no CUDA runtime), what `bench plan` measures."""
    p, mcfg = cfg.parallel, model_config(cfg.model)
    N = param_count(mcfg)
    W, stage = gpus, p.zero_stage
    sp = p.ulysses * p.ring
    bf16 = _bf16(cfg, device)
    pb = 2 if bf16 and stage > 0 else 4  # bf16 weights under DeepSpeed; torch engine: fp32 + autocast
    gb = 4 if p.grad_dtype == "fp32" or not bf16 else 2
    shard = N / W if stage >= 1 else N
    host_opt = p.offload_optimizer
    m: dict[str, float] = {}
    m["parameters"] = (0 if p.offload_params else N * pb / W) if stage == 3 else N * pb
    # DeepSpeed's optimizer keeps its own fp32 copy of its partition (a clone, also in fp32)
    m["master_weights"] = 0 if host_opt or stage == 0 else 4 * shard
    m["optimizer_states"] = 0 if host_opt else 8 * shard
    if stage == 0:
        m["gradients"] = 4 * N
    elif stage == 1:
        m["gradients"] = N * pb + (0 if host_opt else gb * shard)
    else:
        m["gradients"] = 0 if host_opt and stage == 3 else gb * shard
    ema_shard = N / W if stage == 3 else N
    m["ema"] = 0 if cfg.optim.ema_decay <= 0 or (stage == 3 and host_opt) else 4 * ema_shard
    # after the first step DeepSpeed keeps parameters gathered that are used again within
    # max_live_parameters elements: a model below that stays whole from forward to backward
    largest = _largest_modules(mcfg)
    m["zero3_gathered"] = min(N, p.max_live_parameters + p.prefetch_bucket_size + 2 * largest) * pb if stage == 3 else 0
    m["zero3_persistent"] = _small_params(mcfg, p.persistence_threshold) * pb if stage == 3 else 0
    m["reduce_bucket"] = p.reduce_bucket_size * gb if stage >= 2 else 0
    act_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and device == "cuda" else torch.float32
    L = cfg.train.tokens_per_batch // sp  # this rank's tokens
    m["activations"] = activations(cfg, L, act_dtype, device)
    ab = 2 if act_dtype == torch.bfloat16 else 4
    D, H = mcfg.hidden, mcfg.heads
    work = 0
    if cfg.model.attn_backend == "dense":
        work += H * L * sp * L * sp * 4
    if p.ring > 1:  # K/V in flight (two blocks), fp32 output / lse accumulators, fp32 dK/dV and dQ
        work += 2 * 2 * L * D * ab + L * D * 4 + H * L * 4 + 3 * L * D * 4
    if p.ulysses > 1:  # send and receive buffers of q, k, v
        work += 2 * 3 * L * D * ab
    m["attention_workspace"] = work
    # fp32 weights under bf16 autocast (the plain torch engine): autocast caches a bf16 copy of
    # every weight for the forward, and backward keeps them
    m["autocast_weight_copies"] = 2 * N if stage == 0 and cfg.train.dtype == "bf16" and device == "cuda" else 0
    m["loader"] = 4 * cfg.train.tokens_per_batch * mcfg.patch_dim * 4
    m["runtime"] = cfg.plan.runtime_gb * GB if device == "cuda" else 0
    return {k: int(v) for k, v in m.items()}


def activations(cfg: Config, L: int, dtype: torch.dtype, device: str = "cuda") -> int:
    """Saved activations of one micro-batch of L local tokens (module docstring)."""
    def traced(**kw):
        return saved_bytes(cfg, L, dtype, device=device, **kw)

    if not cfg.model.activation_checkpointing:
        return traced()
    block = traced(depth=1) - traced(depth=0)
    if cfg.model.ac_offload:  # block inputs in host memory: the recomputed block, and what lies outside blocks
        return traced(depth=0) + block
    return traced(checkpointed=True) + block


def _largest_modules(mcfg) -> int:
    D, Mh = mcfg.hidden, mcfg.mlp_hidden
    return max(D * Mh + Mh, D * 6 * D + 6 * D) + D * 3 * D


def _small_params(mcfg, threshold: int) -> int:
    if threshold <= 0:
        return 0
    with torch.device("meta"):
        model = VideoDiT(replace(mcfg, attn_backend="sdpa"))  # parameters only: any kernel
    return sum(p.numel() for p in model.parameters() if p.numel() < threshold)


def step_time(cfg: Config, gpus: int, tflops: float, device: str = "cuda") -> dict[str, float]:
    """Seconds per optimizer step on each rank: compute at `plan.mfu`, plus communication."""
    p, mcfg = cfg.parallel, model_config(cfg.model)
    N = param_count(mcfg)
    sp = p.ulysses * p.ring
    L = cfg.train.tokens_per_batch
    text = cfg.data.text_tokens[1]
    fwd = forward_flops(mcfg, [L], [text], 1)
    flops = (4 if cfg.model.activation_checkpointing else 3) * fwd * cfg.train.grad_accum / sp
    compute = flops / (tflops * 1e12 * cfg.plan.mfu)
    W = gpus
    pb = 2 if _bf16(cfg, device) and p.zero_stage > 0 else 4
    gb = 4 if p.grad_dtype == "fp32" or not _bf16(cfg, device) else 2
    frac = (W - 1) / W
    passes = 3 if cfg.model.activation_checkpointing else 2  # forward, backward (, recompute) gathers
    if p.zero_stage == 3:
        zero = (passes * pb * cfg.train.grad_accum + gb * cfg.train.grad_accum) * N * frac
    elif p.zero_stage in (1, 2):
        zero = (gb * cfg.train.grad_accum + pb) * N * frac
    else:
        zero = 0.0
    ab = 2 if cfg.train.dtype == "bf16" and device == "cuda" else 4
    D = mcfg.hidden
    Ll = L / sp
    fwd_passes = 2 if cfg.model.activation_checkpointing else 1
    sp_bytes = 0.0
    if p.ulysses > 1:  # four all-to-alls per layer each way (q, k, v in; out back)
        u = p.ulysses
        sp_bytes += (fwd_passes + 1) * 4 * Ll * D * ab * (u - 1) / u * mcfg.depth
    if p.ring > 1:  # K, V around the ring forward; K, V and fp32 dK, dV backward
        R = p.ring
        sp_bytes += (R - 1) * Ll * D * (fwd_passes * 2 * ab + 2 * ab + 2 * 4) * mcfg.depth
    sp_bytes *= cfg.train.grad_accum
    bw = cfg.plan.bandwidth_gb_s * 1e9
    comm = (zero + sp_bytes) / bw
    # offload: gradients to the host and updated weights back, once per step, over PCIe
    shard = N / W if p.zero_stage >= 1 else N
    host = ((gb + pb) * shard if p.offload_optimizer else 0) + (passes * pb * shard * cfg.train.grad_accum
                                                                if p.offload_params else 0)
    host_s = host / (cfg.plan.host_bandwidth_gb_s * 1e9)
    step = compute + comm + host_s
    dp = W // sp
    tokens_per_s = dp * L * cfg.train.grad_accum / step
    return {"compute_s": compute, "zero_comm_s": zero / bw, "sp_comm_s": sp_bytes / bw, "offload_s": host_s,
            "step_s": step,
            "tokens_per_s": tokens_per_s, "days": cfg.train.steps * step / 86400, "flops_per_step": flops * sp}


def plan(cfg: Config, gpus: int, gpu_memory_gb: float, tflops: float | None = None) -> dict:
    """The memory breakdown, whether it fits `gpu_memory_gb`, and the step time on `gpus` GPUs."""
    sp = cfg.parallel.ulysses * cfg.parallel.ring
    if gpus < 1 or gpus % sp:
        raise ValueError(f"--gpus {gpus}: expected a positive multiple of parallel.ulysses x parallel.ring = {sp}")
    if cfg.parallel.zero_stage == 0 and gpus > 1:
        raise ValueError(f"--gpus {gpus}: parallel.zero_stage=0 runs one process; set parallel.zero_stage")
    mem = memory(cfg, gpus)
    total = sum(mem.values())
    t = step_time(cfg, gpus, tflops or cfg.plan.gpu_tflops)
    return {"recipe": cfg.name, "gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "params": param_count(model_config(cfg.model)),
            "memory": mem, "total_bytes": total, "total_gb": total / GB, "fits": total <= gpu_memory_gb * GB,
            "time": t}


def _candidates(cfg: Config, gpus: int):
    """Single-knob changes, each at its smallest step first: (description, {key: value})."""
    if not cfg.model.activation_checkpointing:
        yield "activation checkpointing", {"model.activation_checkpointing": True}
    heads = model_config(cfg.model).heads
    u = cfg.parallel.ulysses
    while u * 2 <= gpus // cfg.parallel.ring:
        u *= 2
        if heads % u == 0 and gpus % (u * cfg.parallel.ring) == 0:
            yield f"Ulysses sequence parallelism {u}", {"parallel.ulysses": u}
    if cfg.parallel.zero_stage == 3:
        if not cfg.parallel.offload_optimizer:
            yield "optimizer offload", {"parallel.offload_optimizer": True}
        if not cfg.parallel.offload_params:
            yield "optimizer and parameter offload", {"parallel.offload_optimizer": True, "parallel.offload_params": True}
    if cfg.model.activation_checkpointing and not cfg.model.ac_offload:
        yield "activation offload", {"model.ac_offload": True}
    tpb, ga = cfg.train.tokens_per_batch, cfg.train.grad_accum
    while tpb >= 2048:
        tpb, ga = tpb // 2, ga * 2  # the same tokens per optimizer step
        yield f"tokens per batch {tpb} (grad_accum {ga})", {"train.tokens_per_batch": tpb, "train.grad_accum": ga}


def smallest_fix(cfg: Config, gpus: int, gpu_memory_gb: float, tflops: float | None = None):
    """The change of one knob that fits and keeps the most tokens/s: (description, overrides, plan),
    or None when no single knob fits."""
    best = None
    for what, values in _candidates(cfg, gpus):
        try:
            c = set_values(cfg, values)
            p = plan(c, gpus, gpu_memory_gb, tflops)
        except ValueError:
            continue
        if p["fits"] and (best is None or p["time"]["tokens_per_s"] > best[2]["time"]["tokens_per_s"]):
            best = (what, values, p)
    return best


def human(p: dict) -> str:
    """The plan as lines of text."""
    lines = [f"{p['recipe']}: {p['params'] / 1e9:.2f}B parameters on {p['gpus']} GPUs of {p['gpu_memory_gb']:g} GB"]
    for k, v in p["memory"].items():
        lines.append(f"  {k:<20} {v / GB:9.2f} GB")
    lines.append(f"  {'total':<20} {p['total_gb']:9.2f} GB  ({'fits' if p['fits'] else 'DOES NOT FIT'})")
    t = p["time"]
    lines.append(f"  step {t['step_s']:.3f} s (compute {t['compute_s']:.3f}, ZeRO {t['zero_comm_s']:.3f}, "
                 f"sp {t['sp_comm_s']:.3f}); {t['tokens_per_s']:,.0f} tokens/s; {t['days']:.2f} days for the steps")
    return "\n".join(lines)

