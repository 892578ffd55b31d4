"""The training loop: `train(cfg)` is the one entry point every launcher calls.

Per step: fetch the step's packed micro-batches for this data-parallel rank, count the
real tokens of the whole step across data-parallel ranks, take this rank's sequence
slice, draw timesteps and noise from a generator keyed by (seed, step, micro, dp rank),
and back-propagate sum(token losses) * engine.loss_scale / (real tokens of the step).
That normalisation makes the gradient the mean over every real token of the optimizer
step, whatever the padding, the uneven sp slices or the ZeRO averaging (see zero.py).
The task (train/tasks.py) owns the model, data and loss; the engine (train/engine.py)
the optimizer; the checkpoint manager saves the engine, loader and RNG as explicit parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vidscale.models.sizes import param_count
from vidscale.scaling.checkpoint.manager import Checkpointer, LoaderPart, RngPart, TrainState
from vidscale.scaling.checkpoint import storage
from vidscale.scaling.checkpoint.rundir import (LOCK_ENV, RunDirBusy, RunDirTaken, RunLock, check_fresh, check_shared,
                                                held_by_launcher)
from vidscale.scaling.checkpoint.weights import save_run_weights
from vidscale.scaling.config import Config, load_config, model_config, network_env, save_config, to_yaml
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import ParallelDims, pick_backend, pick_device
from vidscale.scaling.parallel.parallelize import apply_compile, build_model, parallelize
from vidscale.scaling.train import host_memory, init_from, signals
from vidscale.scaling.train.engine import Engine, TorchEngine
from vidscale.scaling.train.evaluate import write_final
from vidscale.scaling.train.flops import measure_peak_flops
from vidscale.scaling.train.metrics import ConsumedLog, MetricsLogger
from vidscale.scaling.train.step_split import StepProfiler, profile_step
from vidscale.scaling.train.tasks import Task, build_task
from vidscale.scaling.train.wandb_sink import WandbSink
from vidscale.scaling.train.zero import build_zero_engine


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def build_engine(cfg: Config, dims: ParallelDims, device: torch.device, task: Task, init=None) -> Engine:
    """The recipe's engine around the task's model, parallelized (parallel/parallelize.py);
    `init(model)` (train.init_from) loads starting weights into the freshly initialised model."""
    if cfg.parallel.zero_stage == 0:
        assert dims.world == 1, "layout invariant: zero_stage 0 is one process (scaling.config.check_layout)"
        model = build_model(task.make_model, device, cfg.train.seed)
        if init is not None:
            init(model)
        model = parallelize(model, dims, cfg.model)
        return TorchEngine(model, cfg.optim, cfg.train.steps)
    return build_zero_engine(cfg, dims, device, task.make_model, init)


class Trainer:
    """Holds everything a step needs. `train(cfg)` drives it; tests can drive it step by step."""

    split_profiler: StepProfiler | None = None
    """A `StepProfiler` while a step is profiled for the time split (train/step_split.py)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.train.tune_malloc:
            host_memory.tune()
        for k, v in network_env(cfg.cluster).items():  # before the process group binds its sockets
            os.environ.setdefault(k, v)
        self.dims = ParallelDims.from_env(cfg.parallel.ulysses, cfg.parallel.ring)  # layout: config.check_layout
        self.device = pick_device(cfg.train.device, self.dims.local_rank)
        self.dims.init(pick_backend(cfg.parallel.backend, self.device), cfg.parallel.timeout_s)
        self.run_dir = Path(cfg.train.run_dir or default_run_dir(cfg)).absolute()
        self.is_main = self.dims.rank == 0
        self.lock = None
        err = None
        if self.is_main:  # own the run dir before anything is written there
            try:
                if not held_by_launcher(self.run_dir):
                    self.lock = RunLock(self.run_dir).acquire(sys.argv, wait_s=60)
                check_fresh(self.run_dir, cfg.checkpoint.resume)
            except (RunDirBusy, RunDirTaken) as e:
                err = e
        if collectives.agree(err is not None):  # every rank stops, rank 0 with the reason
            if err is not None:
                raise err
            raise RunDirBusy(f"{self.run_dir}: rank 0 could not take the run directory (its error names why)")
        # every rank must see the directory rank 0 owns (a node without the shared filesystem)
        token = collectives.broadcast_json((self.lock.token if self.lock else os.environ.get(LOCK_ENV, ""))
                                           if self.is_main else "")
        hosts = check_shared(self.run_dir, token) if self.dims.distributed else []
        seed_all(cfg.train.seed)
        self.task = build_task(cfg, self.dims, self.device)  # what trains: the DiT, or the VAE
        # train.init_from: weights only, into a new run; a run that restores a checkpoint has its own
        self.init = init_from.prepare(cfg, self.run_dir, self.dims) if init_from.applies(cfg, self.run_dir) else None
        self.engine = build_engine(cfg, self.dims, self.device, self.task, self.init)
        if self.init is not None:
            self.init.release(self.run_dir)
        self.model = self.engine.module
        if cfg.model.compile:  # last: after the engine's hooks and the sp kernel are in place
            apply_compile(self.engine.model)
        # the sp ranks of a dp group take the same batches: one record per dp rank
        self.consumed = (ConsumedLog(self.run_dir, self.dims.dp_rank)
                         if cfg.data.record_consumed and self.dims.sp_rank == 0 else None)
        self.loader = self.task.build_loader(self.dims.dp_rank, self.dims.dp, multiple=self.dims.sp,
                                             on_batch=self.consumed.on_batch if self.consumed else None)
        self.state = TrainState()
        layout = {"world": self.dims.world, "dp": self.dims.dp, "sp": self.dims.sp, "ulysses": self.dims.ulysses,
                  "ring": self.dims.ring, "zero_stage": cfg.parallel.zero_stage, "engine": self.engine.kind}
        parts = {"engine": self.engine, "rng": RngPart(self.dims), "loader": LoaderPart(self.loader, self.dims)}
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint, self.dims, self.state, parts, layout,
                                 to_yaml(cfg), cfg.parallel.timeout_s)
        self.resized: dict | None = None
        """Set when this start restored a checkpoint of another world size (an elastic restart, or
        a resume with another --nproc): the first step after it logs {old_world, new_world,
        seconds_lost} (seconds from the restored checkpoint's commit to the end of that step:
        the steps redone, the failure detection, the restart and the restore)."""
        # '' fresh, 'auto' latest complete, or a path; then a branch's trunk checkpoint when this
        # run has none of its own yet
        path = self.ckpt.restore(cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        if path is None and cfg.checkpoint.branch_from:
            path = self.ckpt.restore(cfg.checkpoint.branch_from)
        if path is None and self.is_main:  # (a restore truncates metrics.jsonl to its own step)
            # a start from step 0 logs every step again, step 0 (init_from) included: the records
            # of an earlier start that never saved a checkpoint go (`--resume auto` after a crash)
            self.ckpt.metrics.unlink(missing_ok=True)
        if self.consumed is not None:  # trained again after the restored step (or from 0)
            self.consumed.truncate(self.state.step, self.dims.dp)
        if path is not None:
            old = json.loads((path / "state.json").read_text())["layout"]["world"]
            if old != self.dims.world:
                self.resized = {"old_world": old, "new_world": self.dims.world,
                                "committed": (path / storage.MANIFEST).stat().st_mtime}
        if self.is_main:  # only now: a failed restore leaves the run's recipe as it was
            save_config(cfg, self.run_dir / "config.yaml")
            if path is None:  # where the weights of step 0 came from (the final weights say it too)
                record = self.run_dir / init_from.RECORD_FILE
                if self.init is not None:
                    record.write_text(json.dumps(self.init.record(), indent=1) + "\n")
                else:  # from scratch: an earlier start's record (it never saved a checkpoint) goes
                    record.unlink(missing_ok=True)
            if hosts:  # which host each rank ran on, one line per start of the run
                with open(self.run_dir / HOSTS_FILE, "a") as f:
                    f.write(json.dumps({"step": self.state.step, "world": self.dims.world, "hosts": hosts}) + "\n")
        # the first step with a non-finite loss or gradient norm (-1: none), kept on the device
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        # real tokens of the steps since `tokens_seen` was last read, kept on the device
        self._tokens_pending = torch.zeros((), dtype=torch.float64, device=self.device)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def tokens_seen(self) -> int:
        """Real tokens trained on over the dp ranks (a host sync: logging and save steps only)."""
        self._count_tokens()
        return self.state.tokens_seen

    def _count_tokens(self) -> None:
        """Move the steps' device-side token counts into the TrainState (a host sync)."""
        self.state.tokens_seen += int(self._tokens_pending)
        self._tokens_pending.zero_()

    def save(self):
        """Checkpoint this step, its TrainState holding every token seen up to it."""
        self._count_tokens()
        return self.ckpt.save()

    # -- one optimizer step -----------------------------------------------------------
    def _range(self, category: str):
        return self.split_profiler.range(category) if self.split_profiler is not None else contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimizer step over `train.grad_accum` micro-batches. Returns device tensors (and
        the step's learning rate, `lr`, a float)."""
        with self._range("data_wait"):
            batches = [next(self.loader) for _ in range(self.cfg.train.grad_accum)]
        local_real = sum(m.num_real for _, m in batches)
        # real tokens of the step over the dp ranks (the sp ranks of a dp group share a batch),
        # on the device: no host sync per step. The scale is rounded to fp32 as a Python float
        # multiplying an fp32 loss was, so the losses are what they were bit for bit
        global_real = collectives.sum_tensor(
            torch.full((), float(local_real), dtype=torch.float64, device=self.device), self.dims.group("dp"))
        scale = (self.engine.loss_scale / global_real).float()
        loss_sum = torch.zeros((), device=self.device)
        flops = 0
        for micro, (tokens, meta) in enumerate(batches):
            s, _ = self.task.micro_loss(self.model, tokens, meta, self.step, micro)
            self.engine.backward(s * scale)
            loss_sum += s.detach()
            flops += self.task.flops(meta)
        lr = self.engine.lr  # the rate this step trains at: engine.step() moves the schedule on
        with self._range("optimizer"):
            grad_norm = self.engine.step()
        # divergence, noted on the device (no host sync here): read at logging and save steps
        bad = ~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm.to(self.device))
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), self.state.step + 1,
                                            self._first_nonfinite)
        self.state.step += 1
        self._tokens_pending += global_real
        if self.consumed is not None:
            self.consumed.write(self.state.step)
        return {"loss_sum": loss_sum, "global_real": global_real, "grad_norm": grad_norm, "lr": lr,
                "flops": flops / max(self.dims.sp, 1), "local_tokens": sum(m.seq_len for _, m in batches)}

    def check_finite(self) -> None:
        """Every rank: stop if any rank saw a non-finite loss or gradient norm since the start.
        Called before each save and at logging steps, so nothing non-finite is ever saved and
        retention never deletes the last finite checkpoint."""
        first = collectives.max_(self._first_nonfinite)
        if first >= 0:
            last = self.ckpt.root / f"step_{self.ckpt.last_step:08d}" if self.ckpt.last_step else None
            raise NonFiniteError(
                f"{self.run_dir}: the loss or gradient norm became non-finite at step {int(first)} (optim.lr="
                f"{self.cfg.optim.lr}); stopped without saving. Last finite checkpoint: "
                f"{last if last else 'none'}; lower the learning rate or resume it with other settings")

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def reduce_loss(self, out: dict) -> float:
        """Mean loss per real token over the step, across dp and sp (a host sync: log steps only)."""
        return collectives.sum_(out["loss_sum"]) / float(out["global_real"])


