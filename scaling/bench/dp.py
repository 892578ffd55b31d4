"""`vidscale bench dp`: ZeRO-3 data-parallel overhead, dp=2 vs dp=1 step time per token.

Weak scaling: every rank packs the same token budget and runs one thread (one core each),
so with perfect data parallelism a dp=2 step takes as long as a dp=1 step while doing
twice the tokens. What it costs on top is ZeRO-3: parameter all-gathers in forward and
backward, gradient reduce-scatters, and the host work DeepSpeed's hooks add.
  dp_time_ratio   step seconds at dp=2 / step seconds at dp=1 (same tokens per rank);
                  goal <= 1.3. Equal to (seconds per token per rank) dp=2 / dp=1.
Each world size runs twice, alternating (dp1, dp2, dp1, dp2), and keeps its best step, so
a load spike on the shared machine hits neither side alone. `--buckets` repeats the dp=2
measurement for several `parallel.reduce_bucket_size` = `prefetch_bucket_size` values.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

from vidscale.cluster.local import spawn_ranks
from vidscale.scaling.config import load_config
from vidscale.scaling.parallel import collectives
from vidscale.scaling.train.loop import Trainer


QUICK = {"steps": 1, "rounds": 1}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET = ["model.size=debug", "train.tokens_per_batch=256"]
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--steps", type=int, default=3, help="timed steps per run after one warm-up (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating dp1/dp2 rounds (default 2)")
    p.add_argument("--buckets", default="", help="comma-separated bucket sizes (elements) to compare at dp=2")


DEFAULTS = ["model.size=30M", "train.tokens_per_batch=2048", "parallel.zero_stage=3", "train.steps=1000000",
            "optim.warmup=1", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
            "train.val_videos=0"]


def _worker(rank: int, world: int, port: int, overrides: list[str], steps: int, out_path: str) -> None:
    torch.set_num_threads(1)
    sys.stdout = sys.stderr  # DeepSpeed prints; results go to out_path
    cfg = load_config(None, DEFAULTS + [f"cluster.nproc={world}", f"train.run_dir={os.path.dirname(out_path)}/run{world}"]
                      + overrides)
    tr = Trainer(cfg)
    tr.train_step()  # warm-up: DeepSpeed's first step allocates its buffers
    best, tokens = float("inf"), 0
    for _ in range(steps):
        if world > 1:  # start the timed step together
            collectives.barrier()
        t0 = time.perf_counter()
        out = tr.train_step()
        float(out["grad_norm"])
        best = min(best, time.perf_counter() - t0)
        tokens = out["local_tokens"]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"step_s": best, "tokens_per_rank": tokens}, f)
    tr.dims.destroy()


def _measure(world: int, overrides: list[str], steps: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"dp{world}-{time.monotonic_ns()}.json")
    codes = spawn_ranks(_worker, world, (overrides, steps, out))
    if not os.path.exists(out):
        raise RuntimeError(f"bench dp: dp={world} ranks exited with {codes} before writing results")
    with open(out) as f:
        return json.load(f)


def run(args) -> dict:
    over = list(args.overrides)
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vidscale-bench-dp-") as tmp:
        for _ in range(args.rounds):
            for world in (1, 2):
                r = _measure(world, over, args.steps, tmp)
                if world not in best or r["step_s"] < best[world]["step_s"]:
                    best[world] = r
        buckets = {}
        for b in [int(float(x)) for x in args.buckets.split(",") if x.strip()]:
            r = _measure(2, over + [f"parallel.reduce_bucket_size={b}", f"parallel.prefetch_bucket_size={b}"],
                         args.steps, tmp)
            buckets[str(b)] = r["step_s"] / best[1]["step_s"]
    ratio = best[2]["step_s"] / best[1]["step_s"]
    res = {"dp_time_ratio": ratio, "goal_dp_time_ratio": 1.3, "goal_met": ratio <= 1.3,
           "step_s_dp1": best[1]["step_s"], "step_s_dp2": best[2]["step_s"],
           "tokens_per_rank": best[1]["tokens_per_rank"],
           "tokens_per_s_dp1": best[1]["tokens_per_rank"] / best[1]["step_s"],
           "tokens_per_s_dp2": 2 * best[2]["tokens_per_rank"] / best[2]["step_s"],
           "overrides": over}
    if buckets:
        res["dp_time_ratio_by_bucket"] = buckets
    return res
