"""Packed, resumable, data-parallel loading.

    build_loader(cfg.data, seed=cfg.train.seed, tokens_per_batch=cfg.train.tokens_per_batch,
                 patch=cfg.model.patch, channels=cfg.model.in_channels, text_dim=cfg.model.text_dim,
                 dp_rank=r, dp_size=dp, multiple=sp)

returns an iterator of packed batches `(tokens [L, P], PackedMeta)` of at most
`tokens_per_batch` real tokens each, padded only up to `multiple` (the sequence-parallel
degree), with `state_dict()` / `load_state_dict()`. Every sequence-parallel rank of a
data-parallel group builds the same loader (same dp_rank) and gets the identical batch; the
engine takes its slice.

How an epoch is planned (all from the index: nothing is decoded to plan):
  1. the epoch's global sample order: `source.order(epoch)` (shards shuffled by seed and
     epoch, tar order inside a shard; a plain shuffle for synthetic data);
  2. dp rank r takes the contiguous block [r*n/dp, (r+1)*n/dp) of it: every sample exactly
     once per epoch over the ranks, and a rank reads ~1/dp of the shards sequentially;
  3. the block, shuffled inside windows of `data.shuffle_buffer` samples, goes through the
     packer (data/packing.py), which turns its token counts into a list of bins.
Loading then streams the block's samples and packs each bin. With `data.workers` > 0,
persistent worker processes take the bins round robin (each reads the rank's tars but
decodes and packs only its own bins) and the training process receives them in plan order.

Resume guarantee. The state is a small JSON-serialisable dict: the epoch, the segment of the
epoch order this rank owns, how many of its bins the TRAINING PROCESS has taken from
`next()` (batches prefetched by workers do not count), later queued segments, counters and
a fingerprint of the data. Shard, offset and packer buffer are a pure function of these and
the index, so they are recomputed, never stored. Restored with the same index, seed,
budget, lookahead, shuffle_buffer, patch, token dropping and dp size (any number of
workers), the loader yields exactly the batches (same samples, order, packing,
bit-identical tensors) the uninterrupted loader would have yielded next. With a different
dp size, `remap_loader_states` gives every not-yet-consumed sample of each unfinished epoch
to exactly one new rank (the packing of those samples differs).

Corrupt samples and truncated shards are skipped and counted (`data.on_error=skip`) or
raise (`fail`). A rank never waits on another: each rank's iterator is endless (it rolls
into its next epoch), so every rank can take the same number of steps however many
samples its shards lost.
"""
from __future__ import annotations

import copy
import logging
import random
from typing import Callable, Iterator, Sequence

import torch

from vidscale.data.args import LoaderArgs, SyntheticArgs, shard_sets
from vidscale.data.mixture import KIND as MIXTURE, MixtureLoader, remap_mixture_states
from vidscale.data.packing import Item, Packer, drop_tokens, pack_dropped, too_long
from vidscale.data.shards import ShardSource
from vidscale.data.synthetic import synthetic_video
from vidscale.models.packed import PackedMeta

log = logging.getLogger("vidscale.data")
STATE_VERSION = 1
ON_ERROR = ("skip", "fail")
"""`data.on_error`: count an unreadable sample and go on, or raise."""
OnBatch = Callable[[int, tuple[str, ...]], None]
"""Called with (epoch, sample names) for each batch the training process takes from `next()`."""


