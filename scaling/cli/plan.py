"""`vidscale plan RECIPE --gpus N --gpu-memory GB`: memory per rank and step time before launch.

Prints the per-rank memory breakdown against the GPU's memory, the step time, tokens/s and days
for `train.steps` (scaling/train/planner.py). When the recipe does not fit, names the one knob
whose smallest change fits (activation checkpointing, sequence parallelism, offload, tokens per
batch) and `--write-recipe PATH` writes the recipe with that change (never over an existing
file; nothing when the recipe fits as it is). Without --gpus or
--gpu-memory, the recipe's own `plan.gpus` / `plan.gpu_memory_gb` are used. Exit status 3 when
it does not fit."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vidscale.scaling.config import RecipeError, load_config, save_config, set_values
from vidscale.scaling.train.planner import human, plan, smallest_fix

NO_FIT = 3


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="will a recipe fit its GPUs, and how long will it take", description=__doc__)
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, default=0, help="GPUs (default: the recipe's plan.gpus)")
    p.add_argument("--gpu-memory", type=float, default=0.0, metavar="GB",
                   help="memory of one GPU, GiB (default: the recipe's plan.gpu_memory_gb)")
    p.add_argument("--gpu-tflops", type=float, default=0.0, metavar="T",
                   help="dense bf16 TFLOP/s of one GPU (default: the recipe's plan.gpu_tflops)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--write-recipe", metavar="PATH", default="",
                   help="when it does not fit: write the recipe with the smallest change that fits")
    return p


def _write_new(cfg, out: Path) -> None:
    """The recipe written whole, never over an existing file (the input recipe included)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_config(cfg, tmp)
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ValueError(f"{out}: exists; --write-recipe never overwrites a file (choose another name)") from None
    finally:
        tmp.unlink()


def run(args) -> int:
    if args.write_recipe and Path(args.write_recipe).exists():  # before planning: nothing to undo
        raise ValueError(f"{args.write_recipe}: exists; --write-recipe never overwrites a file (choose another name)")
    cfg = load_config(args.recipe, args.overrides)
    gpus = args.gpus or cfg.plan.gpus
    mem = args.gpu_memory or cfg.plan.gpu_memory_gb
    if gpus < 1 or mem <= 0:
        raise RecipeError(f"{args.recipe}: no hardware to plan for: give --gpus and --gpu-memory "
                          "(or set plan.gpus and plan.gpu_memory_gb in the recipe)")
    tflops = args.gpu_tflops or None
    p = plan(cfg, gpus, mem, tflops)
    fix = None if p["fits"] else smallest_fix(cfg, gpus, mem, tflops)
    if fix is not None:
        p["fix"] = {"change": fix[0], "set": fix[1], "total_gb": fix[2]["total_gb"],
                    "tokens_per_s": fix[2]["time"]["tokens_per_s"]}
        if args.write_recipe:
            fixed = set_values(cfg, {**fix[1], "plan.gpus": gpus, "plan.gpu_memory_gb": float(mem)})
            _write_new(fixed, Path(args.write_recipe))
            p["fix"]["written"] = str(args.write_recipe)
    unwritten = ""
    if args.write_recipe and fix is None:
        unwritten = (f"--write-recipe: nothing written to {args.write_recipe}: the recipe "
                     + ("fits as it is" if p["fits"] else "has no single change that fits"))
    if args.json:
        print(json.dumps(p))
        if unwritten:
            print(f"vidscale plan: {unwritten}", file=sys.stderr)  # stdout holds only the JSON
    else:
        print(human(p))
        if not p["fits"]:
            if fix is None:
                print("  no single knob fits: use more GPUs or a smaller model")
            else:
                sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fix[1].items())
                print(f"  fits with {fix[0]}: {sets} ({fix[2]['total_gb']:.2f} GB, "
                      f"{fix[2]['time']['tokens_per_s']:,.0f} tokens/s)")
                if args.write_recipe:
                    print(f"  written: {args.write_recipe}")
        if unwritten:
            print(f"  {unwritten}")
    return 0 if p["fits"] else NO_FIT