HOSTS_FILE = "hosts.jsonl"
"""RUN_DIR/hosts.jsonl: one line per start of a multi-process run, {"step": the step it started
from, "world", "hosts": each rank's "hostname (address)"}."""


class NonFiniteError(FloatingPointError):
    """The run diverged: a non-finite loss or gradient norm (one line, naming the step)."""


PEAK_EVERY_S = 120.0
"""Seconds between re-measurements of the GEMM peak that `mfu` divides by."""


def train(cfg: Config) -> dict:
    """Train a recipe. Runs on one process or as one rank of a torch.distributed world."""
    signals.clear()
    signals.install()  # SIGUSR1: save at the next step boundary, then exit EXIT_REQUEUE
    t_start = time.time()
    tr = Trainer(cfg)
    c = cfg
    tokens_at_start, run_flops = tr.tokens_seen, 0.0  # this process's share, for final.json
    dtype = torch.bfloat16 if c.train.dtype == "bf16" else torch.float32
    # the GEMM peak moves with the machine's load: measured at the start and again every
    # PEAK_EVERY_S at a logging step (0.25 s each), and logged with the MFU it divides
    peak = measure_peak_flops(tr.device, dtype, seconds=0.5) if tr.is_main else 0.0
    t_peak = time.perf_counter()
    sinks = ([WandbSink(tr.run_dir, c.logging, config=dataclasses.asdict(c), group=c.name)]
             if c.logging.wandb and tr.is_main else [])
    log = MetricsLogger(tr.run_dir, tr.is_main, c.logging.tensorboard, c.logging.progress,
                        total=c.train.steps, initial=tr.step, sinks=sinks)
    if tr.is_main:
        (tr.run_dir / "peak_flops.json").write_text(json.dumps({"peak_flops": peak}))
    last_loss = float("nan")
    preempted = False
    t_last, tok_last, flops_acc = time.perf_counter(), 0, 0.0
    if tr.init is not None and tr.step == 0:
        log.log(0, {"init_from": tr.init.record()})
    try:
        while tr.step < c.train.steps:
            split = None
            if tr.is_main and c.logging.split_every and (tr.step + 1) % (c.logging.every * c.logging.split_every) == 0:
                out, split, _ = profile_step(tr)  # a log step: the split goes into its record
            else:
                out = tr.train_step()
            flops_acc += out["flops"]
            run_flops += out["flops"]
            tok_last += out["local_tokens"]
            log.advance()
            extra = tr.task.after_step(tr.engine, tr.step, tr.run_dir)  # VAE: held-out PSNR; DiT: samples
            log.files(tr.task.sample_files())
            if tr.resized is not None:  # the first step at a new world size: logged, with what it cost
                extra = {**extra, **tr.resized, "seconds_lost": time.time() - tr.resized["committed"]}
                del extra["committed"]
                tr.resized = None
            if tr.step % c.logging.every == 0 or tr.step == c.train.steps:
                last_loss = tr.reduce_loss(out)
                dt = time.perf_counter() - t_last
                if tr.is_main and time.perf_counter() - t_peak > PEAK_EVERY_S:
                    peak = measure_peak_flops(tr.device, dtype, seconds=0.25)
                    t_peak = time.perf_counter()
                rec = {"loss": last_loss, "tokens": tr.tokens_seen, "lr": out["lr"],
                       "grad_norm": float(out["grad_norm"]), "tokens_per_s": tok_last / dt,
                       "mfu": (flops_acc / dt) / peak if peak else 0.0, "peak_flops": peak,
                       "packing_efficiency": tr.loader.efficiency,
                       "skipped_samples": tr.loader.stats["skipped"],  # this rank's unreadable samples
                       "memory_gb": _memory_gb(tr.device)}
                if tr.loader.source_tokens:  # a mixture (data.sources): its token shares, over the dp ranks
                    rec.update(source_shares(tr.loader.source_tokens, tr.dims))
                if split:
                    rec.update({f"split.{k}": v for k, v in split.items()})
                log.log(tr.step, {**rec, **extra})
                t_last, tok_last, flops_acc = time.perf_counter(), 0, 0.0
                tr.check_finite()
            elif extra:
                log.log(tr.step, extra)
            # ranks agree on a save request (a collective and a host sync) only where the loop
            # syncs anyway: logging steps, save steps, the last step; one process: every step
            if (not tr.dims.distributed or tr.step % c.logging.every == 0 or tr.ckpt.should_save(tr.step)
                    or tr.step == c.train.steps):
                # a request at the last step stops nothing: the run saves, scores and finishes
                # (a requeue would only score it again)
                preempted = collectives.agree(signals.save_requested()) and tr.step < c.train.steps
            if tr.ckpt.should_save(tr.step) or preempted:
                tr.check_finite()
                tr.save()
            if preempted:
                break
        tr.check_finite()
        if tr.ckpt.last_step != tr.step:  # the end of the run is always saved
            tr.save()
        tr.ckpt.wait()
    except BaseException:
        tr.close()  # the run dir is free again (a stopped process frees it anyway)
        raise
    finally:
        log.close()
    result = {"run_dir": str(tr.run_dir), "steps": tr.step, "loss": last_loss, "tokens": tr.tokens_seen,
              "preempted": preempted, "checkpoint_stall_s": tr.ckpt.stalls}
    if tr.step >= c.train.steps:  # finished: the score a sweep fits (every rank: collectives)
        t0 = time.perf_counter()
        scores = tr.task.evaluate(tr.engine)
        if scores:
            # FLOPs counted in this process's segment of the run, summed over ranks and scaled to
            # every token seen (a resumed run did its earlier steps at the same FLOPs per token)
            seg_tokens = tr.tokens_seen - tokens_at_start
            seg_flops = collectives.sum_(run_flops)
            # a run resumed at its last step (killed in its final evaluation) trained nothing here:
            # its FLOPs per token are estimated from its own batches, as the sweep planned them
            per_token = seg_flops / seg_tokens if seg_tokens > 0 else flops_per_token(tr.task, tr.dims)
            final = {**scores, "params": param_count(model_config(c.model)), "tokens": tr.tokens_seen,
                     "flops": per_token * tr.tokens_seen,
                     "steps": tr.step, "train_loss": last_loss, "wall_time": time.time() - t_start,
                     "eval_time": time.perf_counter() - t0, "val_videos": c.train.val_videos}
            result.update(scores)
        # consolidated weights for `vidscale sample` (every rank: a gather), then final.json, the
        # mark of a finished run, last: a run marked finished has its weights
        # where step 0's weights came from: this start's init_from, or what the first start recorded
        origin = tr.init.source.record if tr.init is not None else (
            init_from.recorded_source(tr.run_dir) if tr.is_main else None)
        init_meta = {"init_from": json.dumps(origin)} if origin is not None else {}
        save_run_weights(tr.engine, tr.run_dir, c, tr.step, kind=tr.task.name,
                         extra={**tr.task.weights_metadata(), **init_meta})
        if scores and tr.is_main:
            write_final(tr.run_dir, final)
    tr.close()
    tr.dims.destroy()
    return result


