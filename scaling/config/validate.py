"""Value checks that types alone cannot express, and the parallel layout for a world size.
Each raises a one-line `RecipeError` naming the key and what was expected."""
from __future__ import annotations

import math
from dataclasses import fields, is_dataclass

from vidscale.data.args import source_name
from vidscale.data.loader import ON_ERROR
from vidscale.models.attention import KERNELS
from vidscale.models.diffusion import OBJECTIVES, SCHEDULES
from vidscale.models.sizes import SIZES
from vidscale.scaling.config.checkpoint import CHECKSUMS
from vidscale.scaling.config.cluster import INTERFACE, LAUNCHERS, PLACEMENTS
from vidscale.scaling.config.errors import RecipeError
from vidscale.scaling.config.model import model_config
from vidscale.scaling.config.objective import COND_MODES
from vidscale.scaling.config.parallel import BACKENDS, GRAD_DTYPES, ZERO_STAGES
from vidscale.scaling.config.recipe import TASKS, Config
from vidscale.scaling.config.train import DECAY_SHAPES, DEVICES, DTYPES, LR_SCHEDULES


def _one_of(values) -> str:
    """'a, b or c' for a message."""
    vs = [str(v) for v in values]
    return ", ".join(vs[:-1]) + " or " + vs[-1] if len(vs) > 1 else vs[0]


