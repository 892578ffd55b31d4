"""The training loop: `train(cfg)` is the one entry point every launcher calls.

Per step: fetch the step's packed micro-batches for this data-parallel rank, count the
real tokens of the whole step across data-parallel ranks, take this rank's sequence
slice, draw timesteps and noise from a generator keyed by (seed, step, micro, dp rank),
and back-propagate sum(token losses) * engine.loss_scale / (real tokens of the step).
That normalisation makes the gradient the mean over every real token of the optimizer
step, whatever the padding, the uneven sp slices or the ZeRO averaging (see zero.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vidscale.data.loader import build_loader
from vidscale.models.diffusion import make_objective
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import PackedMeta
from vidscale.scaling.config import Config, model_config, save_config
from vidscale.scaling.train.flops import measure_peak_flops, train_flops
from vidscale.scaling.train.metrics import MetricsLogger
from vidscale.scaling.parallel.dims import ParallelDims, pick_backend, pick_device
from vidscale.scaling.train import signals


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, micro: int, dp_rank: int) -> torch.Generator:
    """Same (step, micro, dp rank) -> same timesteps and noise, on any sp layout or restart."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 65_537 + dp_rank)


def build_objective(cfg: Config):
    o = cfg.objective
    if o.name == "ddpm":
        return make_objective("ddpm", num_steps=o.num_steps, schedule=o.schedule)
    return make_objective("flow", logit_mean=o.logit_mean, logit_std=o.logit_std, shift=o.shift)


def drop_captions(meta: PackedMeta, p: float, gen: torch.Generator) -> PackedMeta:
    """Classifier-free guidance training: empty the caption of each video with probability p."""
    if p <= 0:
        return meta
    keep = torch.rand(meta.num_videos, generator=gen) >= p
    pieces, bounds = [], [0]
    for i in range(meta.num_videos):
        s, e = meta.text_bounds[i], meta.text_bounds[i + 1]
        if keep[i]:
            pieces.append(meta.text[s:e])
        bounds.append(bounds[-1] + (e - s if keep[i] else 0))
    text = torch.cat(pieces) if pieces else meta.text[:0]
    return replace(meta, text=text, text_bounds=tuple(bounds))


def clean_frames_mask(meta: PackedMeta, max_frames: int, channels: int, patch, gen: torch.Generator):
    """Image-to-video training: [L, P] bool marking a random number (0..max_frames, at least
    one frame left to denoise) of leading latent frames per video, given clean and not in
    the loss. None when off. Drawn on the full batch, before any sequence-parallel slice."""
    if max_frames <= 0:
        return None
    from vidscale.models.packed import patchify
    pt, ph, pw = patch
    mask = torch.zeros(meta.seq_len, channels * pt * ph * pw, dtype=torch.bool)
    ks = torch.randint(0, max_frames + 1, (meta.num_videos,), generator=gen)
    for i, (Tg, Hg, Wg) in enumerate(meta.grid):
        k = min(int(ks[i]), Tg * pt - 1)
        if k > 0:
            m = torch.zeros(channels, Tg * pt, Hg * ph, Wg * pw)
            m[:, :k] = 1
            mask[meta.bounds[i]:meta.bounds[i + 1]] = patchify(m, patch) > 0.5
    return mask


def diffusion_inputs(objective, tokens_LP: torch.Tensor, meta: PackedMeta, gen: torch.Generator):
    """Timesteps [V] and noise [L, P] for a full (unsharded) packed batch."""
    t_V = objective.sample_t(meta.num_videos, gen)
    noise = torch.randn(tokens_LP.shape, generator=gen, dtype=tokens_LP.dtype)
    return t_V, noise


def build_model(cfg: Config, device: torch.device, make_model=None) -> VideoDiT:
    """Construct on the meta device, materialise on `device`, then `init_weights()`."""
    with torch.device("meta"):
        model = make_model() if make_model is not None else VideoDiT(model_config(cfg.model))
    model = model.to_empty(device=device)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return model


