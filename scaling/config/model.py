"""The `model` section, and the `DiTConfig` it describes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vidscale.models.dit import DiTConfig
from vidscale.models.sizes import config_for


@dataclass
class ModelArgs:
    size: str = "debug"
    """Row of the size table (`models/sizes.py`): debug, tiny, small, S, B, L, XL, 30M, 1B .. 30B."""
    hidden: int = 0
    """Override the table's width (0 keeps it). Sweeps use hidden/depth for custom shapes."""
    depth: int = 0
    """Override the table's depth (0 keeps it)."""
    heads: int = 0
    """Override the table's head count (0 keeps it)."""
    mlp_ratio: float = 0.0
    """Override the table's MLP ratio (0 keeps it)."""
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Patch size (pt, ph, pw) over latent frames, rows and columns."""
    in_channels: int = 4
    """Latent channels C (must match the data's latent encoder)."""
    text_dim: int = 384
    """Width of the text-encoder tokens (384 for the packaged MiniLM)."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (per head) before RoPE."""
    attn_backend: str = "sdpa"
    """Packed attention kernel (`models.attention.KERNELS`): sdpa (per-video SDPA; CPU),
    varlen (flash; GPU), dense (reference)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (non-reentrant torch.utils.checkpoint, under the forward's autocast)."""
    ac_offload: bool = False
    """With activation checkpointing, keep the saved block inputs in CPU memory."""
    compile: bool = False
    """torch.compile each block."""


def model_config(args: ModelArgs) -> DiTConfig:
    """The `DiTConfig` a recipe's model section describes."""
    over: dict[str, Any] = dict(patch=tuple(args.patch), in_channels=args.in_channels, text_dim=args.text_dim,
                                qk_norm=args.qk_norm, attn_backend=args.attn_backend)
    for k in ("hidden", "depth", "heads", "mlp_ratio"):
        if getattr(args, k):
            over[k] = getattr(args, k)
    return config_for(args.size, **over)
