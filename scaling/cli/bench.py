"""`vidscale bench NAME [--json] [--quick]`: measure speed and memory as ratios taken in one run.

`--quick` runs each benchmark at the smallest sizes and repetitions that still exercise its
code (each module's `QUICK` flag values and `QUICK_SET` recipe overrides): seconds, not a
measurement; flags and `--set` given on the command line still win. tests/e2e/test_bench.py
runs every benchmark this way and checks its JSON keys."""
from __future__ import annotations

import argparse
import json

from vidscale.scaling.bench import checkpoint, dp, hosts, loader, packing, plan, sp, step, wan, zero

# (name, module in scaling/bench/, one-line help)
BENCHES = [
    ("packing", packing, "NaViT packing efficiency vs pad-to-longest and bucketing"),
    ("loader", loader, "loader batches/s from real shards vs the training step"),
    ("step", step, "training-step MFU against the machine's measured GEMM peak, time split"),
    ("dp", dp, "ZeRO-3 data-parallel overhead: dp=2 vs dp=1 step time per token"),
    ("sp", sp, "sequence parallelism sp=2 vs sp=1: memory, time, exactness, bytes moved"),
    ("zero", zero, "ZeRO-3 model+optimizer state bytes per rank, dp=2 vs dp=1"),
    ("checkpoint", checkpoint, "ZeRO-3 checkpoint save/load MB/s vs raw disk; stall per save"),
    ("hosts", hosts, "bytes crossing between 2 namespace hosts per ZeRO-3 step: plain vs hpZ (root)"),
    ("wan", wan, "VideoDiT vs diffusers' WanTransformer3DModel at equal shape: fwd+bwd tokens/s"),
    ("plan", plan, "vidscale plan's memory and step time against measured runs (ZeRO 0/3, sp 1/2, AC, two sizes)"),
]


def add_parser(sub):
    p = sub.add_parser("bench", help="run a benchmark", description=__doc__)
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, mod, help_ in BENCHES:
        bp = bsub.add_parser(name, help=help_, description=help_)
        bp.add_argument("--json", action="store_true", help="print one JSON object")
        bp.add_argument("--quick", action="store_true",
                        help="smallest sizes and repetitions that exercise the code (seconds; not a measurement)")
        bp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key of the benchmark's recipe")
        mod.add_args(bp)
        bp.set_defaults(_bench=mod, _defaults={k: bp.get_default(k) for k in mod.QUICK})
    return p


def apply_quick(args) -> None:
    """The module's quick sizes, for the flags left at their defaults; its quick recipe
    overrides go first so that the user's `--set` wins."""
    mod = args._bench
    for k, v in mod.QUICK.items():
        if getattr(args, k) == args._defaults[k]:
            setattr(args, k, v)
    args.overrides = list(mod.QUICK_SET) + list(args.overrides)


def run(args) -> int:
    if args.quick:
        apply_quick(args)
    result = args._bench.run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0
