"""`vidscale bench zero`: per-rank model + optimizer state bytes under ZeRO, dp=2 vs dp=1.

Two runs of the real ZeRO engine (gloo processes), one optimizer step each so AdamW's
moments exist, then every state tensor a rank holds is counted once per storage:
parameter partitions, fp32 master partitions, gradient partitions, AdamW moments and the
EMA shard. The ratio dp=2 / dp=1 is ideally 0.5 at stage 3.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from vidscale.cluster.local import spawn_ranks
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import ParallelDims
from vidscale.scaling.train.zero import build_zero_engine


QUICK = {"size": "debug"}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET: list[str] = []
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--size", default="small", help="model.size to measure (default small)")
    p.add_argument("--stage", type=int, default=3, choices=[1, 2, 3], help="ZeRO stage (default 3)")


def state_bytes(engine) -> dict[str, int]:
    """Bytes of each kind of state this rank holds, each storage counted once."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            st = t.untyped_storage()
            if st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            total += st.nbytes()
        return total

    params = list(engine.model.parameters())
    zero_opt = engine.ds.optimizer
    # fp32 master partitions (stage 3 / stages 1-2 name them differently); DeepSpeed hands
    # them to the torch AdamW only during step, so read them from its own lists
    masters = list(getattr(zero_opt, "fp32_partitioned_groups_flat", None)
                   or getattr(zero_opt, "single_partition_of_fp32_groups", []))
    return {
        # the module's own share of each parameter: its ZeRO-3 partition, or the whole tensor
        "params": size((p.ds_tensor if engine.stage == 3 else p.data) for p in params),
        "master_params": size(masters),
        "grads": size([q.grad for q in masters] + [p.grad for p in params]
                      + [getattr(zero_opt, "grad_partitions_flat_buffer", None)]),
        "optimizer": size(v for st in engine.optimizer.state.values() for v in st.values()),
        "ema": size((engine.ema or {}).values()),
    }


def _worker(rank: int, world: int, port: int, opts: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    sys.stdout = sys.stderr  # DeepSpeed prints; stdout carries the one JSON object
    cfg = load_config(None, opts["overrides"] + [f"model.size={opts['size']}", f"parallel.zero_stage={opts['stage']}",
                                                 f"cluster.nproc={world}", "train.steps=10"])
    dims = ParallelDims.from_env()
    dims.init("gloo", force=True)
    engine = build_zero_engine(cfg, dims, torch.device("cpu"), lambda: VideoDiT(model_config(cfg.model)))
    g = torch.Generator().manual_seed(rank)
    x, meta = pack([torch.randn(cfg.model.in_channels, 2, 16, 16, generator=g)],
                   [torch.randn(6, cfg.model.text_dim, generator=g)], tuple(cfg.model.patch))
    out = engine.module(x, torch.tensor([500.0]), meta)
    engine.backward(out.square().mean() * engine.loss_scale)
    engine.step()
    res = state_bytes(engine)
    res["total"] = sum(res.values())
    allres = collectives.gather_json(res)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(allres, f)
    dims.destroy()


def run(args) -> dict:
    opts = {"size": args.size, "stage": args.stage, "overrides": list(args.overrides)}
    per_dp = {}
    with tempfile.TemporaryDirectory() as d:
        for world in (1, 2):
            out = os.path.join(d, f"dp{world}.json")
            codes = spawn_ranks(_worker, world, (opts, out))
            if not os.path.exists(out):
                raise RuntimeError(f"bench zero: ranks exited with {codes} before writing results")
            with open(out) as f:
                per_dp[world] = json.load(f)
    worst = max(per_dp[2], key=lambda r: r["total"])
    return {"stage": args.stage, "size": args.size,
            "state_bytes_dp1": per_dp[1][0]["total"], "state_bytes_dp2": worst["total"],
            "state_bytes_ratio": worst["total"] / per_dp[1][0]["total"],
            "breakdown_dp1": per_dp[1][0], "breakdown_dp2": worst}