FLOPS_PROBE_BATCHES = 8
"""Packed batches `flops_per_token` draws (the sweep planner's estimate draws as many)."""


def flops_per_token(task: Task, dims: ParallelDims) -> float:
    """Training FLOPs per real token of the run's packed batches: the mean over the first
    FLOPS_PROBE_BATCHES batches of a fresh loader of dp rank 0 (nothing recorded as consumed)."""
    loader = task.build_loader(0, dims.dp, multiple=dims.sp)
    flops = real = 0.0
    for _ in range(FLOPS_PROBE_BATCHES):
        _, meta = next(loader)
        flops += task.flops(meta)
        real += meta.num_real
    return flops / real if real else 0.0


def source_shares(local: dict[str, int], dims) -> dict:
    """A mixture's real tokens per source since the run began, summed over the dp ranks (every
    rank calls it: a collective), and each source's share of them."""
    t = collectives.sum_tensor(torch.tensor(list(local.values()), dtype=torch.float64), dims.group("dp"))
    tokens = {name: int(v) for name, v in zip(local, t.tolist())}
    total = max(sum(tokens.values()), 1)
    return {"source_tokens": tokens, "source_share": {name: v / total for name, v in tokens.items()}}


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:
        return 0.0


if __name__ == "__main__":  # a rank started by a launcher: config path in the environment
    sys.exit(signals.EXIT_REQUEUE if train(load_config(os.environ["VIDSCALE_CONFIG"]))["preempted"] else 0)