class SyntheticSource:
    """An epoch of `synthetic.synthetic_videos` deterministic synthetic videos (data/synthetic.py)."""

    def __init__(self, synthetic: SyntheticArgs, *, seed: int, channels: int, text_dim: int, patch: Sequence[int]):
        self.args, self.seed = synthetic, seed
        self.channels, self.text_dim, self.patch = channels, text_dim, tuple(patch)
        self.n = synthetic.synthetic_videos
        self._tokens: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"synthetic:{i}"

    def fingerprint(self) -> str:
        a = self.args
        return f"synthetic:{self.n}:{a.frames}:{a.sizes}:{a.text_tokens}"

    def order(self, epoch: int) -> list[int]:
        ids = list(range(self.n))
        random.Random(self.seed * 7919 + epoch).shuffle(ids)
        return ids

    def _load(self, i: int):
        a = self.args
        return synthetic_video(i, self.seed, self.channels, a.frames, a.sizes, a.text_tokens, self.text_dim,
                               list(self.patch))

    def tokens(self, i: int) -> int:
        if i not in self._tokens:
            lat, _ = self._load(i)
            pt, ph, pw = self.patch
            _, T, H, W = lat.shape
            self._tokens[i] = (T // pt) * (H // ph) * (W // pw)
        return self._tokens[i]

    def stream(self, ids: list[int]):
        for i in ids:
            lat, text = self._load(i)
            yield i, (lat, text, {}), ""


# -- segments: runs of positions in an epoch's order, as [[start, end), ...] ranges ------
def _to_ranges(positions) -> list[list[int]]:
    out: list[list[int]] = []
    for p in sorted(positions):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def _positions(ranges) -> list[int]:
    return [p for a, b in ranges for p in range(a, b)]


def window_shuffle(xs: list[int], window: int, seed: str) -> list[int]:
    """Shuffle inside consecutive windows: samples of one shard mix without reading out of
    order (the reader streams in tar order and holds at most ~window + lookahead samples)."""
    if window <= 1:
        return list(xs)
    rng = random.Random(seed)  # str seeds are hashed deterministically (sha512)
    out = []
    for i in range(0, len(xs), window):
        w = xs[i:i + window]
        rng.shuffle(w)
        out += w
    return out


def _block(n: int, rank: int, size: int) -> list[list[int]]:
    lo, hi = rank * n // size, (rank + 1) * n // size
    return [[lo, hi]] if hi > lo else []


class PackedLoader:
    """Plans, loads and packs one dp rank's share of each epoch (see the module doc)."""

    def __init__(self, source, data: LoaderArgs, *, budget: int, seed: int, patch: Sequence[int], dp_rank: int,
                 dp_size: int, multiple: int, on_batch: OnBatch | None = None):
        self.source, self.budget, self.seed = source, budget, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.lookahead, self.multiple, self.patch = data.lookahead, multiple, tuple(patch)
        self.workers, self.on_error, self.shuffle = data.workers, data.on_error, data.shuffle_buffer
        self.drop, self.drop_min_tokens = data.drop_tokens, data.drop_min_tokens
        self.n = len(source)
        if self.n < dp_size:
            raise ValueError(f"data: {self.n} samples cannot feed {dp_size} data-parallel ranks")
        self.epoch, self.batch = 0, 0
        self.ranges: list[list[int]] | None = None  # None: this rank's default block of the epoch
        self.queue: list[dict] = []                  # explicit segments after a remap
        self.stats = {"batches": 0, "samples": 0, "skipped": 0, "real_tokens": 0, "budget_tokens": 0,
                      "padded_tokens": 0}
        self._plan_key = None
        self._plan: tuple[list[int], list[list[int]]] = ([], [])
        self._it = None
        self._empty_segments = 0
        self.on_batch = on_batch  # only batches taken here: never those workers prefetched
        self.source_tokens: dict[str, int] = {}  # one source: no shares to report (a mixture has them)

    # -- planning ----------------------------------------------------------------------
    def kept_tokens(self, i: int) -> int:
        return drop_tokens(self.source.tokens(i), self.drop, self.drop_min_tokens)

    def segment_ranges(self) -> list[list[int]]:
        return self.ranges if self.ranges is not None else _block(self.n, self.dp_rank, self.dp_size)

    def plan(self) -> tuple[list[int], list[list[int]]]:
        """(positions of this segment in the epoch order, bins as lists of positions)."""
        key = (self.epoch, str(self.ranges))
        if self._plan_key != key:
            positions = _positions(self.segment_ranges())  # sorted: the read (tar) order
            order = self.source.order(self.epoch)
            bins: list[list[int]] = []
            p = Packer(self.budget, self.lookahead)
            for pos in window_shuffle(positions, self.shuffle, f"{self.seed}/{self.epoch}/{positions[:1]}"):
                i = order[pos]
                k = self.kept_tokens(i)
                if k > self.budget:
                    raise too_long(self.source.name(i), k, self.budget)
                bins += [[it.key for it in b.items] for b in p.push(Item(pos, k))]
            bins += [[it.key for it in b.items] for b in p.flush()]
            self._plan_key, self._plan, self._order = key, (positions, bins), order
        return self._plan

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, PackedMeta]]:
        return self

    def _advance(self) -> None:
        if self.queue:
            seg = self.queue.pop(0)
            self.epoch, self.ranges = seg["epoch"], seg["ranges"]
        else:
            self.epoch, self.ranges = self.epoch + 1, None
        self.batch = 0  # the producer (its own copy of this plan) rolls over by itself

    def _producer_copy(self) -> "PackedLoader":
        c = copy.copy(self)
        c._it, c.queue, c.stats, c.on_batch = None, [dict(q) for q in self.queue], {}, None
        return c

    def _batches(self):
        """Endless iterator of (epoch, bin, tokens, meta, errors) from the current position on:
        in this process, or from `data.workers` persistent worker processes."""
        if self.workers <= 0:
            return produce_endless(self._producer_copy(), 0, 1)
        from torch.utils.data import DataLoader
        return iter(DataLoader(_BinDataset(self._producer_copy(), self.workers), batch_size=None,
                               num_workers=self.workers, collate_fn=_identity, worker_init_fn=_worker_init,
                               prefetch_factor=2))

    def __next__(self) -> tuple[torch.Tensor, PackedMeta]:
        while True:
            _, bins = self.plan()
            if self.batch >= len(bins):
                self._advance()
                self._empty_segments += 1
                if self._empty_segments > len(self.queue) + 3:  # whole epochs without one readable sample
                    raise ValueError(f"data: no readable sample for dp rank {self.dp_rank} in epochs up to "
                                     f"{self.epoch} of {self.n} samples (every shard corrupt?)")
                continue
            if self._it is None:
                self._it = self._batches()
            epoch, b, tokens, meta, errors = next(self._it)
            assert (epoch, b) == (self.epoch, self.batch), \
                f"loader invariant: bins arrive in plan order ({epoch, b} != {self.epoch, self.batch})"
            self.batch += 1
            self.stats["skipped"] += len(errors)
            for e in errors:
                log.warning("data: skipped %s", e)
            if meta is None:  # every sample of this bin was unreadable
                continue
            self._empty_segments = 0
            self.stats["batches"] += 1
            self.stats["samples"] += meta.num_videos
            self.stats["real_tokens"] += meta.num_real
            self.stats["budget_tokens"] += max(self.budget, meta.seq_len)
            self.stats["padded_tokens"] += meta.seq_len
            if self.on_batch is not None:
                self.on_batch(self.epoch, meta.names)
            return tokens, meta

    @property
    def efficiency(self) -> float:
        """Packing efficiency so far: real tokens / token budget of the yielded batches."""
        return self.stats["real_tokens"] / max(self.stats["budget_tokens"], 1)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        positions, bins = self.plan()
        consumed = [p for b in bins[:self.batch] for p in b]
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "n": self.n, "source": self.source.fingerprint(), "epoch": self.epoch,
                "ranges": self.segment_ranges(), "default": self.ranges is None,
                "batch": self.batch, "consumed": _to_ranges(consumed),
                "queue": [dict(q) for q in self.queue], "stats": dict(self.stats)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") == MIXTURE:
            raise ValueError(f"loader state of a mixture of data.sources {sd.get('sources')}, but this run reads "
                             f"one data.source")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r}: expected {STATE_VERSION}")
        mine_all = {"n": self.n, "source": self.source.fingerprint(), "seed": self.seed,
                    "dp_size": self.dp_size, "dp_rank": self.dp_rank}
        for k, mine in mine_all.items():
            if sd[k] != mine:
                hint = " (use data.loader.remap_loader_states for a new dp size)" if k in ("dp_size", "dp_rank") else ""
                raise ValueError(f"loader state has {k}={sd[k]} but this loader has {k}={mine}{hint}")
        self.epoch, self.batch = sd["epoch"], sd["batch"]
        self.ranges = None if sd.get("default", False) else [list(r) for r in sd["ranges"]]
        self.queue = [{"epoch": q["epoch"], "ranges": [list(r) for r in q["ranges"]]} for q in sd["queue"]]
        self.stats = dict(sd["stats"])
        self._it, self._empty_segments = None, 0
        # The plan is rebuilt from this run's packing settings (tokens_per_batch, lookahead,
        # shuffle buffer, token dropping). If they changed since the save, the first `batch`
        # bins are no longer what was consumed: the rest of the segment (its positions less the
        # consumed ones) becomes a segment of its own, packed anew, so nothing repeats or is lost.
        positions, bins = self.plan()
        saved = set(_positions(sd["consumed"]))
        if {p for b in bins[:self.batch] for p in b} != saved:
            left = [p for p in positions if p not in saved]
            log.warning("data: the packing settings differ from the checkpoint's; the %d samples left of epoch %d "
                        "for dp rank %d are packed anew", len(left), self.epoch, self.dp_rank)
            self.ranges, self.batch = _to_ranges(left), 0