def _as_float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def validate(cfg: Config, where: str) -> None:
    """Value checks that types alone cannot express. Raises RecipeError (one line)."""

    def bad(key, value, expected):
        raise RecipeError(f"{where}: key '{key}' = {value!r}: expected {expected}")

    c = cfg
    for key, value, allowed in [("model.size", c.model.size, SIZES),
                                ("model.attn_backend", c.model.attn_backend, KERNELS),
                                ("task", c.task, TASKS),
                                ("objective.name", c.objective.name, OBJECTIVES),
                                ("objective.schedule", c.objective.schedule, SCHEDULES),
                                ("optim.schedule", c.optim.schedule, LR_SCHEDULES),
                                ("optim.decay_shape", c.optim.decay_shape, DECAY_SHAPES),
                                ("checkpoint.checksum", c.checkpoint.checksum, CHECKSUMS),
                                ("train.dtype", c.train.dtype, DTYPES),
                                ("train.device", c.train.device, DEVICES),
                                ("parallel.zero_stage", c.parallel.zero_stage, ZERO_STAGES),
                                ("parallel.backend", c.parallel.backend, BACKENDS),
                                ("parallel.grad_dtype", c.parallel.grad_dtype, GRAD_DTYPES),
                                ("data.on_error", c.data.on_error, ON_ERROR),
                                ("cluster.launcher", c.cluster.launcher, LAUNCHERS),
                                ("cluster.placement", c.cluster.placement, PLACEMENTS)]:
        if value not in allowed:
            bad(key, value, f"one of {_one_of(allowed)}")
    if cfg.cluster.network_interface and not INTERFACE.fullmatch(cfg.cluster.network_interface):
        bad("cluster.network_interface", cfg.cluster.network_interface,
            "an interface name like 'eth0' or 'ib0' (or a comma list of them)")
    if len(cfg.model.patch) != 3 or min(cfg.model.patch) < 1:
        bad("model.patch", cfg.model.patch, "three positive integers [pt, ph, pw]")
    if not cfg.vae.mults or min(cfg.vae.mults) < 1:
        bad("vae.mults", cfg.vae.mults, "a non-empty list of positive channel multipliers")
    if len(cfg.vae.temporal_down) != len(cfg.vae.mults) - 1:
        bad("vae.temporal_down", cfg.vae.temporal_down, f"one entry per downsampling ({len(cfg.vae.mults) - 1})")
    if not 0 <= cfg.objective.caption_dropout < 1:
        bad("objective.caption_dropout", cfg.objective.caption_dropout, "a probability in [0, 1)")
    for key, v in [("train.steps", cfg.train.steps), ("train.tokens_per_batch", cfg.train.tokens_per_batch),
                   ("train.grad_accum", cfg.train.grad_accum), ("parallel.ulysses", cfg.parallel.ulysses),
                   ("parallel.ring", cfg.parallel.ring), ("cluster.nproc", cfg.cluster.nproc),
                   ("logging.every", cfg.logging.every)]:
        if v < 1:
            bad(key, v, "a positive integer")
    for key, v, zero in [("checkpoint.every", cfg.checkpoint.every, "only at the end"),
                         ("checkpoint.keep_every", cfg.checkpoint.keep_every, "off"),
                         ("train.val_every", cfg.train.val_every, "only at the end"),
                         ("logging.sample_every", cfg.logging.sample_every, "off"),
                         ("logging.split_every", cfg.logging.split_every, "off")]:
        if v < 0:
            bad(key, v, f"0 ({zero}) or a positive integer")
    if cfg.train.val_every and cfg.task == "dit":
        bad("train.val_every", cfg.train.val_every, "0 with task: dit (a DiT run is evaluated at its end, "
            "final.json; val_every applies to task: vae)")
    if cfg.logging.sample_every and not cfg.logging.sample_prompts:
        bad("logging.sample_prompts", [], "at least one prompt with logging.sample_every > 0")
    for key, v in _numbers(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            bad(key, v, "a finite number")
    o = cfg.optim
    for key, v, ok, expected in [
            ("optim.lr", o.lr, 0 < o.lr <= 10, "a learning rate in (0, 10]"),
            ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
            ("optim.eps", o.eps, 0 < o.eps < 1, "a small positive number"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "a number >= 0"),
            ("optim.warmup", o.warmup, o.warmup >= 0, "a number of steps >= 0"),
            ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "a ratio in [0, 1]"),
            ("optim.decay_fraction", o.decay_fraction, 0 < o.decay_fraction <= 1, "a fraction in (0, 1]"),
            ("checkpoint.keep_steps", cfg.checkpoint.keep_steps, all(x > 0 for x in cfg.checkpoint.keep_steps),
             "positive step numbers"),
            ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, "a norm >= 0 (0 = no clipping)"),
            ("optim.ema_decay", o.ema_decay, 0 <= o.ema_decay < 1, "a decay in [0, 1) (0 = no EMA)"),
            ("objective.logit_std", c.objective.logit_std, c.objective.logit_std > 0, "a positive number"),
            ("objective.shift", c.objective.shift, c.objective.shift == "auto" or (_as_float(c.objective.shift) or 0) > 0,
             "a positive number or 'auto'"),
            ("objective.shift_ref_tokens", c.objective.shift_ref_tokens, c.objective.shift_ref_tokens > 0,
             "a positive number of tokens"),
            ("objective.num_steps", c.objective.num_steps, c.objective.num_steps >= 2, "at least 2 steps"),
            ("objective.cond_frames", c.objective.cond_frames, c.objective.cond_frames >= 0, "a number >= 0"),
            ("objective.cond_mode", c.objective.cond_mode, c.objective.cond_mode in COND_MODES,
             "first, last or first_last"),
            ("model.hidden", c.model.hidden, c.model.hidden >= 0, "a width >= 0 (0 keeps model.size's)"),
            ("model.depth", c.model.depth, c.model.depth >= 0, "a number of blocks >= 0 (0 keeps model.size's)"),
            ("model.heads", c.model.heads, c.model.heads >= 0, "a number of heads >= 0 (0 keeps model.size's)"),
            ("model.mlp_ratio", c.model.mlp_ratio, c.model.mlp_ratio >= 0, "a ratio >= 0 (0 keeps model.size's)"),
            ("model.in_channels", c.model.in_channels, c.model.in_channels >= 1, "a positive number of channels"),
            ("model.text_dim", c.model.text_dim, c.model.text_dim >= 1, "a positive width"),
            ("data.drop_tokens", c.data.drop_tokens, 0 <= c.data.drop_tokens < 1, "a fraction in [0, 1)"),
            ("data.drop_min_tokens", c.data.drop_min_tokens, c.data.drop_min_tokens >= 0, "a number of tokens >= 0"),
            ("data.synthetic_videos", c.data.synthetic_videos, c.data.synthetic_videos >= 1,
             "a positive number of videos"),
            ("data.text_tokens", c.data.text_tokens,
             len(c.data.text_tokens) == 2 and 0 <= c.data.text_tokens[0] <= c.data.text_tokens[1],
             "[min, max] caption tokens with 0 <= min <= max"),
            ("data.clip_frames", c.data.clip_frames, c.data.clip_frames >= 1, "a positive number of frames"),
            ("data.max_area", c.data.max_area, c.data.max_area >= 0, "an area >= 0 (0 keeps the native size)"),
            ("data.max_clips", c.data.max_clips, c.data.max_clips >= 0, "a number of clips >= 0 (0 = no limit)"),
            ("data.shard_max_bytes", c.data.shard_max_bytes, c.data.shard_max_bytes >= 1, "a positive size"),
            ("data.lookahead", c.data.lookahead, c.data.lookahead >= 1, "a positive number of videos"),
            ("data.shuffle_buffer", c.data.shuffle_buffer, c.data.shuffle_buffer >= 0, "a number >= 0"),
            ("data.workers", c.data.workers, c.data.workers >= 0, "a number of processes >= 0"),
            ("data.fps", c.data.fps, c.data.fps >= 0, "a frame rate >= 0 (0 keeps the source's)"),
            ("train.val_videos", c.train.val_videos, c.train.val_videos >= 0, "a number >= 0"),
            ("parallel.timeout_s", c.parallel.timeout_s, c.parallel.timeout_s > 0, "a positive number of seconds"),
            ("parallel.reduce_bucket_size", c.parallel.reduce_bucket_size, c.parallel.reduce_bucket_size >= 0,
             "a number of elements >= 0"),
            ("parallel.prefetch_bucket_size", c.parallel.prefetch_bucket_size, c.parallel.prefetch_bucket_size >= 0,
             "a number of elements >= 0"),
            ("parallel.persistence_threshold", c.parallel.persistence_threshold,
             c.parallel.persistence_threshold >= 0, "a number of elements >= 0"),
            ("parallel.max_live_parameters", c.parallel.max_live_parameters, c.parallel.max_live_parameters >= 0,
             "a number of parameters >= 0"),
            ("checkpoint.keep_last", c.checkpoint.keep_last, c.checkpoint.keep_last >= 1, "at least 1"),
            ("cluster.cpus_per_worker", c.cluster.cpus_per_worker, c.cluster.cpus_per_worker > 0, "a positive number"),
            ("cluster.gpus_per_worker", c.cluster.gpus_per_worker, c.cluster.gpus_per_worker >= 0, "a number >= 0"),
            ("cluster.resize_check_s", c.cluster.resize_check_s, c.cluster.resize_check_s > 0,
             "a positive number of seconds"),
            ("cluster.min_nproc", c.cluster.min_nproc, c.cluster.min_nproc >= 1, "a world size >= 1"),
            ("vae.beta", c.vae.beta, c.vae.beta >= 0, "a number >= 0"),
            ("vae.base", c.vae.base, c.vae.base >= 1, "a positive number of channels"),
            ("vae.z_dim", c.vae.z_dim, c.vae.z_dim >= 1, "a positive number of channels"),
            ("vae.num_res", c.vae.num_res, c.vae.num_res >= 0, "a number of blocks >= 0"),
            ("vae.crop", c.vae.crop, len(c.vae.crop) == 2 and min(c.vae.crop, default=0) >= 0,
             "[H, W] >= 0 ([0, 0] = whole frames)"),
            ("vae.frames", c.vae.frames, c.vae.frames >= 1, "a positive number of frames"),
            ("vae.val_clips", c.vae.val_clips, c.vae.val_clips >= 0, "a number of clips >= 0"),
            ("logging.sample_format", c.logging.sample_format, c.logging.sample_format in ("mp4", "png"),
             "mp4 or png"),
            ("logging.wandb_mode", c.logging.wandb_mode, c.logging.wandb_mode in ("", "online", "offline", "disabled"),
             "online, offline, disabled or '' (WANDB_MODE)"),
            ("logging.wandb_timeout_s", c.logging.wandb_timeout_s, c.logging.wandb_timeout_s > 0,
             "a positive number of seconds"),
            ("plan.gpus", c.plan.gpus, c.plan.gpus >= 0, "a number of GPUs >= 0 (0 = not planned)"),
            ("plan.gpu_memory_gb", c.plan.gpu_memory_gb, c.plan.gpu_memory_gb >= 0, "GiB >= 0"),
            ("plan.gpu_tflops", c.plan.gpu_tflops, c.plan.gpu_tflops > 0, "a positive TFLOP/s"),
            ("plan.mfu", c.plan.mfu, 0 < c.plan.mfu <= 2, "a fraction in (0, 1] (up to 2: calibrated against a noisy peak)"),
            ("plan.bandwidth_gb_s", c.plan.bandwidth_gb_s, c.plan.bandwidth_gb_s > 0, "a positive GB/s"),
            ("plan.host_bandwidth_gb_s", c.plan.host_bandwidth_gb_s, c.plan.host_bandwidth_gb_s > 0, "a positive GB/s"),
            ("plan.runtime_gb", c.plan.runtime_gb, c.plan.runtime_gb >= 0, "GiB >= 0")]:
        if not ok:
            bad(key, v, expected)
    t = cfg.train
    if (t.init_from_ema or t.init_allow_resize) and not t.init_from:
        bad("train.init_from_ema" if t.init_from_ema else "train.init_allow_resize", True,
            "train.init_from set to the weights to start from")
    if t.init_from and cfg.checkpoint.branch_from:
        bad("train.init_from", t.init_from, "'' with checkpoint.branch_from (a branch takes its trunk's whole "
            "state, weights included)")
    if cfg.logging.wandb and cfg.logging.wandb_timeout_s > cfg.parallel.timeout_s / 2:
        bad("logging.wandb_timeout_s", cfg.logging.wandb_timeout_s, f"at most half of parallel.timeout_s = "
            f"{cfg.parallel.timeout_s} (the other ranks wait in a collective while rank 0 starts wandb)")
    if cfg.parallel.zero_hpz < 0:
        bad("parallel.zero_hpz", cfg.parallel.zero_hpz, "0 (off) or the ranks per node of the secondary partition")
    if cfg.parallel.zero_hpz > 1 and cfg.parallel.zero_stage != 3:
        bad("parallel.zero_hpz", cfg.parallel.zero_hpz, f"zero_stage 3 (hpZ partitions parameters a second time; "
            f"got zero_stage={cfg.parallel.zero_stage})")
    if cfg.parallel.max_reuse_distance < 0:
        bad("parallel.max_reuse_distance", cfg.parallel.max_reuse_distance, "a number of elements >= 0")
    if cfg.parallel.offload_params and cfg.parallel.zero_stage != 3:
        bad("parallel.offload_params", True, f"zero_stage 3 (parameters are only partitioned at stage 3, "
            f"got zero_stage={cfg.parallel.zero_stage})")
    if len(cfg.data.frames) != 2 or not 1 <= cfg.data.frames[0] <= cfg.data.frames[1]:
        bad("data.frames", cfg.data.frames, "[min, max] latent frames with 1 <= min <= max")
    if not cfg.data.sizes:
        bad("data.sizes", cfg.data.sizes, "at least one [H, W] latent size")
    for hw in cfg.data.sizes:
        if len(hw) != 2 or min(hw) < 1 or hw[0] % cfg.model.patch[1] or hw[1] % cfg.model.patch[2]:
            bad("data.sizes", hw, f"positive [H, W] divisible by the patch {cfg.model.patch[1:]}")
    if cfg.data.frames[0] % cfg.model.patch[0] or cfg.data.frames[1] % cfg.model.patch[0]:
        bad("data.frames", cfg.data.frames, f"frame counts divisible by pt={cfg.model.patch[0]}")
    _check_sources(cfg, where)
    # A one-process recipe may name an sp (or hpZ) layout that a launcher's --nproc completes: check it
    # for the smallest world it fits; the launcher checks again for the world it starts.
    sp = cfg.parallel.ulysses * cfg.parallel.ring
    check_layout(cfg, cfg.cluster.nproc if cfg.cluster.nproc > 1 else math.lcm(sp, max(1, cfg.parallel.zero_hpz)),
                 where)
    if cfg.cluster.elastic and cfg.cluster.nproc > 1:
        check_elastic(cfg, cfg.cluster.nproc, where)


