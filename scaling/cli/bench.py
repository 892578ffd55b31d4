"""`vidscale bench NAME [--json]`: measure speed and memory as ratios taken in one run."""
from __future__ import annotations

import argparse
import json

from vidscale.scaling.bench import checkpoint, dp, loader, packing, sp, step, zero

# (name, module in scaling/bench/, one-line help)
BENCHES = [
    ("packing", packing, "NaViT packing efficiency vs pad-to-longest and bucketing"),
    ("loader", loader, "loader batches/s from real shards vs the training step"),
    ("step", step, "training-step MFU against the machine's measured GEMM peak, time split"),
    ("dp", dp, "ZeRO-3 data-parallel overhead: dp=2 vs dp=1 step time per token"),
    ("sp", sp, "sequence parallelism sp=2 vs sp=1: memory, time, exactness, bytes moved"),
    ("zero", zero, "ZeRO-3 model+optimizer state bytes per rank, dp=2 vs dp=1"),
    ("checkpoint", checkpoint, "ZeRO-3 checkpoint save/load MB/s vs raw disk; stall per save"),
]


def add_parser(sub):
    p = sub.add_parser("bench", help="run a benchmark", description=__doc__)
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, mod, help_ in BENCHES:
        bp = bsub.add_parser(name, help=help_, description=help_)
        bp.add_argument("--json", action="store_true", help="print one JSON object")
        bp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key of the benchmark's recipe")
        mod.add_args(bp)
        bp.set_defaults(_bench=mod)
    return p


def run(args) -> int:
    result = args._bench.run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0
