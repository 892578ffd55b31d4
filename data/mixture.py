"""A weighted mixture of prepared shard sets (`data.sources`): batches drawn by token share.

Every source has a packed loader of its own (data/loader.py), so each keeps that loader's
guarantees by itself: every sample of the source once per epoch of the source over the dp
ranks, exact resume, and remapping to a new dp size. A source smaller than its share simply
runs through more epochs.

A batch comes from one source. Which one is decided by the real tokens and batches each source
has given this rank so far: the next batch comes from the source furthest below its weight's
share once half of its mean batch is counted, the smallest (tokens + mean batch / 2) / weight
(ties to the first listed; the half batch centres the error instead of letting every source
run up to one batch ahead). This is deterministic from the counts, which the state carries,
and the shares stay within about one batch of tokens per source of the weights at every step
(so the error over N batches shrinks like 1/N). Images and videos
prepared into separate sets therefore train in separate batches, at the token ratio asked.

    loader = MixtureLoader([("images", 1.0, image_loader), ("videos", 3.0, video_loader)])
"""
from __future__ import annotations

from typing import Callable, Iterator

MIX_VERSION = 1
KIND = "mixture"
"""`state_dict()["kind"]`: how `remap_loader_states` tells a mixture's state from one loader's."""


class MixtureLoader:
    """Iterator of packed batches drawn from several loaders by token share (see the module doc)."""

    def __init__(self, loaders: list[tuple[str, float, Iterator]], dp_rank: int, dp_size: int):
        """loaders: (name, weight > 0, packed loader of this dp rank) per source, in recipe order."""
        assert loaders and all(w > 0 for _, w, _ in loaders), "mixture: weights must be positive"
        self.names = [n for n, _, _ in loaders]
        self.weights = [float(w) for _, w, _ in loaders]
        self.loaders = [ld for _, _, ld in loaders]
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tokens = [0] * len(loaders)  # real tokens each source gave this rank (the schedule's state)
        self.batches = [0] * len(loaders)  # and batches

    def __iter__(self):
        return self

    def pick(self) -> int:
        """The source of the next batch: the furthest below its share of the tokens so far."""
        def due(s: int) -> tuple[float, int]:
            half = self.tokens[s] / self.batches[s] / 2 if self.batches[s] else 0.0
            return (self.tokens[s] + half) / self.weights[s], s
        return min(range(len(self.loaders)), key=due)

    def __next__(self):
        s = self.pick()
        tokens, meta = next(self.loaders[s])
        self.tokens[s] += meta.num_real
        self.batches[s] += 1
        return tokens, meta

    # -- what the training loop reads ----------------------------------------------------
    @property
    def stats(self) -> dict:
        """The sources' counters, summed."""
        out: dict = {}
        for ld in self.loaders:
            for k, v in ld.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def efficiency(self) -> float:
        st = self.stats
        return st["real_tokens"] / max(st["budget_tokens"], 1)

    @property
    def source_tokens(self) -> dict[str, int]:
        """Real tokens each source gave this rank since the run began (resumes included)."""
        return dict(zip(self.names, self.tokens))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": MIX_VERSION, "kind": KIND, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "sources": list(self.names), "tokens": list(self.tokens), "batches": list(self.batches),
                "loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != KIND:
            raise ValueError(f"loader state of one data source, but this run mixes data.sources {self.names}")
        if sd.get("version") != MIX_VERSION:
            raise ValueError(f"mixture loader state version {sd.get('version')!r}: expected {MIX_VERSION}")
        if sd["sources"] != self.names:
            raise ValueError(f"loader state mixes sources {sd['sources']} but data.sources names {self.names}")
        for ld, sub in zip(self.loaders, sd["loaders"]):
            ld.load_state_dict(sub)  # checks each source's fingerprint, seed and dp layout
        self.tokens = [int(t) for t in sd["tokens"]]
        self.batches = [int(b) for b in sd["batches"]]


def remap_mixture_states(states: list[dict], new_dp: int, remap_one: Callable[[list[dict], int], list[dict]]
                         ) -> list[dict]:
    """Mixture states of the old dp ranks -> states for `new_dp` ranks: each source's loader
    states go through `remap_one` (data.loader.remap_loader_states: every not yet consumed
    sample of an unfinished epoch of that source to exactly one new rank), and each source's
    token and batch counts, summed over the old ranks, are split over the new ones (sums kept)."""
    names = states[0]["sources"]
    if any(s["sources"] != names for s in states):
        raise ValueError(f"loader states of the dp ranks mix different sources: {[s['sources'] for s in states]}")
    subs = [remap_one([s["loaders"][j] for s in states], new_dp) for j in range(len(names))]
    split = lambda key, r: [t // new_dp + (1 if r < t % new_dp else 0)  # noqa: E731
                            for t in (sum(s[key][j] for s in states) for j in range(len(names)))]
    return [{"version": MIX_VERSION, "kind": KIND, "dp_rank": r, "dp_size": new_dp, "sources": list(names),
             "tokens": split("tokens", r), "batches": split("batches", r),
             "loaders": [sub[r] for sub in subs]} for r in range(new_dp)]
