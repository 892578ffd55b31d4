"""`vidscale info`: the model size table with computed parameter counts."""
from __future__ import annotations

from vidscale.models.sizes import SIZES, param_count
from vidscale.scaling.config import ModelArgs, model_config


def add_parser(sub):
    p = sub.add_parser("info", help="show the model size table", description=__doc__)
    return p


def run(args) -> int:
    print(f"{'size':>6} {'hidden':>7} {'depth':>6} {'heads':>6} {'mlp':>5} {'params':>12}")
    for name, (h, d, n, m) in SIZES.items():
        # counted with the default recipe's patch, latent channels and text width
        params = param_count(model_config(ModelArgs(size=name)))
        print(f"{name:>6} {h:>7} {d:>6} {n:>6} {m:>5} {params / 1e6:>11.2f}M")
    return 0