def default_run_dir(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


class Trainer:
    """Holds everything a step needs. `train(cfg)` drives it; tests can drive it step by step."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.train.tune_malloc:
            from vidscale.scaling.train import host_memory
            host_memory.tune()
        self.dims = ParallelDims.from_env(cfg.parallel.ulysses, cfg.parallel.ring)
        mcfg = model_config(cfg.model)
        ParallelDims.validate(self.dims.world, cfg.parallel.ulysses, cfg.parallel.ring, mcfg.heads)
        self.device = pick_device(cfg.train.device, self.dims.local_rank)
        self.dims.init(pick_backend(cfg.parallel.backend, self.device), cfg.parallel.timeout_s)
        self.run_dir = Path(cfg.train.run_dir or default_run_dir(cfg)).absolute()
        self.is_main = self.dims.rank == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        seed_all(cfg.train.seed)
        self.mcfg = mcfg
        from vidscale.scaling.train.tasks import build_task
        self.task = build_task(cfg)  # what trains: the DiT, or the VAE (scaling/tasks.py)
        self.engine = self._build_engine()
        self.model = self.engine.module
        if cfg.model.compile:  # after the engine: ZeRO's hooks and the sp kernel are in place
            from vidscale.scaling.parallel.compile import apply_compile
            apply_compile(self.model)
        self.loader = self.task.build_loader(cfg, self.dims.dp_rank, self.dims.dp, multiple=self.dims.sp)
        self.objective = build_objective(cfg)
        self.step = 0
        self.tokens_seen = 0
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.train.dtype == "bf16" else None)
        from vidscale.scaling.checkpoint.manager import Checkpointer
        self.ckpt = Checkpointer(self)
        if cfg.checkpoint.resume:  # '' fresh, 'auto' latest complete, or a path
            self.ckpt.restore(cfg.checkpoint.resume)

    def _build_engine(self):
        if self.cfg.parallel.zero_stage == 0:
            if self.dims.world > 1:
                raise ValueError("parallel.zero_stage=0 runs a single process; use zero_stage 1-3 "
                                 f"for a world of {self.dims.world}")
            from vidscale.scaling.train.engine import TorchEngine
            return TorchEngine(build_model(self.cfg, self.device, self.task.make_model), self.cfg)
        from vidscale.scaling.train.zero import build_zero_engine
        return build_zero_engine(self.cfg, self.dims, self.device, self.task.make_model)

    # -- one optimizer step -----------------------------------------------------------
    def _global_sum(self, x: float | int) -> float:
        if not self.dims.distributed:
            return float(x)
        import torch.distributed as dist
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t, group=self.dims.group("dp"))
        return float(t.item())

    def micro_loss(self, tokens_LP, meta: PackedMeta, micro: int) -> tuple[torch.Tensor, int]:
        """Sum of this rank's real-token losses for one micro-batch, and its real-token count."""
        gen = step_generator(self.cfg.train.seed, self.step, micro, self.dims.dp_rank)
        meta = drop_captions(meta, self.cfg.objective.caption_dropout, gen)
        t_V, noise = diffusion_inputs(self.objective, tokens_LP, meta, gen)
        clean = clean_frames_mask(meta, self.cfg.objective.cond_frames, self.mcfg.in_channels, self.mcfg.patch, gen)
        if self.dims.sp > 1:
            n = meta.seq_len // self.dims.sp
            sl = slice(self.dims.sp_rank * n, (self.dims.sp_rank + 1) * n)
            tokens_LP, noise, meta = tokens_LP[sl], noise[sl], meta.shard(self.dims.sp_rank, self.dims.sp)
            clean = clean[sl] if clean is not None else None
        meta = meta.to(self.device)
        x0, noise, t_V = tokens_LP.to(self.device), noise.to(self.device), t_V.to(self.device)
        clean = clean.to(self.device) if clean is not None else None

        def model_fn(x_t, t_model):
            return self.model(x_t, t_model, meta)

        if self.autocast is not None:
            with self.autocast:
                terms = self.objective.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids, clean)
        else:
            terms = self.objective.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids, clean)
        real = meta.real_mask()
        return (terms * real).sum(), int(meta.num_real)

    split_profiler = None
    """A `StepProfiler` while a step is profiled for the time split (scaling/step_split.py)."""

    def _range(self, category: str):
        return self.split_profiler.range(category) if self.split_profiler is not None else contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimizer step over `train.grad_accum` micro-batches. Returns device tensors."""
        with self._range("data_wait"):
            batches = [next(self.loader) for _ in range(self.cfg.train.grad_accum)]
        local_real = sum(m.num_real for _, m in batches)
        global_real = self._global_sum(local_real)  # real tokens of the step, all dp ranks
        loss_sum = torch.zeros((), device=self.device)
        flops = 0
        for micro, (tokens, meta) in enumerate(batches):
            s, _ = self.task.micro_loss(self, tokens, meta, micro)
            self.engine.backward(s * (self.engine.loss_scale / global_real))
            loss_sum += s.detach()
            flops += self.task.flops(self, meta)
        with self._range("optimizer"):
            grad_norm = self.engine.step()
        self.step += 1
        self.tokens_seen += int(global_real)
        return {"loss_sum": loss_sum, "global_real": global_real, "grad_norm": grad_norm,
                "flops": flops / max(self.dims.sp, 1), "local_tokens": sum(m.seq_len for _, m in batches)}

    def reduce_loss(self, out: dict) -> float:
        """Mean loss per real token over the step, across dp and sp (a host sync: log steps only)."""
        s = out["loss_sum"].double().cpu()
        if self.dims.distributed:
            import torch.distributed as dist
            dist.all_reduce(s)
        return float(s) / out["global_real"]


def train(cfg: Config) -> dict:
    """Train a recipe. Runs on one process or as one rank of a torch.distributed world."""
    signals.clear()
    signals.install()  # SIGUSR1: save at the next step boundary, then exit EXIT_REQUEUE
    t_start = time.time()
    tr = Trainer(cfg)
    c = cfg
    tokens_at_start, run_flops = tr.tokens_seen, 0.0  # this process's share, for final.json
    peak = measure_peak_flops(tr.device, torch.bfloat16 if c.train.dtype == "bf16" else torch.float32,
                              seconds=0.5) if tr.is_main else 0.0
    log = MetricsLogger(tr.run_dir, tr.is_main, c.logging.tensorboard, c.logging.progress,
                        total=c.train.steps, initial=tr.step)
    if tr.is_main:
        (tr.run_dir / "peak_flops.json").write_text(json.dumps({"peak_flops": peak}))
    last_loss = float("nan")
    preempted = False
    t_last, tok_last, flops_acc = time.perf_counter(), 0, 0.0
    try:
        while tr.step < c.train.steps:
            split = None
            if tr.is_main and c.logging.split_every and (tr.step + 1) % (c.logging.every * c.logging.split_every) == 0:
                from vidscale.scaling.train.step_split import profile_step
                out, split, _ = profile_step(tr)  # a log step: the split goes into its record
            else:
                out = tr.train_step()
            flops_acc += out["flops"]
            run_flops += out["flops"]
            tok_last += out["local_tokens"]
            log.advance()
            extra = tr.task.after_step(tr)  # VAE: held-out PSNR; DiT: sample videos (every rank)
            if tr.step % c.logging.every == 0 or tr.step == c.train.steps:
                last_loss = tr.reduce_loss(out)
                dt = time.perf_counter() - t_last
                rec = {"loss": last_loss, "tokens": tr.tokens_seen, "lr": tr.engine.lr,
                       "grad_norm": float(out["grad_norm"]), "tokens_per_s": tok_last / dt,
                       "mfu": (flops_acc / dt) / peak if peak else 0.0,
                       "packing_efficiency": tr.loader.efficiency,
                       "skipped_samples": tr.loader.stats["skipped"],  # this rank's unreadable samples
                       "memory_gb": _memory_gb(tr.device)}
                if split:
                    rec.update({f"split.{k}": v for k, v in split.items()})
                log.log(tr.step, {**rec, **extra})
                t_last, tok_last, flops_acc = time.perf_counter(), 0, 0.0
            elif extra:
                log.log(tr.step, extra)
            # ranks agree on a save request (a collective and a host sync) only where the loop
            # syncs anyway: logging steps, save steps, the last step; one process: every step
            if (not tr.dims.distributed or tr.step % c.logging.every == 0 or tr.ckpt.should_save(tr.step)
                    or tr.step == c.train.steps):
                preempted = signals.agree(signals.save_requested(), tr.dims, tr.device)
            if tr.ckpt.should_save(tr.step) or preempted:
                tr.ckpt.save()
            if preempted:
                break
        if tr.ckpt.last_step != tr.step:  # the end of the run is always saved
            tr.ckpt.save()
        tr.ckpt.wait()
    finally:
        log.close()
    result = {"run_dir": str(tr.run_dir), "steps": tr.step, "loss": last_loss, "tokens": tr.tokens_seen,
              "preempted": preempted, "checkpoint_stall_s": tr.ckpt.stalls}
    if tr.step >= c.train.steps and c.train.val_videos > 0 and c.task == "dit":  # finished: the score a sweep fits
        from vidscale.scaling.train.evaluate import write_final
        result["val_loss"] = write_final(tr, result, time.time() - t_start, run_flops,
                                         tr.tokens_seen - tokens_at_start)["val_loss"]
    if tr.step >= c.train.steps:  # consolidated weights for `vidscale sample` (all ranks: a gather)
        from vidscale.scaling.checkpoint.weights import save_run_weights
        save_run_weights(tr)
    tr.dims.destroy()
    return result


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:
        return 0.0


if __name__ == "__main__":  # a rank started by a launcher: config path in the environment
    from vidscale.scaling.config import load_config
    import sys
    sys.exit(signals.EXIT_REQUEUE if train(load_config(os.environ["VIDSCALE_CONFIG"]))["preempted"] else 0)
