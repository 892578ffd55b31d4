"""What the train loop trains: one loop (engine, ZeRO, checkpoints, logging) serves the video
DiT and the video VAE. `Config.task` picks one; a task owns its model, data, loss and scores
and never reaches into the loop.

    task = build_task(cfg, dims, device)
    task.make_model()                             -> plain nn.Module (init_weights() after building)
    task.build_loader(dp_rank, dp, multiple, on_batch) -> iterator of (batch, meta); meta has num_real,
                                                  seq_len; on_batch(epoch, names) hears each batch taken
    task.micro_loss(model, batch, meta, step, i)  -> (sum of this rank's element losses, their count)
    task.flops(meta)                              -> training FLOPs of the micro-batch (0 when not modelled)
    task.after_step(engine, step, run_dir)        -> extra metrics for the log (every rank calls it)
    task.sample_files()                           -> sample files written since the last call (for the sinks)
    task.evaluate(engine)                         -> the held-out score a finished run reports (every rank)
    task.weights_metadata()                       -> what a weights file needs to rebuild the model
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Protocol

import torch

from vidscale.data.clips import ClipLoader
from vidscale.data.loader import OnBatch, build_loader
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import PackedMeta
from vidscale.models.vae import VAEConfig, VideoVAE
from vidscale.scaling.config import Config, model_config
from vidscale.scaling.objective import (build_objective, clean_frames_mask, diffusion_inputs, drop_captions,
                                        step_generator)
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import ParallelDims
from vidscale.scaling.train.evaluate import evaluate
from vidscale.scaling.train import precision
from vidscale.scaling.train.flops import train_flops
from vidscale.scaling.train.samples import TrainingSamples


class Task(Protocol):
    name: str

    def make_model(self) -> torch.nn.Module: ...

    def build_loader(self, dp_rank: int, dp: int, multiple: int = 1, on_batch: OnBatch | None = None) -> Iterator: ...

    def micro_loss(self, model, batch, meta, step: int, micro: int) -> tuple[torch.Tensor, int]: ...

    def flops(self, meta) -> float: ...

    def after_step(self, engine, step: int, run_dir: Path) -> dict: ...

    def sample_files(self) -> list[Path]: ...

    def evaluate(self, engine) -> dict[str, float]: ...

    def weights_metadata(self) -> dict[str, str]: ...


def autocast_for(cfg: Config, device: torch.device):
    """The forward's autocast context (bf16 recipes), or a no-op context."""
    return precision.autocast_for(cfg.train.dtype, device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU through pinned memory without blocking the host (a plain move elsewhere)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DiTTask:
    """The video diffusion transformer on packed latents.

    A micro-batch's loss: timesteps and noise from a generator keyed by (seed, step, micro,
    dp rank), drawn on the full packed batch, then this rank's sequence-parallel slice; the
    sum of the real tokens' losses (the loop normalises by the real tokens of the step).
    """
    name = "dit"

    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.mcfg = model_config(cfg.model)
        self.objective = build_objective(cfg.objective)
        self._samples = TrainingSamples(cfg, dims, device)
        self._written: list[Path] = []

    def make_model(self) -> torch.nn.Module:
        return VideoDiT(self.mcfg)

    def build_loader(self, dp_rank: int, dp: int, multiple: int = 1, on_batch: OnBatch | None = None):
        c = self.cfg
        return build_loader(c.data, seed=c.train.seed, tokens_per_batch=c.train.tokens_per_batch, patch=c.model.patch,
                            channels=c.model.in_channels, text_dim=c.model.text_dim, dp_rank=dp_rank, dp_size=dp,
                            multiple=multiple, on_batch=on_batch)

    def micro_loss(self, model, tokens_LP, meta: PackedMeta, step: int, micro: int) -> tuple[torch.Tensor, int]:
        """Sum of this rank's real-token losses for one micro-batch, and its real-token count."""
        c, d = self.cfg, self.dims
        gen = step_generator(c.train.seed, step, micro, d.dp_rank)
        meta = drop_captions(meta, c.objective.caption_dropout, gen)
        t_V, noise = diffusion_inputs(self.objective, tokens_LP, meta, gen)
        clean = clean_frames_mask(meta, c.objective.cond_frames, self.mcfg.in_channels, self.mcfg.patch, gen,
                                  c.objective.cond_mode)
        if d.sp > 1:
            n = meta.seq_len // d.sp
            sl = slice(d.sp_rank * n, (d.sp_rank + 1) * n)
            tokens_LP, noise, meta = tokens_LP[sl], noise[sl], meta.shard(d.sp_rank, d.sp)
            clean = clean[sl] if clean is not None else None
        meta = meta.to(self.device)
        x0, noise, t_V = (to_device(t, self.device) for t in (tokens_LP, noise, t_V))
        clean = to_device(clean, self.device) if clean is not None else None

        def model_fn(x_t, t_model):
            return model(x_t, t_model, meta)

        with autocast_for(c, self.device):
            terms = self.objective.loss_terms(model_fn, x0, t_V, noise, meta.seg_ids, clean)
        return (terms * meta.real_mask()).sum(), int(meta.num_real)

    def flops(self, meta) -> float:
        return train_flops(self.mcfg, meta)

    def after_step(self, engine, step: int, run_dir: Path) -> dict:
        every = self.cfg.logging.sample_every
        if every and (step % every == 0 or step == self.cfg.train.steps):
            self._written += self._samples.write(engine, self.objective, step, run_dir)
        return {}

    def sample_files(self) -> list[Path]:
        """The files `logging.sample_every` wrote since the last call (rank 0), for the sinks
        (wandb uploads them), so that no sink has to list RUN_DIR/samples."""
        out, self._written = self._written, []
        return out

    def evaluate(self, engine) -> dict[str, float]:
        if self.cfg.train.val_videos <= 0:
            return {}
        return {"val_loss": evaluate(engine.module, self.objective, self.cfg, self.dims, self.device,
                                     autocast_for(self.cfg, self.device))}

    def weights_metadata(self) -> dict[str, str]:
        return {}


def vae_config(cfg: Config) -> VAEConfig:
    v = cfg.vae
    return VAEConfig(z_dim=v.z_dim, base=v.base, mults=tuple(v.mults), temporal_down=tuple(v.temporal_down),
                     num_res=v.num_res)


def weights_metadata(cfg: Config) -> dict[str, str]:
    """What a weights file of a `cfg.task` model carries besides the recipe (`vidscale export`
    writes it too): a VAE's `vae_config`, which models/vae.load_vae rebuilds it from."""
    return {"vae_config": json.dumps(vae_config(cfg).to_dict())} if cfg.task == "vae" else {}


class VAETask:
    """The causal video VAE: reconstruction + beta * KL, PSNR on held-out clips."""
    name = "vae"

    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.vcfg = vae_config(cfg)
        self.loader: ClipLoader | None = None
        self._val = None

    def make_model(self) -> torch.nn.Module:
        return VideoVAE(self.vcfg)

    def build_loader(self, dp_rank: int, dp: int, multiple: int = 1, on_batch: OnBatch | None = None):
        if on_batch is not None:
            raise ValueError("data.record_consumed: the VAE's clip loader does not record its samples (task: vae)")
        self.loader = ClipLoader(self.cfg.data, self.cfg.vae, self.cfg.train.seed, dp_rank, dp)
        return self.loader

    def micro_loss(self, model, x, meta, step: int, micro: int) -> tuple[torch.Tensor, int]:
        gen = step_generator(self.cfg.train.seed, step, micro, self.dims.dp_rank)
        x = x.to(self.device)
        with autocast_for(self.cfg, self.device):
            recon, mean, logvar = model(x, gen)
        rec = (recon.float() - x.float()).pow(2).sum()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum()
        # KL per latent element, weighted like the per-pixel MSE: beta scales it per pixel
        return rec + self.cfg.vae.beta * kl * (x.numel() / mean.numel()), x.numel()

    def flops(self, meta) -> float:
        return 0.0  # conv FLOPs are not modelled: MFU reads 0 for VAE runs

    def after_step(self, engine, step: int, run_dir: Path) -> dict:
        c = self.cfg
        every = c.train.val_every
        if step == c.train.steps or (every and step % every == 0):
            return {"val_psnr": self.val_psnr(engine)}
        return {}

    def sample_files(self) -> list[Path]:
        return []

    def evaluate(self, engine) -> dict[str, float]:
        return {}  # the held-out PSNR is logged by after_step at the last step

    def weights_metadata(self) -> dict[str, str]:
        return weights_metadata(self.cfg)

    @torch.no_grad()
    def val_psnr(self, engine) -> float:
        """PSNR (dB, frames in [-1, 1]) of encode-mean -> decode over the held-out clips.
        Every rank calls it: under ZeRO-3 each forward is a collective, so ranks run the same
        number of forwards (padding rounds weigh 0)."""
        if self._val is None:
            self._val = self.loader.val_clips()
        clips, d = self._val, self.dims
        model = engine.model  # the plain VideoVAE (ZeRO-3's hooks gather its parameters)
        sse = torch.zeros(2, dtype=torch.float64)
        rounds = math.ceil(len(clips) / d.dp)
        was = model.training
        model.eval()
        for r in range(rounds):
            b = r * d.dp + d.dp_rank
            w = 1.0 if b < len(clips) else 0.0
            x = clips[b if w else 0].to(self.device)
            with autocast_for(self.cfg, self.device):  # bf16 weights under DeepSpeed on GPU
                mean, _ = model.encode_dist(x)
                y = model.decoder(mean)[:, :, :x.shape[2]].float().clamp(-1, 1)
            sse += w * torch.tensor([(y.double() - x.double()).pow(2).sum().item(), x.numel()], dtype=torch.float64)
        model.train(was)
        sse = collectives.sum_tensor(sse)
        mse = float(sse[0] / sse[1])
        return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def build_task(cfg: Config, dims: ParallelDims, device: torch.device) -> Task:
    return VAETask(cfg, dims, device) if cfg.task == "vae" else DiTTask(cfg, dims, device)
