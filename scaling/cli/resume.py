"""`vidscale resume RUN_DIR`: continue a run from its newest complete checkpoint.

The run continues in RUN_DIR with the recipe saved there (RUN_DIR/config.yaml), `--set`
overrides on top; metrics.jsonl is appended. A checkpoint that fails its manifest check
is reported and the one before it is used. `--nproc N` (and `--set parallel.ulysses=..`)
may change the layout: DeepSpeed's shards are converted automatically (universal
checkpoint) and the data loader's position is remapped (no sample of the epoch is lost or
repeated). Same as `vidscale train RUN_DIR/config.yaml --run-dir RUN_DIR --resume auto`,
except that it refuses to start fresh when there is no checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vidscale.cluster.launch import add_launch_args, launch, launch_values
from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.cli.train import add_recipe_args
from vidscale.scaling.config import load_config


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("resume", help="resume a run from its latest complete checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
    add_recipe_args(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="world size now (default: the recipe's cluster.nproc); may differ from the saved one")
    add_launch_args(p)
    return p


def run(args) -> int:
    run_dir = Path(args.run_dir).absolute()
    recipe = run_dir / "config.yaml"
    if not recipe.is_file():
        raise ValueError(f"{recipe}: not found ({args.run_dir} is not a vidscale run directory)")
    root = run_dir / "checkpoints"
    if not ckpt_io.committed(root):
        raise ValueError(f"{root}: no checkpoint to resume from (a run saves every checkpoint.every steps "
                         "and at its end)")
    values = {**launch_values(args), "train.run_dir": str(run_dir), "checkpoint.resume": "auto"}
    if args.nproc is not None:
        values["cluster.nproc"] = args.nproc
    cfg = load_config(recipe, list(args.overrides), values=values)
    return launch(cfg, wait=args.wait, detach=args.detach)
