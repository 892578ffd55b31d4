"""Model size table. Parameter counts are computed from the architecture, never typed."""
from __future__ import annotations

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


def config_for(size: str, **fields) -> DiTConfig:
    """A row of the table as a `DiTConfig`; `fields` give the rest of the architecture
    (in_channels, patch, text_dim, qk_norm, attn_backend) and may override the row's shape.
    `scaling.config.model_config` calls it with a recipe's model section."""
    if size not in SIZES:
        raise ValueError(f"model.size: unknown size {size!r}, expected one of {list(SIZES)}")
    hidden, depth, heads, mlp = SIZES[size]
    return DiTConfig(**{"hidden": hidden, "depth": depth, "heads": heads, "mlp_ratio": mlp, **fields})


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

