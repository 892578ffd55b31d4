"""What the train loop trains: a small interface so one loop (engine, ZeRO, checkpoints,
logging) serves the video DiT and the video VAE. `Config.task` picks one.

    task.make_model()                      -> nn.Module (plain; init_weights() after building)
    task.build_loader(cfg, dp_rank, dp)    -> iterator of (batch, meta); meta has num_real, seq_len
    task.micro_loss(tr, batch, meta, i)    -> (sum of this rank's element losses, count)
    task.flops(tr, meta)                   -> training FLOPs of the micro-batch (0 when not modelled)
    task.after_step(tr)                    -> extra metrics for the log (every rank calls it)
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import torch

from vidscale.models.vae import VAEConfig, VideoVAE


class DiTTask:
    """The video diffusion transformer on packed latents (the loop's original job)."""
    name = "dit"

    def __init__(self, cfg):
        self.cfg = cfg
        self._sampler = None

    def make_model(self):
        from vidscale.models.dit import VideoDiT
        from vidscale.scaling.config import model_config
        return VideoDiT(model_config(self.cfg.model))

    def build_loader(self, cfg, dp_rank, dp, multiple=1):
        from vidscale.data.loader import build_loader
        return build_loader(cfg, dp_rank, dp, multiple=multiple)

    def micro_loss(self, tr, tokens, meta, micro):
        return tr.micro_loss(tokens, meta, micro)

    def flops(self, tr, meta):
        from vidscale.scaling.train.flops import train_flops
        return train_flops(tr.mcfg, meta)

    def after_step(self, tr) -> dict:
        every = self.cfg.logging.sample_every
        if every and (tr.step % every == 0 or tr.step == self.cfg.train.steps):
            from vidscale.scaling.train.samples import write_train_samples
            write_train_samples(tr)
        return {}


# -- the VAE task ----------------------------------------------------------------------------
def vae_config(cfg) -> VAEConfig:
    v = cfg.vae
    return VAEConfig(z_dim=v.z_dim, base=v.base, mults=tuple(v.mults), temporal_down=tuple(v.temporal_down),
                     num_res=v.num_res)


@dataclass
class ClipMeta:
    """What the loop reads of a micro-batch: its element count (the loss normaliser)."""
    num_real: int
    seq_len: int
    names: tuple = ()


class ClipLoader:
    """Pixel clips [1, 3, T, H, W] in [-1, 1], one per micro-batch, split over data-parallel ranks.

    Sources: data.source=synthetic (moving shapes rendered on the fly, data/shapes.py) or
    shards prepared with `data.encoder=raw`. The last `vae.val_clips` samples are held out.
    State: (epoch, position in this rank's list): exact resume on the same layout.
    """

    def __init__(self, cfg, dp_rank: int, dp: int):
        self.cfg, self.dp_rank, self.dp = cfg, dp_rank, dp
        self.epoch, self.pos = 0, 0
        self.efficiency = 1.0
        self.stats = {"skipped": 0}
        self.shards = None
        v = cfg.vae
        if cfg.data.source == "synthetic":
            n = cfg.data.synthetic_videos
            self.train_ids, self.val_ids = list(range(n)), list(range(n, n + v.val_clips))
        else:
            from vidscale.data.shards import ShardSource, read_index
            index = read_index(cfg.data.source)
            if index.get("encoder") != "raw":
                raise ValueError(f"data.source = {cfg.data.source!r} holds {index.get('encoder')!r} latents; a "
                                 f"'task: vae' run trains on pixels: prepare it with --set data.encoder=raw")
            self.shards = _RawShards(cfg)
            n = len(self.shards.src)
            if n <= v.val_clips:
                raise ValueError(f"data.source = {cfg.data.source!r}: {n} clips, not more than vae.val_clips="
                                 f"{v.val_clips} held out")
            self.train_ids, self.val_ids = list(range(n - v.val_clips)), list(range(n - v.val_clips, n))
        if len(self.train_ids) < dp:
            raise ValueError(f"data: {len(self.train_ids)} training clips for {dp} data-parallel ranks")

    def rank_ids(self, epoch: int) -> list[int]:
        ids = list(self.train_ids)
        random.Random(self.cfg.train.seed * 7919 + epoch).shuffle(ids)
        n = len(ids) // self.dp * self.dp
        return ids[:n][self.dp_rank::self.dp]

    def clip(self, i: int) -> torch.Tensor:
        c = self.cfg
        if self.shards is not None:
            x = self.shards.load(i)
        else:
            from vidscale.data.shapes import COLORS, MOTIONS, SHAPES, render
            rng = random.Random(c.train.seed * 1_000_003 + i)
            colors = list(COLORS)
            fg, bg = rng.sample(colors, 2)
            H, W = c.vae.crop if c.vae.crop[0] else (64, 64)
            f = render(rng.choice(SHAPES), fg, bg, rng.choice(list(MOTIONS)), H, W, c.vae.frames, seed=i)
            x = torch.from_numpy(f).permute(3, 0, 1, 2).float() / 127.5 - 1
        return x[None]

    def crop(self, x, i: int, train: bool):
        ch, cw = self.cfg.vae.crop
        H, W = x.shape[-2:]
        fs = 2 ** (len(self.cfg.vae.mults) - 1)
        ch, cw = (min(ch, H), min(cw, W)) if ch else (H, W)
        ch, cw = ch // fs * fs, cw // fs * fs
        if ch < fs or cw < fs:
            raise ValueError(f"clip {i}: {H}x{W} frames are smaller than the VAE's x{fs} compression")
        g = random.Random((self.cfg.train.seed * 1_000_003 + self.epoch) * 1_000_003 + i) if train else None
        y0 = g.randint(0, H - ch) if g else (H - ch) // 2
        x0 = g.randint(0, W - cw) if g else (W - cw) // 2
        return x[..., y0:y0 + ch, x0:x0 + cw].contiguous()

    def __iter__(self):
        return self

    def __next__(self):
        ids = self.rank_ids(self.epoch)
        if self.pos >= len(ids):
            self.epoch, self.pos = self.epoch + 1, 0
            ids = self.rank_ids(self.epoch)
        i = ids[self.pos]
        self.pos += 1
        x = self.crop(self.clip(i), i, train=True)
        return x, ClipMeta(num_real=x.numel(), seq_len=x.numel(), names=(str(i),))

    def val_clips(self) -> list[torch.Tensor]:
        return [self.crop(self.clip(i), i, train=False) for i in self.val_ids]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "dp": self.dp}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("dp", self.dp) != self.dp:
            warnings.warn("vae loader: resumed on another data-parallel size; the epoch restarts")
            self.epoch, self.pos = sd["epoch"], 0
            return
        self.epoch, self.pos = sd["epoch"], sd["pos"]


