"""The `checkpoint` section."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import xxhash

CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
"""`checkpoint.checksum`: name -> hasher (scaling/checkpoint/storage.py hashes with it). The
table sits here, at the head of the engine chain, because the checkpoint package reads
recipes (it imports this package), so this package cannot import it."""


@dataclass
class CheckpointArgs:
    every: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    keep_every: int = 0
    """Also keep every M-th step's checkpoint (0 = off)."""
    async_save: bool = False
    checksum: str = "xxh3_128"
    """Manifest checksum of every file: xxh3_128 (fast, detects damage) or sha256."""
    resume: str = ""
    """'' (fresh), 'auto' (latest complete checkpoint in the run dir) or a checkpoint path."""
    keep_steps: list[int] = field(default_factory=list)
    """Also save at these steps and never delete those checkpoints (a wsd trunk's branch points)."""
    branch_from: str = ""
    """A checkpoint of another run (its step_* directory) to start from when this run has none of
    its own: every part of the state (weights, optimizer, data position, RNG, step), then this
    recipe's own length and schedule. What a wsd-branches sweep's cooldown branches run."""
