"""Model size table. Parameter counts are computed from the architecture, never typed."""
from __future__ import annotations

from dataclasses import replace

from vidscale.models.dit import DiTConfig

# name: (hidden, depth, heads, mlp_ratio)
SIZES: dict[str, tuple[int, int, int, float]] = {
    "debug": (96, 4, 4, 4.0),
    "tiny": (96, 3, 4, 4.0),
    "small": (128, 4, 4, 4.0),
    "S": (384, 12, 6, 4.0),
    "B": (768, 12, 12, 4.0),
    "L": (1024, 24, 16, 4.0),
    "XL": (1152, 28, 16, 4.0),
    "30M": (384, 9, 6, 4.0),
    "1B": (1280, 28, 20, 4.0),
    "3B": (2048, 32, 16, 4.0),
    "7B": (3072, 36, 24, 4.0),
    "14B": (4096, 40, 32, 4.0),
    "30B": (5120, 52, 40, 4.0),
}


def config_for(size: str, **overrides) -> DiTConfig:
    if size not in SIZES:
        raise ValueError(f"model.size: unknown size {size!r}, expected one of {list(SIZES)}")
    hidden, depth, heads, mlp = SIZES[size]
    return replace(DiTConfig(hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp), **overrides)


def param_count(cfg: DiTConfig) -> int:
    """Exact parameter count of `VideoDiT(cfg)` from its architecture."""
    D, P, Dt, Mh, Dh = cfg.hidden, cfg.patch_dim, cfg.text_dim, cfg.mlp_hidden, cfg.hidden // cfg.heads
    lin = lambda i, o: i * o + o  # noqa: E731
    qkn = 2 * Dh if cfg.qk_norm else 0
    block = (lin(D, 3 * D) + lin(D, D) + qkn  # self-attention
             + 2 * D  # norm2 affine
             + lin(D, D) + lin(D, 2 * D) + lin(D, D) + qkn  # cross-attention
             + lin(D, Mh) + lin(Mh, D)  # mlp
             + lin(D, 6 * D))  # adaLN
    embed = lin(P, D) + lin(256, D) + lin(D, D) + lin(Dt, D) + lin(D, D)
    final = lin(D, 2 * D) + lin(D, P)
    return embed + cfg.depth * block + final


def matmul_params(cfg: DiTConfig) -> tuple[int, int]:
    """(weights applied to every video token, weights applied to every text token) per forward.

    Used by the FLOPs model: a Linear of W weights costs 2*W FLOPs per token it touches.
    adaLN and timestep MLPs run once per video and are negligible; they are not counted.
    """
    D, P, Mh = cfg.hidden, cfg.patch_dim, cfg.mlp_hidden
    per_video_token = P * D + cfg.depth * (3 * D * D + D * D + D * D + D * D + 2 * D * Mh) + D * P
    per_text_token = cfg.text_dim * D + D * D + cfg.depth * (2 * D * D)
    return per_video_token, per_text_token
