"""`vidscale bench sp`: sequence parallelism at sp=2 against sp=1 on one long packed sequence.

Two gloo processes. Each first runs the whole sequence alone (sp=1), then each scheme
(Ulysses, ring) with half the sequence per rank. Per rank: peak memory of forward +
backward (torch's MemTracker: parameters, gradients, activations, temporaries), median
step time, the output's max abs difference from sp=1 (slices gathered), and the bytes
each rank sent per layer next to the analytic volume of the scheme. Ratios are sp=2 over
sp=1, the worst rank and (top level) the worst scheme.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

from vidscale.cluster.local import spawn_ranks
from vidscale.models.attention import sdpa_loop
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import ParallelDims
from vidscale.scaling.parallel.sequence import build_sp_attention, sent_bytes

SCHEMES = {"ulysses": (2, 1), "ring": (1, 2)}


QUICK = {"frames": 2, "size": 8, "reps": 1}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET = ["model.size=debug"]
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--frames", type=int, default=8, help="latent frames of the long video (default 8)")
    p.add_argument("--size", type=int, default=32, help="latent height = width of the long video (default 32)")
    p.add_argument("--reps", type=int, default=3, help="timed forward+backward repetitions (default 3)")
    p.add_argument("--schemes", default="ulysses,ring", help="comma list of: ulysses, ring")


def analytic_bytes_per_layer(scheme: str, n: int, heads: int, head_dim: int, elem: int, deg: int) -> int:
    """Bytes one rank sends per attention layer, forward + backward, for n local tokens."""
    blk = n * heads * head_dim * elem  # one of q, k, v, out for the local tokens
    if scheme == "ulysses":  # q,k,v and out all-to-all forward, their gradients backward
        return 8 * blk * (deg - 1) // deg
    # ring: K,V move deg-1 times forward and again backward; dK,dV (fp32) deg times home
    return 2 * blk * (deg - 1) * 2 + 2 * n * heads * head_dim * 4 * deg


def _batch(cfg, frames: int, size: int, sp: int):
    g = torch.Generator().manual_seed(0)
    C, Dt = cfg.model.in_channels, cfg.model.text_dim
    # one long video and a short one behind it: the boundary falls inside a slice
    lats = [torch.randn(C, frames, size, size, generator=g), torch.randn(C, 2, size // 2, size // 2, generator=g)]
    texts = [torch.randn(12, Dt, generator=g), torch.randn(5, Dt, generator=g)]
    x, meta = pack(lats, texts, tuple(cfg.model.patch), multiple=sp)
    return x, meta, torch.tensor([300.0, 700.0])


def _measure(fn, reps: int, model) -> tuple[float, int]:
    from torch.distributed._tools.mem_tracker import MemTracker
    fn()  # warm-up
    mt = MemTracker()
    mt.track_external(model)
    with mt:
        fn()
    peak = int(sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values()))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def _worker(rank: int, world: int, port: int, opts: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    sys.stdout = sys.stderr  # stdout carries the one JSON object
    world_dims = ParallelDims(world=world, rank=rank)  # sp=1: the whole sequence on every rank
    world_dims.init("gloo")
    cfg = load_config(None, opts["overrides"])
    mcfg = model_config(cfg.model)
    torch.manual_seed(0)
    model = VideoDiT(mcfg)
    model.init_weights()
    with torch.no_grad():  # leave adaLN-Zero's identity start, or every output would be 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, meta, t = _batch(cfg, opts["frames"], opts["size"], world)

    def step(xs, ms):
        model.zero_grad(set_to_none=True)
        out = model(xs, t, ms)
        out.square().mean().backward()
        return out

    ref = step(x, meta).detach()
    t1, m1 = _measure(lambda: step(x, meta), opts["reps"], model)
    res = {"tokens": meta.seq_len, "sp1": {"time_s": t1, "peak_bytes": m1}}
    for name in opts["schemes"]:
        u, r = SCHEMES[name]
        dims = ParallelDims(world=world, rank=rank, ulysses=u, ring=r)
        dims.init("gloo")
        kernel = build_sp_attention(dims, sdpa_loop)
        model.set_attention(kernel)
        n = meta.seq_len // dims.sp
        xs, ms = x[dims.sp_rank * n:(dims.sp_rank + 1) * n], meta.shard(dims.sp_rank, dims.sp)
        before = sent_bytes(kernel)
        out = step(xs, ms).detach()
        sent = (sent_bytes(kernel) - before) // mcfg.depth
        diff = (collectives.all_gather_cat(out) - ref).abs().max().item()  # the slices, in rank order
        t2, m2 = _measure(lambda: step(xs, ms), opts["reps"], model)
        res[name] = {"time_s": t2, "peak_bytes": m2, "max_abs_diff": diff, "bytes_per_layer": sent,
                     "analytic_bytes_per_layer": analytic_bytes_per_layer(
                         name, n, mcfg.heads, mcfg.hidden // mcfg.heads, x.element_size(), dims.sp)}
        model.set_attention(sdpa_loop)
    allres = collectives.gather_json(res)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(allres, f)
    collectives.barrier()
    world_dims.destroy()


def run(args) -> dict:
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for s in schemes:
        if s not in SCHEMES:
            raise ValueError(f"--schemes: unknown scheme {s!r}, expected some of {sorted(SCHEMES)}")
    opts = {"frames": args.frames, "size": args.size, "reps": args.reps, "schemes": schemes,
            "overrides": list(args.overrides)}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sp.json")
        codes = spawn_ranks(_worker, 2, (opts, out))
        if not os.path.exists(out):
            raise RuntimeError(f"bench sp: ranks exited with {codes} before writing results")
        with open(out) as f:
            ranks = json.load(f)
    result: dict = {"tokens": ranks[0]["tokens"], "sp": 2}
    for s in schemes:
        result[s] = {
            "memory_ratio": max(r[s]["peak_bytes"] / r["sp1"]["peak_bytes"] for r in ranks),
            "time_ratio": max(r[s]["time_s"] / r["sp1"]["time_s"] for r in ranks),
            "max_abs_diff": max(r[s]["max_abs_diff"] for r in ranks),
            "peak_bytes_sp1": max(r["sp1"]["peak_bytes"] for r in ranks),
            "peak_bytes_sp2": max(r[s]["peak_bytes"] for r in ranks),
            "bytes_per_layer": max(r[s]["bytes_per_layer"] for r in ranks),
            "analytic_bytes_per_layer": max(r[s]["analytic_bytes_per_layer"] for r in ranks),
        }
    for k in ("memory_ratio", "time_ratio", "max_abs_diff"):
        result[k] = max(result[s][k] for s in schemes)
    return result
