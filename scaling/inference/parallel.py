"""A sequence-parallel model called like a plain one, for sampling during training.

The sampler (sample.py) works on a whole video: tokens [N, P] in, a prediction [N, P] out.
Under sequence parallelism the model's attention expects this rank's contiguous slice of a
packed sequence whose length the group size divides (what training hands it). So every
rank of the group runs the same sampler on the same noise: each call pads the full tokens
to a multiple of sp, runs the parallel forward on this rank's slice (padding is its own
attention segment, so the real tokens see only each other), and the group's slices are
gathered back into the full prediction, the same on every rank for the next step.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from vidscale.models.packed import PackedMeta, seg_ids_from_bounds
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import ParallelDims


def padded(meta: PackedMeta, multiple: int) -> PackedMeta:
    """A full (unsharded) meta padded up to a multiple of `multiple` tokens."""
    L = -(-meta.seq_len // multiple) * multiple
    if L == meta.seq_len:
        return meta
    dev = meta.coords.device
    coords = torch.cat([meta.coords, torch.zeros(L - meta.seq_len, 3, dtype=meta.coords.dtype, device=dev)])
    return replace(meta, seq_len=L, coords=coords, seg_ids=seg_ids_from_bounds(meta.bounds, L).to(dev), cu=None)


class SequenceParallelCall:
    """`(x [N, P], t [V], meta) -> prediction [N, P]` on full tokens, through the sp group."""

    def __init__(self, model, dims: ParallelDims):
        self.model, self.dims = model, dims

    def __call__(self, x_NP: torch.Tensor, t_V: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        d = self.dims
        if d.sp == 1:
            return self.model(x_NP, t_V, meta)
        full = padded(meta, d.sp)
        N, L = x_NP.shape[0], full.seq_len
        x_LP = torch.cat([x_NP, x_NP.new_zeros(L - N, x_NP.shape[1])]) if L > N else x_NP
        n = L // d.sp
        mine = self.model(x_LP[d.sp_rank * n:(d.sp_rank + 1) * n], t_V, full.shard(d.sp_rank, d.sp))
        return collectives.all_gather_cat(mine, group=d.group("sp"))[:N]  # [L, P] in sp-rank order
