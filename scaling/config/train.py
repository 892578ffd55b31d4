"""The `optim` and `train` sections."""
from __future__ import annotations

from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda")
"""`train.device` and `vidscale prepare --device`: auto is cuda when present."""
DTYPES = ("fp32", "bf16")
"""`train.dtype`."""
LR_SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass
class OptimArgs:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup: int = 10
    """Linear warmup steps, then the schedule's decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    """After warmup: 'cosine' (decay over the whole run) or 'wsd' (warmup-stable-decay: constant
    lr, then decay over the last `decay_fraction` of the steps). A WSD run's lr up to its decay
    does not depend on its length, so runs of several lengths can share one trunk."""
    decay_fraction: float = 0.2
    """wsd: the share of `train.steps` spent decaying (the cooldown)."""
    decay_shape: str = "linear"
    """wsd: the cooldown's shape, 'linear' or '1-sqrt' (lr falls as 1 - sqrt(progress))."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    ema_decay: float = 0.999
    """EMA of the weights (0 = off)."""


@dataclass
class TrainArgs:
    steps: int = 100
    seed: int = 0
    tokens_per_batch: int = 1024
    """Token budget of one packed micro-batch (per data-parallel rank)."""
    grad_accum: int = 1
    dtype: str = "fp32"
    """fp32 or bf16 (autocast on CPU, bf16 ZeRO on GPU)."""
    device: str = "auto"
    """auto (cuda when present), cpu or cuda."""
    run_dir: str = ""
    """Run directory (default runs/<recipe>-<time>)."""
    val_every: int = 0
    """task: vae: held-out reconstruction PSNR every N steps (0 = only at the end). A DiT run is
    evaluated at its end (final.json), so task: dit requires 0."""
    val_videos: int = 16
    tune_malloc: bool = True
    """Keep freed activation blocks in the C library's heap instead of unmapping them
    (scaling/host_memory.py): no page faults and zero-fill per allocation in the step."""
    init_from: str = ""
    """Start this new run (step 0, new optimizer and data) from weights: a `vidscale export` file,
    a run directory (its latest complete checkpoint) or a safetensors file of the same
    architecture ('' = a fresh initialisation). Unlike `checkpoint.resume`, nothing but the
    weights is taken (scaling/train/init_from.py)."""
    init_from_ema: bool = False
    """With `init_from` a run directory (or an EMA export): start from its EMA weights."""
    init_allow_resize: bool = False
    """With `init_from`: parameters whose shape differs from the model's (e.g. another
    `model.in_channels`), or that the source lacks, keep their fresh initialisation (reported
    by name) instead of stopping the run; the source's extra tensors are ignored."""