class _RawShards:
    """Random access to raw pixel shards (reads a shard up to the sample: fine for small sets)."""

    def __init__(self, cfg):
        from vidscale.data.shards import ShardSource
        c = cfg
        # the shard pre-flight compares channels with the DiT's in_channels: pixels have 3
        shim = type("C", (), {})()
        shim.data = c.data
        # one clip per micro-batch: no token budget to check (0 = none)
        shim.train = type("T", (), {"seed": c.train.seed, "tokens_per_batch": 0})()
        shim.model = type("M", (), {"in_channels": 3, "text_dim": _text_dim(c.data.source),
                                    "patch": [1, 1, 1]})()
        self.src = ShardSource(c.data.source, shim)
        self._cache: dict[int, torch.Tensor] = {}

    def load(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            lat, _, _ = self.src.load_one(i)
            self._cache[i] = lat.float()
        return self._cache[i]


def _text_dim(root) -> int:
    from vidscale.data.shards import read_index
    return int(read_index(root).get("text_dim") or 0)


class VAETask:
    """The causal video VAE: reconstruction + beta * KL, PSNR on held-out clips."""
    name = "vae"

    def __init__(self, cfg):
        self.cfg = cfg
        self.vcfg = vae_config(cfg)
        self._val = None

    def make_model(self):
        return VideoVAE(self.vcfg)

    def build_loader(self, cfg, dp_rank, dp, multiple=1):
        self.loader = ClipLoader(cfg, dp_rank, dp)
        return self.loader

    def micro_loss(self, tr, x, meta, micro):
        from vidscale.scaling.train.loop import step_generator
        gen = step_generator(self.cfg.train.seed, tr.step, micro, tr.dims.dp_rank)
        x = x.to(tr.device)
        ctx = tr.autocast if tr.autocast is not None else _null()
        with ctx:
            recon, mean, logvar = tr.model(x, gen)
        rec = (recon.float() - x.float()).pow(2).sum()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum()
        # KL per latent element, weighted like the per-pixel MSE: beta scales it per pixel
        return rec + self.cfg.vae.beta * kl * (x.numel() / mean.numel()), x.numel()

    def flops(self, tr, meta):
        return 0.0  # conv FLOPs are not modelled: MFU reads 0 for VAE runs

    def after_step(self, tr) -> dict:
        c = self.cfg
        every = c.train.val_every
        if tr.step == c.train.steps or (every and tr.step % every == 0):
            return {"val_psnr": self.val_psnr(tr)}
        return {}

    @torch.no_grad()
    def val_psnr(self, tr) -> float:
        """PSNR (dB, frames in [-1, 1]) of encode-mean -> decode over the held-out clips.
        Every rank calls it: under ZeRO-3 each forward is a collective, so ranks run the same
        number of forwards (padding rounds weigh 0)."""
        if self._val is None:
            self._val = self.loader.val_clips()
        clips, d = self._val, tr.dims
        model = getattr(tr.engine, "model", None) or tr.model  # the plain VideoVAE (ZeRO-3 hooks gather)
        sse = torch.zeros(2, dtype=torch.float64)
        rounds = math.ceil(len(clips) / d.dp)
        was = model.training
        model.eval()
        for r in range(rounds):
            b = r * d.dp + d.dp_rank
            w = 1.0 if b < len(clips) else 0.0
            x = clips[b if w else 0].to(tr.device)
            mean, _ = model.encode_dist(x)
            y = model.decoder(mean)[:, :, :x.shape[2]].clamp(-1, 1)
            sse += w * torch.tensor([(y.double() - x.double()).pow(2).sum().item(), x.numel()], dtype=torch.float64)
        model.train(was)
        if d.distributed:
            import torch.distributed as dist
            dist.all_reduce(sse)
        mse = float(sse[0] / sse[1])
        return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def build_task(cfg):
    return VAETask(cfg) if cfg.task == "vae" else DiTTask(cfg)