def _check_sources(cfg: Config, where: str) -> None:
    """`data.sources`: a mixture of prepared shard sets (data/mixture.py). Paths and indexes are
    checked where the data is read (the CLI's pre-flight, each rank's loader)."""
    d = cfg.data
    if not d.sources:
        return
    if d.source != "synthetic":
        raise RecipeError(f"{where}: keys 'data.source' = {d.source!r} and 'data.sources' are both set: "
                          f"expected one of them (a single shard set, or a mixture)")
    if cfg.task != "dit":
        raise RecipeError(f"{where}: key 'data.sources': a mixture feeds the DiT loader; task {cfg.task!r} "
                          f"reads data.source")
    names: dict[str, int] = {}
    for i, s in enumerate(d.sources):
        if not s.path or s.path == "synthetic":
            raise RecipeError(f"{where}: key 'data.sources[{i}].path' = {s.path!r}: expected a directory of "
                              f"prepared shards")
        if not (math.isfinite(s.weight) and s.weight > 0):
            raise RecipeError(f"{where}: key 'data.sources[{i}].weight' = {s.weight!r}: expected a positive number")
        name = source_name(s)
        if name in names:
            raise RecipeError(f"{where}: key 'data.sources[{i}]': name {name!r} is also data.sources[{names[name]}]'s"
                              f"; give one a 'name'")
        names[name] = i