def remap_loader_states(states: list[dict], new_dp: int) -> list[dict]:
    """Loader states of `len(states)` dp ranks -> states for `new_dp` ranks such that every
    sample not yet consumed in any unfinished epoch goes to exactly one new rank.

    The old ranks may be in different epochs. Up to the latest epoch E any of them reached,
    the remaining positions of each epoch (its default blocks and queued segments, minus
    what was consumed) are split contiguously over the new ranks as queued segments; every
    new rank's last segment is in epoch E (empty where nothing of E is left for it, also
    when new dp > the samples left), so from epoch E + 1 on, and only then, the new ranks
    take their default blocks."""
    if new_dp < 1:
        raise ValueError(f"new dp size must be positive, got {new_dp}")
    if not states:
        raise ValueError("no loader states to remap")
    if states[0].get("kind") == MIXTURE:  # each source of a mixture remaps on its own
        return remap_mixture_states(states, new_dp, remap_loader_states)
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(states[0]["dp_size"])):
        raise ValueError(f"loader states of dp ranks {ranks}: expected one per rank 0..{states[0]['dp_size'] - 1}")
    n, old_dp, seed, fp = states[0]["n"], states[0]["dp_size"], states[0]["seed"], states[0]["source"]
    last = max(max([s["epoch"]] + [q["epoch"] for q in s["queue"]]) for s in states)
    first = min(s["epoch"] for s in states)
    remaining: dict[int, set[int]] = {e: set() for e in range(first, last + 1)}
    for s in states:
        remaining[s["epoch"]] |= set(_positions(s["ranges"])) - set(_positions(s["consumed"]))
        seen = s["epoch"]
        for q in s["queue"]:
            remaining[q["epoch"]] |= set(_positions(q["ranges"]))
            seen = q["epoch"]
        for e in range(seen + 1, last + 1):  # epochs this rank would have reached by its default plan
            remaining[e] |= set(_positions(_block(n, s["dp_rank"], old_dp)))
    out = []
    for r in range(new_dp):
        segs = []
        for e in range(first, last + 1):
            pos = sorted(remaining[e])
            mine = pos[r * len(pos) // new_dp:(r + 1) * len(pos) // new_dp]
            if mine:
                segs.append({"epoch": e, "ranges": _to_ranges(mine)})
        if not segs or segs[-1]["epoch"] != last:
            # nothing left for this rank in epoch E: an explicit empty segment at E, or the
            # rank would roll from its last segment into its default block of E (consumed)
            segs.append({"epoch": last, "ranges": []})
        head = segs.pop(0)
        stats = {k: sum(s["stats"][k] for s in states) // new_dp for k in states[0]["stats"]}
        out.append({"version": STATE_VERSION, "dp_rank": r, "dp_size": new_dp, "seed": seed, "n": n, "source": fp,
                    "epoch": head["epoch"], "ranges": head["ranges"], "default": False, "batch": 0,
                    "consumed": [], "queue": segs, "stats": stats})
    return out


# -- producing packed bins (in the training process or in loader workers) ---------------
class _Spec:
    """What a producer needs, as plain picklable data (workers get a copy)."""

    def __init__(self, ld: PackedLoader, positions: list[int], bins: list[list[int]]):
        self.source, self.order, self.positions, self.bins = ld.source, ld._order, positions, bins
        self.epoch, self.seed = ld.epoch, ld.seed
        self.patch, self.budget, self.multiple = ld.patch, ld.budget, ld.multiple
        self.on_error, self.drop, self.drop_min = ld.on_error, ld.drop, ld.drop_min_tokens


def produce_endless(ld: PackedLoader, worker: int, nworkers: int):
    """Walk the loader's plan (a private copy) segment after segment from its position and
    yield (epoch, bin, tokens, meta, errors) for the bins of this worker: bins are dealt
    round robin over the workers in plan order, which is the order the DataLoader collects
    them in, so the training process receives every bin in plan order."""
    dealt = 0
    while True:
        positions, bins = ld.plan()
        n = len(bins) - ld.batch
        mine = [ld.batch + j for j in range(n) if (dealt + j) % nworkers == worker]
        for b, tokens, meta, errors in produce(_Spec(ld, positions, bins), mine):
            yield ld.epoch, b, tokens, meta, errors
        dealt += n
        ld._advance()


def produce(spec: _Spec, mine: list[int]):
    """Yield (bin index, tokens, meta or None, skipped errors) for the bins `mine`, in order."""
    wanted = {p for b in mine for p in spec.bins[b]}
    stream_pos = [p for p in spec.positions if p in wanted]  # stream (tar) order
    by_id = {spec.order[p]: p for p in stream_pos}
    stream = spec.source.stream([spec.order[p] for p in stream_pos])
    got: dict[int, object] = {}
    for b in mine:
        while any(p not in got for p in spec.bins[b]):
            i, sample, err = next(stream)
            if sample is None and spec.on_error == "fail":
                raise ValueError(f"data: {err} (data.on_error=fail; 'skip' counts and goes on)")
            got[by_id[i]] = sample if sample is not None else err
        members = [(p, got.pop(p)) for p in spec.bins[b]]
        good = [(p, s) for p, s in members if not isinstance(s, str)]
        errors = [s for _, s in members if isinstance(s, str)]
        if not good:
            yield b, None, None, errors
            continue
        yield (b, *_pack(spec, b, good), errors)


def _pack(spec: _Spec, b: int, good) -> tuple[torch.Tensor, PackedMeta]:
    lats = [s[0].float() for _, s in good]
    texts = [s[1].float() for _, s in good]
    names = tuple(spec.source.name(spec.order[p]) for p, _ in good)
    if spec.drop > 0:
        keep = [drop_tokens(spec.source.tokens(spec.order[p]), spec.drop, spec.drop_min) for p, _ in good]
        gen = torch.Generator().manual_seed((spec.seed * 1_000_003 + spec.epoch) * 65_537 + b)
        return pack_dropped(lats, texts, spec.patch, keep, gen, multiple=spec.multiple, names=names)
    return pack_dropped(lats, texts, spec.patch, multiple=spec.multiple, names=names)


class _BinDataset(torch.utils.data.IterableDataset):
    def __init__(self, ld: PackedLoader, nworkers: int):
        self.ld, self.nworkers = ld, nworkers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # the DataLoader asks workers round robin, so bins come back in plan order
        return produce_endless(self.ld._producer_copy(), info.id if info else 0, info.num_workers if info else 1)


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


def build_loader(data: LoaderArgs, *, seed: int, tokens_per_batch: int, patch: Sequence[int], channels: int,
                 text_dim: int, dp_rank: int = 0, dp_size: int = 1, multiple: int = 1,
                 on_batch: OnBatch | None = None) -> PackedLoader | MixtureLoader:
    """The packed loader of dp rank `dp_rank` of `dp_size` (see the module doc). `data` is the
    recipe's data section; seed and tokens_per_batch come from `train`; patch, channels
    (`model.in_channels`) and text_dim from `model`; `multiple` is the sequence-parallel degree;
    `on_batch(epoch, names)` is told the samples of each batch taken (`data.record_consumed`).
    Shards are checked against the model and the budget first (ValueError, one line).
    With `data.sources`, a `MixtureLoader` over one such loader per source (data/mixture.py)."""
    def loader(source) -> PackedLoader:
        return PackedLoader(source, data, budget=tokens_per_batch, seed=seed, patch=patch, dp_rank=dp_rank,
                            dp_size=dp_size, multiple=multiple, on_batch=on_batch)
    sets = shard_sets(data)
    if not sets:
        return loader(SyntheticSource(data, seed=seed, channels=channels, text_dim=text_dim, patch=patch))
    shards = [(name, weight, loader(ShardSource(path, seed=seed, patch=patch, channels=channels, text_dim=text_dim,
                                                tokens_per_batch=tokens_per_batch, drop_tokens=data.drop_tokens,
                                                drop_min_tokens=data.drop_min_tokens, key=key, label=name)))
              for path, key, weight, name in sets]
    return MixtureLoader(shards, dp_rank, dp_size) if data.sources else shards[0][2]
