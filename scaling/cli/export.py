"""`vidscale export RUN_DIR --out model.safetensors [--ema]`: consolidated weights.

Takes the newest complete checkpoint of RUN_DIR (or the step_* directory given), gathers
the full fp32 weights (from DeepSpeed's ZeRO shards when the run used ZeRO; no process
group needed) or the EMA weights, and writes one safetensors file with the recipe in its
metadata and what it is (`kind`: dit or vae): `scaling.checkpoint.weights.load_weights(path)`
rebuilds a `VideoDiT` from it, `models.vae.load_vae(path)` a VAE run's `VideoVAE`; no DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from vidscale.scaling.checkpoint.manager import resolve
from vidscale.scaling.checkpoint.weights import save_weights
from vidscale.scaling.checkpoint.zero import export_weights
from vidscale.scaling.config import load_config
from vidscale.scaling.train.tasks import weights_metadata


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write consolidated weights of a run's latest checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory, its checkpoints/, or one step_* checkpoint directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    return p


def export(spec: str, out: str | Path, ema: bool = False) -> tuple[Path, Path]:
    """Write the weights; returns (checkpoint used, output file)."""
    ckpt = resolve(spec, Path(spec) / "checkpoints", report=lambda m: print(f"vidscale export: {m}", file=sys.stderr))
    assert ckpt is not None
    state = json.loads((ckpt / "state.json").read_text())
    cfg = load_config(ckpt / "config.yaml")
    if state["layout"]["engine"] == "zero":
        weights = export_weights(ckpt, ema)
    else:
        f = ckpt / ("ema.safetensors" if ema else "model.safetensors")
        if not f.exists():
            raise ValueError(f"{ckpt}: this run kept no EMA (optim.ema_decay=0); export without --ema")
        weights = load_file(str(f))
    path = save_weights(weights, out, cfg, kind=cfg.task, ema=ema,
                        extra={**weights_metadata(cfg), "step": state["step"], "checkpoint": str(ckpt)})
    return ckpt, path


def run(args) -> int:
    ckpt, path = export(args.run_dir, args.out, args.ema)
    print(json.dumps({"checkpoint": str(ckpt), "out": str(path), "ema": args.ema}))
    return 0
