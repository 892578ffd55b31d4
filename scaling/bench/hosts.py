"""`vidscale bench hosts`: bytes that cross between hosts per ZeRO-3 step, plain vs ZeRO++ hpZ.

Needs root: it builds a test bed of two network-namespace hosts (cluster/hosts.py) and starts
two ranks on each, as a launcher would (torchrun's environment, `python -m
vidscale.scaling.train.loop`, gloo over `eth0`). The same recipe trains twice, with plain
ZeRO-3 and with `parallel.zero_hpz=2` (the ranks per host), and the bridge's counters give
the bytes that left each host over a window of steady-state steps: the counters are read
when rank 0 logs step 1 and step 1 + --steps (metrics.jsonl), so start-up, DeepSpeed's
first (tracing) step, the final save and the export stay outside it.

  cross_host_bytes_per_step   {"zero3": ..., "hpz": ...}, both hosts' sends added
  cross_host_ratio            hpz / zero3 (goal <= 0.7)
  analytic_ratio              what the ZeRO algebra predicts on gloo (`analytic_bytes`;
                              null where DeepSpeed's windows keep part of the model gathered)
  losses, max_loss_diff       every logged step of both modes: they train the same
  step_s, run_s               wall seconds per step in the window; where each run's time went

The recipe releases every gathered parameter after use and gathers none ahead
(`parallel.max_reuse_distance=0`, `parallel.prefetch_bucket_size=0`): DeepSpeed keeps a
parameter gathered while it is used again within its reuse window (1e9 elements) or was
already taken by the prefetcher's lookahead (the prefetch bucket), so a model smaller than
those windows stays gathered from its forward to its backward, the backward re-gathers
nothing, and hpZ has nothing to save (measured: hpz/zero3 1.00 on the debug model with
DeepSpeed's default windows, `--set parallel.max_reuse_distance=1000000000 --set
parallel.prefetch_bucket_size=5000000`). A model of billions of parameters is far larger
than either window and re-gathers nearly everything; the debug model stands in for it with
the windows at 0.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vidscale.cluster.hosts import INTERFACE, TestBed
from vidscale.models.dit import VideoDiT
from vidscale.models.sizes import param_count
from vidscale.scaling.config import load_config, model_config, save_config

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"
HOSTS, PER_HOST = 2, 2
WARMUP = 1
"""Steps before the window (the first records DeepSpeed's parameter trace and allocates its buffers)."""
DEFAULTS = ["parallel.zero_stage=3", "parallel.max_reuse_distance=0", "parallel.prefetch_bucket_size=0",
            "model.activation_checkpointing=true", "train.tokens_per_batch=256", "optim.warmup=1", "logging.every=1", "logging.progress=false",
            "logging.tensorboard=false", "logging.split_every=0", "checkpoint.every=0", "train.val_videos=0",
            f"cluster.network_interface={INTERFACE}"]
MODES = {"zero3": [], "hpz": [f"parallel.zero_hpz={PER_HOST}"]}

QUICK = {"steps": 2}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET: list[str] = []
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--steps", type=int, default=4, help=f"steps in the measured window, after {WARMUP} (default 4)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per mode (default 900)")


def analytic_bytes(param_bytes: float, gathers: int, hosts: int, world: int) -> float:
    """Bytes that cross between hosts in one step of ZeRO-3 on gloo, ranks in host order.

    gloo's all-gather is a ring in rank order: each rank forwards (world-1)/world of the
    gathered tensor to its successor, and `hosts` of those links cross between hosts (the
    last rank of each host sends to the first of the next), so one gather of the parameters
    moves hosts * (world-1)/world * P across. gloo's reduce-scatter moves what a ring
    all-reduce of the whole buffer moves, twice that (measured on this bed: a 4-rank
    reduce-scatter of P bytes sent 3.0 P across, exactly as much as an all-reduce of P, where
    a ring reduce-scatter would send 1.5 P): the gradient reduce-scatter costs
    2 * hosts * (world-1)/world * P.

    Plain ZeRO-3 gathers the parameters from every rank in the forward, again for the
    activation-checkpointing recompute, and again for the backward (each released after
    use): `gathers` world gathers per step. hpZ gathers from every rank only in the forward;
    the recompute and backward gathers read the secondary partition inside the host, and
    cross nothing. The reduce-scatter is the same in both. With 2 hosts x 2 ranks and
    activation checkpointing: plain 3 x 1.5 P + 3 P = 7.5 P, hpZ 1.5 P + 3 P = 4.5 P -> 0.6.
    """
    ring = hosts * (world - 1) / world * param_bytes
    return gathers * ring + 2 * ring


def world_gathers(p, activation_checkpointing: bool, numel: int) -> int | None:
    """World all-gathers of the parameters in one plain ZeRO-3 step (`p`: the parallel section).

    With both of DeepSpeed's windows at 0 every use gathers: forward, recompute, backward. A
    window that covers the whole model keeps it gathered from the forward to the end of the
    backward: one. In between it depends on DeepSpeed's trace: None (no prediction)."""
    if p.max_reuse_distance == 0 and p.prefetch_bucket_size == 0:
        return 3 if activation_checkpointing else 2
    if max(p.max_reuse_distance, p.prefetch_bucket_size) >= numel:
        return 1
    return None


def _start_ranks(bed: TestBed, cfg_path: Path, port: int, logs: Path) -> list[subprocess.Popen]:
    """One process per rank on its host, with the environment a launcher gives it."""
    world = HOSTS * PER_HOST
    procs = []
    for rank in range(world):
        node = rank // PER_HOST
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % PER_HOST),
                   LOCAL_WORLD_SIZE=str(PER_HOST), GROUP_RANK=str(node), NODE_RANK=str(node),
                   MASTER_ADDR=bed.address("h1"), MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=INTERFACE,
                   OMP_NUM_THREADS="1", VIDSCALE_CONFIG=str(cfg_path))
        out = open(logs / f"rank{rank}.log", "w")
        try:
            procs.append(bed.popen(bed.hosts[node], [sys.executable, "-m", "vidscale.scaling.train.loop"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT))
        finally:
            out.close()  # the child holds its own copy
    return procs


def _logged_steps(metrics: Path) -> dict[int, float]:
    if not metrics.exists():
        return {}
    out = {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        out[rec["step"]] = rec["loss"]
    return out


def measure(bed: TestBed, cfg, run_dir: Path, port: int, steps: int, timeout_s: float) -> dict:
    """Train `cfg` on the bed; bytes each host sent between the window's two marks."""
    run_dir.mkdir(parents=True)
    logs = run_dir / "logs"
    logs.mkdir()
    cfg_path = logs / "config.yaml"
    save_config(cfg, cfg_path)
    marks = {WARMUP: None, WARMUP + steps: None}
    t_start = time.perf_counter()
    procs = _start_ranks(bed, cfg_path, port, logs)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            done = _logged_steps(run_dir / "metrics.jsonl")
            for step in marks:
                if marks[step] is None and step in done:
                    marks[step] = (time.perf_counter(), bed.tx_bytes())
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                bad = next(r for r, c in enumerate(codes) if c not in (None, 0))
                tail = (logs / f"rank{bad}.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"bench hosts: rank {bad} exited with {codes[bad]}:\n" + "\n".join(tail))
            if all(c == 0 for c in codes):
                t_end = time.perf_counter()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench hosts: the ranks did not finish in {timeout_s:.0f} s (logs: {logs})")
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(m is None for m in marks.values()):
        raise RuntimeError(f"bench hosts: steps {sorted(marks)} were not all logged in {run_dir}/metrics.jsonl")
    (t0, a), (t1, b) = marks[WARMUP], marks[WARMUP + steps]
    sent = {h: b[h] - a[h] for h in b}
    return {"bytes_per_step": sum(sent.values()) / steps, "by_host": {h: v / steps for h, v in sent.items()},
            "step_s": (t1 - t0) / steps, "losses": _logged_steps(run_dir / "metrics.jsonl"),
            # where the rest of the run's time went: start-up to the window, the window, the end
            "run_s": {"to_window": t0 - t_start, "window": t1 - t0, "after": t_end - t1}}


def run(args) -> dict:
    if os.geteuid() != 0:
        raise PermissionError("bench hosts needs root: it builds network-namespace hosts (cluster/scripts/hosts.sh)")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected at least 1")
    world = HOSTS * PER_HOST
    base = [*DEFAULTS, f"cluster.nproc={world}", f"train.steps={WARMUP + args.steps}"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="vidscale-bench-hosts-") as tmp, TestBed(HOSTS) as bed:
        for i, (mode, extra) in enumerate(MODES.items()):
            cfg = load_config(RECIPE, base + extra + list(args.overrides))
            run_dir = Path(tmp) / mode
            cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))
            results[mode] = measure(bed, cfg, run_dir, 29500 + i, args.steps, args.timeout)
    params = param_count(model_config(cfg.model))
    # ZeRO-3 pads each parameter to a multiple of the world; fp32 on CPU
    numels = _param_numels(cfg)
    param_bytes = 4 * sum(math.ceil(n / world) * world for n in numels)
    gathers = world_gathers(cfg.parallel, cfg.model.activation_checkpointing, sum(numels))
    # hpZ: one world gather (the forward) whatever the windows; plain: `gathers`
    zero3 = analytic_bytes(param_bytes, gathers, HOSTS, world) if gathers else None
    hpz = analytic_bytes(param_bytes, 1, HOSTS, world)
    z, h = results["zero3"], results["hpz"]
    common = sorted(set(z["losses"]) & set(h["losses"]))
    return {
        "cross_host_bytes_per_step": {m: r["bytes_per_step"] for m, r in results.items()},
        "cross_host_ratio": h["bytes_per_step"] / z["bytes_per_step"],
        "analytic_ratio": hpz / zero3 if zero3 else None,
        "analytic_bytes_per_step": {"zero3": zero3, "hpz": hpz},
        "goal_cross_host_ratio": 0.7,
        "goal_met": h["bytes_per_step"] / z["bytes_per_step"] <= 0.7,
        "bytes_by_host": {m: r["by_host"] for m, r in results.items()},
        "step_s": {m: r["step_s"] for m, r in results.items()},
        "run_s": {m: r["run_s"] for m, r in results.items()},
        "losses": {m: [r["losses"][s] for s in common] for m, r in results.items()},
        "max_loss_diff": max((abs(z["losses"][s] - h["losses"][s]) for s in common), default=float("nan")),
        "params": params, "param_bytes": param_bytes, "hosts": HOSTS, "ranks_per_host": PER_HOST,
        "steps": args.steps, "warmup_steps": WARMUP, "activation_checkpointing": cfg.model.activation_checkpointing,
        "overrides": list(args.overrides),
    }


def _param_numels(cfg) -> list[int]:
    """Elements of each parameter of the recipe's model (built on the meta device)."""
    with torch.device("meta"):
        model = VideoDiT(model_config(cfg.model))
    return [p.numel() for p in model.parameters()]
