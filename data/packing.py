"""NaViT-style packing: whole videos of mixed sizes into fixed token budgets.

Streaming greedy decreasing fit over a lookahead buffer: once `lookahead` videos are
buffered, one bin is built from the largest buffered video plus, repeatedly, the largest
buffered video that still fits; the buffer refills from the stream and the next bin is
built. Starting every bin with the largest video keeps big videos from starving; filling
with the largest that fits leaves a gap smaller than the smallest buffered video, so with
a mixed-size stream bins come out >= 99% full. Padding is added only up to a multiple (what
sequence parallelism needs) and in the last bins of a stream.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from vidscale.models.packed import PackedMeta, patch_coords, patchify


@dataclass
class Item:
    """One video as the packer sees it: its token count and an opaque key."""
    key: Any
    tokens: int


@dataclass
class Bin:
    budget: int
    items: list[Item] = field(default_factory=list)
    used: int = 0

    def room(self) -> int:
        return self.budget - self.used

    def add(self, it: Item) -> None:
        assert it.tokens <= self.room(), "packer invariant: a bin never exceeds its budget"
        self.items.append(it)
        self.used += it.tokens


def too_long(key, tokens: int, budget: int) -> ValueError:
    return ValueError(f"video {key!r} has {tokens} tokens, more than the micro-batch budget "
                      f"train.tokens_per_batch={budget}: raise the budget (sequence parallelism splits "
                      f"long packed sequences), or drop tokens (data.drop_tokens)")


class Packer:
    """`push` items; bins come out of `push` once the buffer is full, and of `flush` at the end.

    Deterministic: ties between equal token counts go to the earlier item."""

    def __init__(self, budget: int, lookahead: int):
        if budget < 1:
            raise ValueError(f"train.tokens_per_batch must be positive, got {budget}")
        self.budget, self.lookahead = budget, max(1, lookahead)
        self._sizes: list[tuple[int, int]] = []  # sorted (tokens, arrival) of the buffer
        self._items: dict[int, Item] = {}
        self._arrival = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def push(self, it: Item) -> list[Bin]:
        if it.tokens > self.budget:
            raise too_long(it.key, it.tokens, self.budget)
        # largest first and earliest first among equals: sort by (tokens, -arrival)
        bisect.insort(self._sizes, (it.tokens, -self._arrival))
        self._items[-self._arrival] = it
        self._arrival += 1
        return [self._build()] if len(self._sizes) >= self.lookahead else []

    def _take(self, pos: int) -> Item:
        _, a = self._sizes.pop(pos)
        return self._items.pop(a)

    def _build(self) -> Bin:
        b = Bin(self.budget)
        b.add(self._take(len(self._sizes) - 1))
        while self._sizes and b.room() >= self._sizes[0][0]:
            # the largest buffered item that fits: last entry with tokens <= room
            pos = bisect.bisect_right(self._sizes, (b.room(), 1)) - 1
            b.add(self._take(pos))
        return b

    def flush(self) -> list[Bin]:
        out = []
        while self._sizes:
            out.append(self._build())
        return out


def pack_all(items: Iterable[Item], budget: int, lookahead: int) -> Iterator[Bin]:
    p = Packer(budget, lookahead)
    for it in items:
        yield from p.push(it)
    yield from p.flush()


def drop_tokens(n: int, drop: float, min_tokens: int) -> int:
    """Tokens kept of an n-token video under NaViT token dropping."""
    if drop <= 0 or n < min_tokens:
        return n
    return max(1, n - int(drop * n))


def pack_dropped(latents: list[torch.Tensor], texts: list[torch.Tensor], patch, keep: list[int] | None = None,
                 gen: torch.Generator | None = None, pad_to: int | None = None, multiple: int = 1,
                 names: tuple = ()) -> tuple[torch.Tensor, PackedMeta]:
    """`models.packed.pack` (same result when nothing is dropped), but keeping a random
    `keep[i]` of video i's tokens (sorted, so each video stays t-major; coordinates keep the
    real positions for RoPE). Segment ids come from numpy: torch's repeat_interleave can take
    ~20 ms on a CPU whose cores other processes keep busy."""
    keep = keep if keep is not None else [1 << 62] * len(latents)
    toks, coords, bounds, grid = [], [], [0], []
    for lat, k in zip(latents, keep):
        _, T, H, W = lat.shape
        g = (T // patch[0], H // patch[1], W // patch[2])
        x, c = patchify(lat, patch), patch_coords(*g)
        if k < x.shape[0]:
            sel = torch.randperm(x.shape[0], generator=gen)[:k].sort().values
            x, c = x[sel], c[sel]
        toks.append(x)
        coords.append(c)
        bounds.append(bounds[-1] + x.shape[0])
        grid.append(g)
    n = bounds[-1]
    pad_to = n if pad_to is None else pad_to
    assert n <= pad_to, "packer invariant: a bin never exceeds its budget"
    seq_len = -(-pad_to // multiple) * multiple
    tokens = torch.cat(toks + [toks[0].new_zeros(seq_len - n, toks[0].shape[1])], 0)
    coords.append(torch.zeros(seq_len - n, 3, dtype=torch.long))
    tb = [0]
    for t in texts:
        tb.append(tb[-1] + t.shape[0])
    meta = PackedMeta(bounds=tuple(bounds), seq_len=seq_len, coords=torch.cat(coords, 0),
                      seg_ids=_seg_ids(bounds, seq_len), text=torch.cat(texts, 0),
                      text_bounds=tuple(tb), grid=tuple(grid), names=tuple(names))
    return tokens, meta


def _seg_ids(bounds: list[int], seq_len: int) -> torch.Tensor:
    """[seq_len] long: video index per token, `num_videos` for padding (as seg_ids_from_bounds)."""
    lengths = np.diff(np.asarray(bounds + [seq_len], dtype=np.int64))
    return torch.from_numpy(np.repeat(np.arange(len(bounds), dtype=np.int64), lengths))
