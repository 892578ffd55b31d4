"""Packed, resumable, data-parallel loading.

`build_loader(cfg, dp_rank, dp_size, multiple)` returns an iterator of packed batches
`(tokens [L, P], PackedMeta)`, one token budget each, with `state_dict()` /
`load_state_dict()` so a checkpoint can resume it exactly. Every sequence-parallel rank
of a data-parallel group builds the same loader (same dp_rank) and so gets the identical
batch; the engine then takes its slice.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from data.packing import Item, Packer
from data.synthetic import synthetic_video
from models.packed import PackedMeta, pack


class SyntheticSource:
    """An epoch of `n` deterministic synthetic videos (see data/synthetic.py)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.n = cfg.data.synthetic_videos
        self._tokens: dict[int, int] = {}

    def keys(self) -> list[str]:
        return [str(i) for i in range(self.n)]

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return synthetic_video(int(key), c.train.seed, c.model.in_channels, c.data.frames, c.data.sizes,
                               c.data.text_tokens, c.model.text_dim, c.model.patch)

    def tokens(self, key: str) -> int:
        i = int(key)
        if i not in self._tokens:
            lat, _ = self.load(key)
            pt, ph, pw = self.cfg.model.patch
            _, T, H, W = lat.shape
            self._tokens[i] = (T // pt) * (H // ph) * (W // pw)
        return self._tokens[i]


class PackedLoader:
    """Shuffles keys per epoch, splits them over data-parallel ranks, packs them.

    State: epoch, how many of this rank's keys went into the packer, and the keys in the
    packer (buffered or in open bins). Restoring rebuilds the packer from keys, so the
    batches after a restore are exactly those an uninterrupted loader would yield.
    """

    def __init__(self, source, budget: int, dp_rank: int, dp_size: int, seed: int,
                 lookahead: int = 64, multiple: int = 1, patch=(1, 2, 2)):
        self.source, self.budget, self.seed = source, budget, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.lookahead, self.multiple, self.patch = lookahead, multiple, tuple(patch)
        self.epoch, self.pos = 0, 0
        self.packer = Packer(budget, lookahead)
        self._ready: list = []
        self.consumed_in_epoch: list[str] = []  # keys of batches already yielded this epoch
        self.real_tokens = 0
        self.padded_tokens = 0

    def rank_keys(self, epoch: int) -> list[str]:
        keys = self.source.keys()
        rng = random.Random(self.seed * 7919 + epoch)
        rng.shuffle(keys)
        # equal share per rank (the tail that does not divide is dropped this epoch)
        n = len(keys) // self.dp_size * self.dp_size
        return keys[:n][self.dp_rank::self.dp_size]

    def _fill(self) -> None:
        keys = self.rank_keys(self.epoch)
        while not self._ready:
            if self.pos < len(keys):
                k = keys[self.pos]
                self.pos += 1
                self.packer.push(Item(k, self.source.tokens(k)))
                self._ready += self.packer.pop_ready()
            else:
                self._ready += self.packer.flush()
                if not self._ready:  # epoch exhausted and nothing left: next epoch
                    self.epoch += 1
                    self.pos = 0
                    self.consumed_in_epoch = []
                    keys = self.rank_keys(self.epoch)
                    if not keys:
                        raise ValueError("data: an epoch has fewer videos than data-parallel ranks")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, PackedMeta]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, PackedMeta]:
        self._fill()
        b = self._ready.pop(0)
        self.consumed_in_epoch += [it.key for it in b.items]
        samples = [self.source.load(it.key) for it in b.items]
        tokens, meta = pack([s[0] for s in samples], [s[1] for s in samples], self.patch,
                            pad_to=self.budget, multiple=self.multiple,
                            names=tuple(it.key for it in b.items))
        self.real_tokens += meta.num_real
        self.padded_tokens += meta.seq_len
        return tokens, meta

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos,
                "buffer": [it.key for it in self.packer.buffer],
                "open": [[it.key for it in b.items] for b in self.packer.open],
                "ready": [[it.key for it in b.items] for b in self._ready],
                "consumed": list(self.consumed_in_epoch)}

    def load_state_dict(self, sd: dict) -> None:
        mk = lambda k: Item(k, self.source.tokens(k))  # noqa: E731
        self.epoch, self.pos = sd["epoch"], sd["pos"]
        self.packer = Packer(self.budget, self.lookahead)
        self.packer.buffer = [mk(k) for k in sd["buffer"]]
        from data.packing import Bin
        self.packer.open = []
        for keys in sd["open"]:
            b = Bin(self.budget)
            for k in keys:
                b.add(mk(k))
            self.packer.open.append(b)
        self._ready = []
        for keys in sd.get("ready", []):
            b = Bin(self.budget)
            for k in keys:
                b.add(mk(k))
            self._ready.append(b)
        self.consumed_in_epoch = list(sd.get("consumed", []))

    @property
    def efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)


def build_loader(cfg, dp_rank: int = 0, dp_size: int = 1, multiple: int = 1) -> PackedLoader:
    if cfg.data.source == "synthetic":
        source = SyntheticSource(cfg)
    else:
        from data.shards import ShardSource  # real shards (vidscale prepare)
        source = ShardSource(cfg.data.source, cfg)
    return PackedLoader(source, cfg.train.tokens_per_batch, dp_rank, dp_size, cfg.train.seed,
                        cfg.data.lookahead, multiple, cfg.model.patch)
