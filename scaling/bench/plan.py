"""`vidscale bench plan`: the planner's memory and time against measurement, on this machine.

    vidscale bench plan --json

Runs small configurations (ZeRO stage 0 and 3, sp 1 and 2, activation checkpointing on and off,
two model sizes), each as its own processes (one per rank, gloo on the CPU), and compares each
rank's peak memory and step time with `scaling/train/planner.py`'s prediction for the CPU.

Peak memory, measured: the bytes of live tensor storage in the rank's training thread, from
before the engine is built through two optimizer steps (the first allocates Adam's moments).
A `TorchDispatchMode` sees every tensor an op returns; each new storage is counted once and
uncounted when it is freed (a finalizer on the storage). This is what a CUDA allocator's
`max_memory_allocated` counts on a GPU (tensor bytes, not the process's RSS): parameters,
gradients, optimizer and EMA states, DeepSpeed's partitions and buckets, saved activations and
the backward's transients. The batch the loader made before the step is counted when it is
moved (on the CPU a no-op move keeps the loader's storage: not counted).
Step time, measured: the median of `--reps` steps after the memory steps, outside that mode.
Predicted time: the FLOPs model at an MFU calibrated on one case (`--calibrate`; its measured time
and the machine's fp32 GEMM peak on one thread) plus the communication volume at
`plan.bandwidth_gb_s`. On a machine shared with other jobs the times move with the load; the
memory figures do not (they count bytes).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vidscale.scaling.config import load_config, save_config, set_values
from vidscale.scaling.parallel import collectives
from vidscale.scaling.train.flops import measure_peak_flops
from vidscale.scaling.train.loop import Trainer
from vidscale.scaling.train.planner import memory, step_time

COMMON = ["train.tokens_per_batch=1024", "train.steps=1000", "optim.warmup=1", "logging.progress=false",
          "logging.tensorboard=false", "logging.split_every=0", "checkpoint.every=0", "train.val_videos=0",
          "data.synthetic_videos=64", "train.device=cpu", "train.dtype=fp32", "train.tune_malloc=false"]
# (name, overrides, world size)
CASES = [
    ("debug zero0", ["model.size=debug", "parallel.zero_stage=0"], 1),
    ("debug zero0 ac", ["model.size=debug", "parallel.zero_stage=0", "model.activation_checkpointing=true"], 1),
    ("30M zero0", ["model.size=30M", "parallel.zero_stage=0"], 1),
    ("30M zero0 ac", ["model.size=30M", "parallel.zero_stage=0", "model.activation_checkpointing=true"], 1),
    ("debug zero3 dp2", ["model.size=debug", "parallel.zero_stage=3"], 2),
    ("debug zero3 sp2", ["model.size=debug", "parallel.zero_stage=3", "parallel.ulysses=2"], 2),
    ("30M zero3 dp2 ac", ["model.size=30M", "parallel.zero_stage=3", "model.activation_checkpointing=true"], 2),
    ("30M zero3 sp2", ["model.size=30M", "parallel.zero_stage=3", "parallel.ulysses=2"], 2),
]
QUICK = {"reps": 1, "cases": "0,5"}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET = ["train.tokens_per_batch=256"]
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--reps", type=int, default=3, help="timed steps per case (default 3)")
    p.add_argument("--calibrate", default="30M zero0",
                   help="the case whose measured time calibrates the assumed MFU (default '30M zero0', a "
                        "FLOP-bound step; the first case run when it is not among them)")
    p.add_argument("--cases", default="all", help="comma-separated case numbers (0-based) or 'all' (default): "
                   + "; ".join(f"{i} {name}" for i, (name, _, _) in enumerate(CASES)))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage created in this thread while active (module docstring)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.live:
                    self.live[key] = n
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out


def _worker(config_path: str, out_path: str, reps: int) -> None:
    """One rank: peak bytes over engine construction and two steps, then the median step time."""
    torch.set_num_threads(1)
    cfg = load_config(config_path)
    with LiveBytes() as live:
        tr = Trainer(cfg)
        for _ in range(2):
            tr.train_step()
    times = []
    for _ in range(reps):
        collectives.barrier()
        t0 = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t0)
    Path(out_path).write_text(json.dumps({"peak_bytes": live.peak, "step_s": statistics.median(times)}))
    collectives.barrier()
    tr.close()
    tr.dims.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cfg, world: int, reps: int, tmp: Path) -> list[dict]:
    """Each rank's {peak_bytes, step_s} for `cfg` on `world` CPU processes."""
    cfg_path = tmp / "recipe.yaml"
    save_config(cfg, cfg_path)
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "vidscale.scaling.bench.plan", str(cfg_path),
                                       str(tmp / f"rank{r}.json"), str(reps)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"bench plan: a rank failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def run(args) -> dict:
    cases = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    peak = measure_peak_flops("cpu", torch.float32, seconds=0.5)
    torch.set_num_threads(threads)
    picked = list(CASES) if args.cases == "all" else [CASES[int(i)] for i in str(args.cases).split(",")]
    # the calibration case first: its time sets the MFU every other prediction assumes
    picked.sort(key=lambda c: c[0] != args.calibrate)
    mfu = None
    for name, over, world in picked:
        cfg = load_config(None, [*COMMON, *over, *args.overrides])  # `--set plan.bandwidth_gb_s=...` included
        with tempfile.TemporaryDirectory() as d:
            cfg = set_values(cfg, {"train.run_dir": str(Path(d) / "run")})
            ranks = measure(cfg, world, args.reps, Path(d))
        mem = memory(cfg, world, device="cpu")
        predicted = sum(mem.values())
        measured = max(r["peak_bytes"] for r in ranks)
        step_s = max(r["step_s"] for r in ranks)
        if mfu is None:  # calibrate the assumed MFU on the calibration case
            mfu = calibrated_mfu(cfg, world, step_s, peak)
        cal = set_values(cfg, {"plan.mfu": mfu})
        t = step_time(cal, world, peak / 1e12, device="cpu")
        cases.append({"config": name, "world": world, "predicted_bytes": predicted, "measured_bytes": measured,
                      "rel_err": abs(predicted - measured) / measured, "predicted_breakdown": mem,
                      "predicted_step_s": t["step_s"], "measured_step_s": step_s,
                      "rel_err_time": abs(t["step_s"] - step_s) / step_s})
    return {"cases": cases, "max_rel_err_memory": max(c["rel_err"] for c in cases),
            "max_rel_err_time": max(c["rel_err_time"] for c in cases[1:]) if len(cases) > 1 else 0.0,
            "calibrated_mfu": mfu, "calibrated_on": cases[0]["config"], "peak_flops": peak,
            "machine": machine()}


def calibrated_mfu(cfg, world: int, step_s: float, peak_flops: float) -> float:
    """The MFU at which the planner's compute time for one rank of `cfg` on `world` ranks is the
    measured `step_s`, on a rank whose peak is `peak_flops`. `flops_per_step` counts one
    data-parallel group's step (its sp ranks share one batch), so a rank does 1/sp of it
    whatever the number of groups: dividing by the world undercounted a dp > 1 case dp-fold."""
    sp = cfg.parallel.ulysses * cfg.parallel.ring
    flops = step_time(cfg, world, 1.0, device="cpu")["flops_per_step"] / sp
    return flops / (step_s * peak_flops)


def machine() -> dict:
    """The CPU this ran on (bench figures travel between machines only with it)."""
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "threads_per_rank": 1, "torch": torch.__version__}


if __name__ == "__main__":  # one rank of a case (started by `measure`)
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
