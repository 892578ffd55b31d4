"""DeepSpeed ZeRO (stage 3; 1 and 2 by config) behind the engine interface of engine.py.

    engine = build_zero_engine(cfg, dims, device)
    engine.backward(sum_of_token_losses * engine.loss_scale / real_tokens_of_the_step)
    grad_norm = engine.step()

The model is applied in a fixed order: construct (partitioned at construction under
`deepspeed.zero.Init` for stage 3), `init_weights()` under `GatheredParameters`, plug in
the sequence-parallel attention, wrap blocks for activation checkpointing, then
`deepspeed.initialize` with a plain torch AdamW and the warmup+cosine schedule.

Gradient scale (measured with DeepSpeed 0.19 on gloo): ZeRO divides gradients by the
whole world (dp x sp: parameters are partitioned over every rank, so DeepSpeed's data-
parallel group is the whole world) and `backward` divides by the accumulation steps, so
`loss_scale = world * grad_accum` makes the gradient the mean over every real token of
the step, whatever the uneven real-token counts per rank. With `reduce_scatter` off,
DeepSpeed instead applies a sequence-parallel "divide by dp" fix-up per bucket that this
scale does not match: keep it on.

ZeRO++ hpZ (`parallel.zero_hpz`) changes where parameters are gathered from, not what is
trained or saved: the primary partition, the optimizer states and the checkpoint shards are
those of plain ZeRO-3 (checkpoints move freely between the two), and the secondary partition
is rebuilt by each forward after the optimizer step invalidates it. Its groups are
DeepSpeed's own, consecutive ranks like a node's; sequence-parallel groups are consecutive
too, so an sp group inside a node keeps its all-to-alls there either way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from vidscale.scaling.checkpoint import zero as ckpt_zero
from vidscale.scaling.checkpoint.storage import host_copy
from vidscale.scaling.config import Config
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import pick_backend
from vidscale.scaling.parallel.parallelize import build_model, parallelize
from vidscale.scaling.train.engine import (apply_recipe_optim, make_optimizer, make_scheduler, say_recipe_optim,
                                            swapped_data)


def deepspeed_config(cfg: Config, dims, device: torch.device) -> dict:
    """The DeepSpeed config a recipe describes (every value set explicitly)."""
    p, stage = cfg.parallel, cfg.parallel.zero_stage
    zero = {
        "stage": stage,
        # keep reduce_scatter on: the other path applies a sequence-parallel "divide by dp"
        # fix-up per bucket; our loss scale is right for the reduce-scatter path
        "reduce_scatter": True,
        "contiguous_gradients": True,
        "overlap_comm": p.overlap_comm,
        "reduce_bucket_size": p.reduce_bucket_size,
    }
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=p.prefetch_bucket_size,
                    stage3_param_persistence_threshold=p.persistence_threshold,
                    stage3_max_live_parameters=p.max_live_parameters,
                    stage3_max_reuse_distance=p.max_reuse_distance,
                    # ZeRO++ hpZ: groups of consecutive ranks (a node) keep a secondary partition
                    zero_hpz_partition_size=max(1, p.zero_hpz))
    else:
        zero.update(allgather_bucket_size=p.reduce_bucket_size)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    bf16 = cfg.train.dtype == "bf16" and device.type == "cuda"
    extra = {}
    if bf16:
        # gradients reduce-scattered and accumulated in parallel.grad_dtype (fp32 by default;
        # DeepSpeed's default is the model's bf16)
        extra = {"communication_data_type": p.grad_dtype, "data_types": {"grad_accum_dtype": p.grad_dtype}}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": 1,  # one packed sequence per micro-step
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.grad_accum * dims.world,
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed's default is 1.0, not "off"
        # bf16 ZeRO on GPU; on CPU bf16 is autocast in the trainer and states stay fp32
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW (DeepSpeed's compiles)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroEngine:
    """The engine interface (train/engine.py) over a DeepSpeed engine.

    `.ds` is the DeepSpeed engine; `.ema` holds this rank's shard of the EMA weights as
    plain tensors (the local ZeRO-3 partition, or full tensors at stage 1/2).
    """
    kind = "zero"

    def __init__(self, ds, model: torch.nn.Module, optimizer, cfg: Config, dims):
        self.ds, self.model, self.optimizer, self.dims = ds, model, optimizer, dims
        self.run_dir = Path(cfg.train.run_dir)
        self.optim = cfg.optim
        self.module = ds
        self.gas = cfg.train.grad_accum
        self.loss_scale = float(dims.world * self.gas)
        self.stage = cfg.parallel.zero_stage
        self.gathers_params = self.stage == 3
        self.bf16 = bool(ds.bfloat16_enabled())
        self.ema_decay = cfg.optim.ema_decay
        self.ema = ({n: self._master(p).detach().float().clone() for n, p in model.named_parameters()}
                    if self.ema_decay > 0 else None)
        self._micro = 0

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's share of `p` in fp32 from the optimizer's master weights (the EMA's source).

        Under bf16 the module holds bf16 copies of them: an EMA of those would average rounded
        weights. Stage 3: the local fp32 partition (shaped like `p.ds_tensor`); stages 1-2: the
        full fp32 tensor (a collective under bf16: every rank calls it, in the same order)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
        if self.stage == 3:
            return safe_get_local_fp32_param(p)
        return safe_get_full_fp32_param(p) if self.bf16 else p.data

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)
        self._micro += 1
        if self._micro < self.gas:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> torch.Tensor:
        assert self._micro == self.gas, f"step() after {self._micro} of {self.gas} micro-batches"
        self.ds.step()
        self._micro = 0
        norm = self.ds.get_global_grad_norm()
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    self.ema[n].lerp_(self._master(p).to(self.ema[n].device, torch.float32), 1 - self.ema_decay)
        if torch.is_tensor(norm):  # stays on the device: read at logging steps only (no sync per step)
            return norm.detach()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    # -- checkpoints (checkpoint/zero.py knows DeepSpeed's files) ----------------------------
    def checkpoint_files(self, tmp: Path, snapshot: bool) -> dict:
        # collective: writes each rank's shards (snapshot: copies them for the background writer)
        files = ckpt_zero.save_zero(self.ds, tmp, defer=snapshot)
        ema = ckpt_zero.ema_files(self.ema, self.model, self.stage, self.dims.rank)
        files.update(host_copy(ema) if snapshot else ema)
        return files

    def flush_files(self, tmp: Path) -> None:
        ckpt_zero.fsync_zero(tmp, self.dims.rank)

    def load_checkpoint(self, path: Path, saved_layout: dict) -> None:
        ckpt_zero.load_zero(self.ds, path, saved_layout["world"], self.dims, self.run_dir)
        changed = apply_recipe_optim(self.optimizer, self.ds.lr_scheduler, self.optim)
        if self.dims.rank == 0:
            say_recipe_optim(changed)
        if self.ema is not None:
            ckpt_zero.load_ema(self.ema, self.model, self.stage, path, saved_layout["world"], self.dims)

    # -- weights -------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 weights (the optimizer's masters: under bf16 the module's copies are rounded),
        gathered one parameter at a time, so no rank ever holds more than one full tensor besides
        rank 0's host copy (a 30B model does not fit gathered whole)."""
        main = self.dims.rank == 0
        if self.stage != 3 and not self.bf16:  # every rank holds the full fp32 weights: rank 0 hands them out
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if main else {}
        from deepspeed.utils import safe_get_full_fp32_param
        params = dict(self.model.named_parameters())
        out = {}
        for k, v in self.model.state_dict().items():  # buffers are whole on every rank
            full = safe_get_full_fp32_param(params[k]) if k in params else v  # a collective per parameter
            if main:
                out[k] = full.detach().cpu().clone()
        return out

    def full_ema(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors on every rank (a collective: every rank must call it)."""
        if self.ema is None:
            return {}
        if self.stage != 3:
            return dict(self.ema)
        return {n: collectives.all_gather_cat(self.ema[n])[:p.ds_numel].view(p.ds_shape)
                for n, p in self.model.named_parameters()}

    @contextlib.contextmanager
    def ema_weights(self):
        """Stage 3: each rank copies its own EMA shard into its parameters' partitions
        (`ds_tensor`, the shard the forward's all-gather reads), so the forwards inside gather
        EMA weights like trained ones and no EMA tensor is gathered for the swap. On exit the
        partitions get the optimizer's fp32 masters back, as DeepSpeed copies them after each
        step, so nothing changes. Gathered copies are released around both copies (they would
        hold the other weights); persistent parameters (`parallel.persistence_threshold`), whole
        on every rank, are gathered again from their partitions as DeepSpeed does after a step;
        hpZ secondary partitions are dropped, and the next forward rebuilds them.
        Stages 1-2 hold whole tensors on every rank: their `.data` is swapped."""
        if self.ema is None:
            yield
            return
        if self.stage != 3:
            with swapped_data(self.model, self.ema):
                yield
            return
        self._fill_partitions(lambda n, p: self.ema[n])
        try:
            yield
        finally:
            self._fill_partitions(lambda n, p: self._master(p))

    def _fill_partitions(self, shard_of) -> None:
        """Every parameter's local partition := shard_of(name, param), this rank's share (no
        collective but the persistent parameters' gather)."""
        self.ds.optimizer.parameter_offload.partition_all_parameters()  # every gathered copy, persistent ones too
        persist = []
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.ds_tensor.copy_(shard_of(n, p).to(p.ds_tensor.device, p.ds_tensor.dtype).view_as(p.ds_tensor))
                if p.ds_persist:
                    persist.append(p)
        if persist:
            persist[0].all_gather(persist)
        self.ds.optimizer.invalidate_secondary_tensor()


def _forget_stale_groups() -> None:
    """DeepSpeed caches process groups in module globals; after an earlier run in this
    process destroyed its process group they point at dead groups. Let it rebuild them."""
    from deepspeed.utils import groups
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, {})


def build_zero_engine(cfg: Config, dims, device: torch.device, make_model, init=None) -> ZeroEngine:
    """Build `make_model()` partitioned (stage 3), parallelize it, wrap it in DeepSpeed.
    `init(model)` (train.init_from) overwrites the fresh weights before DeepSpeed copies them
    into its fp32 masters: at stage 3 each rank writes only its own partition."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger
    import torch.distributed as dist

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed calls collectives that torch has renamed: one warning per call and rank
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    backend = pick_backend(cfg.parallel.backend, device)
    if not dist.is_initialized():  # a single process: DeepSpeed still needs a process group
        dims.init(backend, cfg.parallel.timeout_s, force=True)
    # zero.Init reads these even for one process (launchers set them for every rank)
    for k, v in (("LOCAL_RANK", dims.local_rank), ("RANK", dims.rank), ("WORLD_SIZE", dims.world)):
        os.environ.setdefault(k, str(v))
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    _forget_stale_groups()
    ds_cfg = deepspeed_config(cfg, dims, device)

    # 1. construct: partitioned across the whole dp x sp world as each module is built
    torch.manual_seed(cfg.train.seed)
    if cfg.parallel.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, remote_device="cpu" if cfg.parallel.offload_params
                                 else None, pin_memory=False):
            model = make_model()
        # init_weights on the gathered parameters; rank 0's values are what every rank keeps
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            torch.manual_seed(cfg.train.seed)
            model.init_weights()
    else:
        model = build_model(make_model, device, cfg.train.seed)
    if init is not None:
        init(model)
    # 2. sequence-parallel attention and activation checkpointing (parallel/parallelize.py)
    parallelize(model, dims, cfg.model)
    # 3. DeepSpeed: a plain AdamW and the warmup+cosine schedule, stepped at each boundary
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                       config=ds_cfg, dist_init_required=False)
    return ZeroEngine(ds, model, optimizer, cfg, dims)
