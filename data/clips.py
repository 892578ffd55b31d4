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

    Order: one stream of clips, every epoch's shuffle of the training clips after the other;
    the ranks take its positions in turn (rank r of dp takes start + k * dp + r, k = 0, 1, ...),
    so no clip is dropped at an epoch's end (a round may straddle two epochs) and each is
    taken once per epoch. State: the stream position where this layout began and how many
    clips this rank has taken since. The ranks move in lockstep (one clip per micro-batch
    each), so a saved run's ranks agree on the next position: a resume on any dp size
    continues from it (`remap_states`), exactly once, and on the same layout bit for bit.
    """

    STATE = "clips"

    def __init__(self, data: LoaderArgs, vae, seed: int, dp_rank: int, dp: int):
        """data: the recipe's `data` section (source, synthetic_videos); vae: its `vae` section
        (crop, frames, mults, val_clips); seed: `train.seed`."""
        self.data, self.vae, self.seed, self.dp_rank, self.dp = data, vae, seed, dp_rank, dp
        self.start, self.taken = 0, 0
        self.epoch = 0  # of the clip taken last (its random crop depends on it)
        self.efficiency = 1.0
        self.stats = {"skipped": 0}
        self.source_tokens: dict[str, int] = {}  # one source (the loop logs shares of a mixture's)
        self.shards = None
        self._orders: dict[int, list[int]] = {}
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

    def order(self, epoch: int) -> list[int]:
        """The training clips in epoch `epoch`'s order."""
        if epoch not in self._orders:
            ids = list(self.train_ids)
            random.Random(self.seed * 7919 + epoch).shuffle(ids)
            self._orders = {epoch: ids}  # epochs are read in turn: keep the current one
        return self._orders[epoch]

    def at(self, j: int) -> tuple[int, int]:
        """(clip id, epoch) at stream position j."""
        n = len(self.train_ids)
        return self.order(j // n)[j % n], j // n

    def position(self) -> int:
        """The stream position of the next round's first clip (the same on every rank)."""
        return self.start + self.taken * self.dp

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
        i, self.epoch = self.at(self.position() + self.dp_rank)
        self.taken += 1
        x = self.crop(self.clip(i), i, train=True)
        return x, ClipMeta(num_real=x.numel(), seq_len=x.numel(), names=(str(i),))

    def val_clips(self) -> list[torch.Tensor]:
        return [self.crop(self.clip(i), i, train=False) for i in self.val_ids]

    def state_dict(self) -> dict:
        return {"kind": self.STATE, "start": self.start, "taken": self.taken, "epoch": self.epoch,
                "dp": self.dp, "dp_rank": self.dp_rank, "n": len(self.train_ids)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != self.STATE:  # saved before the stream order: {"epoch", "pos", "dp"}
            warnings.warn("vae loader: a checkpoint from before the current clip order; its epoch restarts")
            self.start, self.taken, self.epoch = sd["epoch"] * len(self.train_ids), 0, sd["epoch"]
            return
        if sd["n"] != len(self.train_ids):
            raise ValueError(f"vae loader: the checkpoint was saved with {sd['n']} training clips, this run has "
                             f"{len(self.train_ids)}: resume with the same data.source and vae.val_clips")
        if (sd["dp"], sd["dp_rank"]) != (self.dp, self.dp_rank):
            raise ValueError(f"vae loader: the state of dp rank {sd['dp_rank']} of {sd['dp']} given to dp rank "
                             f"{self.dp_rank} of {self.dp} (remap_states maps a run's states to a new dp size)")
        self.start, self.taken, self.epoch = sd["start"], sd["taken"], sd["epoch"]

    @classmethod
    def remap_states(cls, states: list[dict], new_dp: int) -> list[dict]:
        """The states of a run's dp ranks -> the states of `new_dp` ranks that continue the
        stream where the old ranks stopped: every clip is taken once per epoch."""
        if new_dp < 1:
            raise ValueError(f"new dp size must be positive, got {new_dp}")
        if not states or any(s.get("kind") != cls.STATE for s in states):
            return [{"epoch": min(s.get("epoch", 0) for s in states) if states else 0, "pos": 0, "dp": new_dp}
                    for _ in range(new_dp)]  # an older format: each restarts its epoch (load_state_dict warns)
        at = {s["start"] + s["taken"] * s["dp"] for s in states}
        if len(at) != 1:
            raise ValueError(f"vae loader: the saved dp ranks stopped at different stream positions {sorted(at)}")
        pos, s0 = at.pop(), states[0]
        return [{**s0, "start": pos, "taken": 0, "dp": new_dp, "dp_rank": r} for r in range(new_dp)]


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
