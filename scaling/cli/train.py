"""`vidscale train RECIPE`: train a recipe here (one or more local processes), on a Ray
cluster (`--launcher ray`) or as a Slurm job (`--launcher slurm`)."""
from __future__ import annotations

import argparse

from vidscale.cluster.launch import add_launch_args, launch, launch_values
from vidscale.data.args import shard_sets
from vidscale.data.shards import check_source
from vidscale.scaling.config import load_config


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=20 (repeatable)")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a recipe", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/debug.yaml")
    add_recipe_args(p)
    p.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--nproc", type=int, default=None, help="world size: processes to start (default cluster.nproc)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the latest complete checkpoint of the run dir ('auto'; starts fresh "
                        "only in a run dir without checkpoints) or from a checkpoint path (checkpoint.resume); "
                        "without it, a run dir that holds an earlier run is refused")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start a new run (step 0) from these weights: a `vidscale export` file, a run directory "
                        "(its latest checkpoint) or a safetensors file (train.init_from; weights only, unlike "
                        "--resume)")
    add_launch_args(p)
    return p


def run(args) -> int:
    # paths and the like are set as given, never parsed (a run dir named `a #2` stays that)
    values = launch_values(args)
    if args.run_dir:
        values["train.run_dir"] = args.run_dir
    if args.nproc is not None:
        values["cluster.nproc"] = args.nproc
    if args.resume is not None:
        values["checkpoint.resume"] = args.resume
    if args.init_from is not None:
        values["train.init_from"] = args.init_from
    cfg = load_config(args.recipe, list(args.overrides), values=values)
    for path, key, _, _ in shard_sets(cfg.data) if cfg.cluster.launcher == "local" and cfg.task == "dit" else []:
        # pre-flight before any process or run dir: index present, channels/text width/patch fit the
        # model (Ray/Slurm runs may read data only the cluster sees: their ranks check it themselves)
        check_source(path, patch=cfg.model.patch, channels=cfg.model.in_channels,
                     text_dim=cfg.model.text_dim, tokens_per_batch=cfg.train.tokens_per_batch,
                     drop_tokens=cfg.data.drop_tokens, drop_min_tokens=cfg.data.drop_min_tokens, key=key)
    return launch(cfg, wait=args.wait, detach=args.detach)
