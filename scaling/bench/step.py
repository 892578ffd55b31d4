"""MFU of the training step against this machine's own matmul peak, and where the time goes.

    vidscale bench step --json [--set model.size=30M --set train.tokens_per_batch=4096 ...]

In one run, alternating repetitions (the machine is shared: each figure is the best of its
repetitions, and the two interleave so that both see the same load):
  peak_flops          a large GEMM of the step's dtype on the step's device (FLOP/s)
  model_flops_per_s   the step's model FLOPs (scaling/train/flops.py: every matmul of the packed
                      batch, attention quadratic in each video's own length, x3 for
                      training) over the step's wall time (data wait, optimizer included)
  mfu                 model_flops_per_s / peak_flops
  mfu_cpu_time        the same ratio per process-CPU second instead of per wall second (CPU
                      only): insensitive to time-slicing by other processes on a shared machine
  tokens_per_s        packed tokens (padding included) per second; real_tokens_per_s too
  split               name -> fraction of one profiled step (scaling/train/step_split.py)
  peak_memory_bytes   CUDA only: torch.cuda.max_memory_allocated over the run (what `vidscale plan` predicts)
Defaults: the 30M model, 4096 tokens per step, fp32, plain torch engine, one process.
"""
from __future__ import annotations

import tempfile
import time

import torch

from vidscale.models.sizes import param_count
from vidscale.scaling.config import load_config
from vidscale.scaling.train.flops import measure_peak_flops
from vidscale.scaling.train.loop import Trainer
from vidscale.scaling.train.step_split import profile_step

DEFAULTS = ["model.size=30M", "train.tokens_per_batch=4096", "train.dtype=fp32", "parallel.zero_stage=0",
            "train.steps=1000000", "optim.warmup=1", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.every=0"]


QUICK = {"reps": 1, "warmup": 1}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET = ["model.size=debug", "train.tokens_per_batch=256"]
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--recipe", default=None, help="recipe to start from (default: built-in defaults)")
    p.add_argument("--reps", type=int, default=8, help="timed steps, each after a GEMM peak rep (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--no-split", action="store_true", help="skip the profiled step")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads for the GEMM and the step (default: torch's choice). "
                        "1 makes mfu_cpu_time robust on a machine shared with other jobs")


def time_step(tr) -> tuple[float, float, dict]:
    """Wall and process CPU seconds of one full training step (loader, forward, backward, optimizer)."""
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = tr.train_step()
    float(out["grad_norm"])  # the step is done when its results exist on the host
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def gemm_rates(device, dtype, seconds: float, n: int = 2048) -> tuple[float, float]:
    """Best FLOP/s of an n x n GEMM over `seconds`: per wall second, and per process-CPU second.
    CUDA: the large-GEMM, event-timed peak of `measure_peak_flops` (no per-CPU-second figure)."""
    if device.type == "cuda":
        return measure_peak_flops(device, dtype, seconds=seconds), 0.0
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    wall = cpu = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        wall = max(wall, 2 * n ** 3 / dt)
        cpu = max(cpu, 2 * n ** 3 / dc) if dc > 0 else cpu
    return wall, cpu


def run(args) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vidscale-bench-step-") as tmp:
        cfg = load_config(args.recipe, DEFAULTS + [f"train.run_dir={tmp}/run"] + list(args.overrides))
        tr = Trainer(cfg)
        dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        try:
            for _ in range(args.warmup):
                time_step(tr)
            peak = peak_cpu = 0.0
            best = best_cpu = None
            for _ in range(args.reps):
                w, c = gemm_rates(tr.device, dtype, seconds=0.5)
                peak, peak_cpu = max(peak, w), max(peak_cpu, c)
                dt, dc, out = time_step(tr)
                if best is None or out["flops"] / dt > best[0]:
                    best = (out["flops"] / dt, dt, out)
                best_cpu = max(best_cpu or 0.0, out["flops"] / dc)
            rate, dt, out = best
            split = profile_step(tr)[1] if not args.no_split else {}
            peak_mem = torch.cuda.max_memory_allocated(tr.device) if tr.device.type == "cuda" else None
        finally:
            tr.dims.destroy()
    cpu = tr.device.type == "cpu"
    return {"mfu": rate / peak, "mfu_cpu_time": best_cpu / peak_cpu if cpu else None,
            "tokens_per_s": out["local_tokens"] / dt, "real_tokens_per_s": float(out["global_real"]) / dt,
            "peak_flops": peak, "model_flops_per_s": rate,
            "peak_flops_per_cpu_s": peak_cpu if cpu else None, "model_flops_per_cpu_s": best_cpu if cpu else None,
            "step_s": dt, "step_flops": out["flops"], "split": split, "goal_mfu": 0.75,
            "model": cfg.model.size, "params": param_count(tr.task.mcfg), "tokens_per_step": out["local_tokens"],
            "dtype": cfg.train.dtype, "device": str(tr.device), "zero_stage": cfg.parallel.zero_stage,
            "compile": cfg.model.compile, "threads": torch.get_num_threads(), "reps": args.reps,
            "peak_memory_bytes": peak_mem, "device_name": torch.cuda.get_device_name(tr.device) if not cpu else None}
