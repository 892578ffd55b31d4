"""The one object that knows the parallel layout: world = dp x sp, sp = ulysses x ring.

Rank order: sp is innermost, so the sp ranks of one data-parallel group are neighbours
(on one node when possible). Within sp, ulysses is innermost, ring outside it.
Nobody else creates process groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch


@dataclass
class ParallelDims:
    world: int
    rank: int
    ulysses: int = 1
    ring: int = 1
    local_rank: int = 0
    groups: dict = field(default_factory=dict, repr=False)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def __post_init__(self):
        # users get a one-line error from scaling.config.check_layout (recipe load, launchers)
        assert self.world % self.sp == 0, f"layout invariant: sp {self.sp} divides the world {self.world}"

    @classmethod
    def from_env(cls, ulysses: int = 1, ring: int = 1) -> "ParallelDims":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(world=world, rank=rank, ulysses=ulysses, ring=ring, local_rank=local)

    def init(self, backend: str, timeout_s: int = 300, force: bool = False) -> None:
        """Start torch.distributed (if world > 1) and build every process group.

        `force` also starts a world of one (DeepSpeed needs a process group even then);
        an in-memory store means no port is taken.
        """
        import torch.distributed as dist

        if not self.distributed:
            if force and not dist.is_initialized():
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            return
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        # new_group must be called by every rank for every group, in the same order
        for kind in ("sp", "ulysses", "ring", "dp"):
            for ranks in self._group_ranks(kind):
                g = dist.new_group(ranks, backend=backend)
                if self.rank in ranks:
                    self.groups[kind] = g

    def _group_ranks(self, kind: str) -> list[list[int]]:
        w, sp, u = self.world, self.sp, self.ulysses
        if kind == "sp":
            return [list(range(s, s + sp)) for s in range(0, w, sp)]
        if kind == "dp":
            return [list(range(i, w, sp)) for i in range(sp)]
        if kind == "ulysses":
            return [list(range(s, s + u)) for s in range(0, w, u)]
        if kind == "ring":  # same ulysses position, consecutive ulysses blocks of one sp group
            return [[g + r * u + i for r in range(self.ring)] for g in range(0, w, sp) for i in range(u)]
        raise AssertionError(kind)

    def group(self, kind: str):
        return self.groups.get(kind)

    def destroy(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this rank among the `visible` ones.

    Every GPU of the node visible to every rank (torchrun, plain Slurm): the local rank's own.
    Fewer visible than local ranks (Ray gives each worker its own GPU in CUDA_VISIBLE_DEVICES;
    Slurm sites that bind one GPU per task): rank `local_rank` of a node holding `visible`
    GPUs per process uses `local_rank % visible`, which is 0 for a one-GPU binding."""
    if visible < 1:
        raise ValueError("train.device=cuda but no CUDA device is visible to this process")
    return local_rank % visible


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def pick_backend(pref: str, device: torch.device) -> str:
    if pref != "auto":
        return pref
    return "nccl" if device.type == "cuda" else "gloo"