def _numbers(dc, prefix: str = ""):
    """(key, value) of every number in the config, list items included."""
    for f in fields(dc):
        v = getattr(dc, f.name)
        if is_dataclass(v):
            yield from _numbers(v, prefix + f.name + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield prefix + f.name, v
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    yield prefix + f.name, x


def check_layout(cfg: Config, world: int, where: str) -> None:
    """The parallel layout of `cfg` on `world` processes, before any of them starts: a
    one-line RecipeError naming the key. `load_config` calls it, and so does each launcher
    with the world size it is about to start; ParallelDims only asserts what this ensured."""
    p = cfg.parallel
    sp = p.ulysses * p.ring
    if cfg.task != "dit" and sp > 1:  # only the DiT has a sequence-parallel attention (parallelize.apply_sp)
        raise RecipeError(f"{where}: parallel.ulysses={p.ulysses} x parallel.ring={p.ring}: task {cfg.task!r} has "
                          f"no sequence-parallel attention; expected parallel.ulysses=1 parallel.ring=1")
    if world % sp:
        raise RecipeError(f"{where}: parallel.ulysses={p.ulysses} x parallel.ring={p.ring} = sp {sp} does not "
                          f"divide the world size {world} (cluster.nproc / --nproc)")
    if cfg.task == "dit":  # Ulysses shards the DiT's attention heads (the VAE has none)
        heads = model_config(cfg.model).heads
        if heads % p.ulysses:
            raise RecipeError(f"{where}: parallel.ulysses={p.ulysses} does not divide the model's {heads} "
                              f"attention heads (Ulysses shards heads)")
    if p.zero_hpz > 1 and world % p.zero_hpz:
        raise RecipeError(f"{where}: parallel.zero_hpz={p.zero_hpz} does not divide the world size {world} "
                          f"(ZeRO-3 partitions parameters over all dp x sp ranks; set it to the ranks per node)")
    if world > 1 and p.zero_stage == 0:
        raise RecipeError(f"{where}: parallel.zero_stage=0 runs a single process; set parallel.zero_stage to "
                          f"1, 2 or 3 for a world of {world}")


def elastic_worlds(cfg: Config, nproc: int) -> range:
    """Every world size Ray Train may pick for an elastic run of at most `nproc` ranks."""
    return range(min(cfg.cluster.min_nproc, nproc), nproc + 1)


def check_elastic(cfg: Config, nproc: int, where: str) -> None:
    """An elastic run restarts at any size in [cluster.min_nproc, nproc]: the layout must fit each."""
    c, p = cfg.cluster, cfg.parallel
    sp = p.ulysses * p.ring
    if c.min_nproc > nproc:
        raise RecipeError(f"{where}: cluster.min_nproc={c.min_nproc} exceeds the largest world size {nproc} "
                          f"(cluster.nproc / --nproc); expected a size in [1, {nproc}]")
    bad = [w for w in elastic_worlds(cfg, nproc) if w % sp or (w > 1 and p.zero_stage == 0)]
    if bad:
        why = (f"parallel.ulysses={p.ulysses} x parallel.ring={p.ring} = sp {sp} does not divide"
               if bad[0] % sp else "parallel.zero_stage=0 runs one process, not")
        raise RecipeError(f"{where}: cluster.elastic: Ray may restart the run at any world size in "
                          f"[cluster.min_nproc={c.min_nproc}, {nproc}]; {why} {bad[0]}: raise cluster.min_nproc "
                          f"or choose a layout that divides every size")
