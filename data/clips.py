"""Pixel clips for training a video VAE: one clip per micro-batch, split over data-parallel
ranks, with a held-out set for PSNR. Sources: moving shapes rendered on the fly
(`data.source=synthetic`, data/shapes.py) or shards prepared with `data.encoder=raw`."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

from vidscale.data.args import LoaderArgs
from vidscale.data.shapes import COLORS, MOTIONS, SHAPES, render
from vidscale.data.shards import ShardSource, read_index


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

    def __init__(self, data: LoaderArgs, vae, seed: int, dp_rank: int, dp: int):
        """data: the recipe's `data` section (source, synthetic_videos); vae: its `vae` section
        (crop, frames, mults, val_clips); seed: `train.seed`."""
        self.data, self.vae, self.seed, self.dp_rank, self.dp = data, vae, seed, dp_rank, dp
        self.epoch, self.pos = 0, 0
        self.efficiency = 1.0
        self.stats = {"skipped": 0}
        self.source_tokens: dict[str, int] = {}  # one source (the loop logs shares of a mixture's)
        self.shards = None
        v = vae
        if data.source == "synthetic":
            n = data.synthetic_videos
            self.train_ids, self.val_ids = list(range(n)), list(range(n, n + v.val_clips))
        else:
            index = read_index(data.source)
            if index.get("encoder") != "raw":
                raise ValueError(f"data.source = {data.source!r} holds {index.get('encoder')!r} latents; a "
                                 f"'task: vae' run trains on pixels: prepare it with --set data.encoder=raw")
            self.shards = _RawShards(data, seed)
            n = len(self.shards.src)
            if n <= v.val_clips:
                raise ValueError(f"data.source = {data.source!r}: {n} clips, not more than vae.val_clips="
                                 f"{v.val_clips} held out")
            self.train_ids, self.val_ids = list(range(n - v.val_clips)), list(range(n - v.val_clips, n))
        if len(self.train_ids) < dp:
            raise ValueError(f"data: {len(self.train_ids)} training clips for {dp} data-parallel ranks")

    def rank_ids(self, epoch: int) -> list[int]:
        ids = list(self.train_ids)
        random.Random(self.seed * 7919 + epoch).shuffle(ids)
        n = len(ids) // self.dp * self.dp
        return ids[:n][self.dp_rank::self.dp]

    def clip(self, i: int) -> torch.Tensor:
        if self.shards is not None:
            x = self.shards.load(i)
        else:
            rng = random.Random(self.seed * 1_000_003 + i)
            colors = list(COLORS)
            fg, bg = rng.sample(colors, 2)
            H, W = self.vae.crop if self.vae.crop[0] else (64, 64)
            f = render(rng.choice(SHAPES), fg, bg, rng.choice(list(MOTIONS)), H, W, self.vae.frames, seed=i)
            x = torch.from_numpy(f).permute(3, 0, 1, 2).float() / 127.5 - 1
        return x[None]

    def crop(self, x, i: int, train: bool):
        ch, cw = self.vae.crop
        H, W = x.shape[-2:]
        fs = 2 ** (len(self.vae.mults) - 1)
        ch, cw = (min(ch, H), min(cw, W)) if ch else (H, W)
        ch, cw = ch // fs * fs, cw // fs * fs
        if ch < fs or cw < fs:
            raise ValueError(f"clip {i}: {H}x{W} frames are smaller than the VAE's x{fs} compression")
        g = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) if train else None
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

    def __init__(self, data: LoaderArgs, seed: int):
        # pixels have 3 channels; one clip per micro-batch: no token budget (0) to check
        self.src = ShardSource(data.source, seed=seed, patch=(1, 1, 1), channels=3, tokens_per_batch=0)
        self._cache: dict[int, torch.Tensor] = {}

    def load(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            lat, _, _ = self.src.load_one(i)
            self._cache[i] = lat.float()
        return self._cache[i]
