"""The `logging` section (metrics, TensorBoard, samples, wandb)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoggingArgs:
    every: int = 1
    """Log (and sync the loss to the host) every N steps."""
    tensorboard: bool = True
    progress: bool = True
    sample_every: int = 0
    """Write sample videos to TensorBoard every N steps (0 = off)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["a red square moving right"])
    sample_format: str = "mp4"
    """Files of the samples: mp4 (PyAV) or png (one image per frame, no PyAV needed)."""
    split_every: int = 50
    """Every N logging intervals, profile one step and log where its time went (`split.attention`,
    `split.mlp`, ... fractions; scaling/step_split.py). 0 = off. The profiled step costs ~10-30% more."""
    wandb: bool = False
    """Also log to Weights & Biases (rank 0; the optional extra `wandb`): every metrics.jsonl
    scalar at its step, the resolved config, the `sample_every` samples. Files under RUN_DIR/wandb;
    a resume continues the same wandb run. If wandb cannot start or log, one warning line, and
    training goes on without it."""
    wandb_project: str = "vidscale"
    wandb_entity: str = ""
    """The wandb team or user ('' = the account's default)."""
    wandb_mode: str = ""
    """online, offline (RUN_DIR/wandb only; `wandb sync` later) or disabled; '' = WANDB_MODE from
    the environment, else online."""
    wandb_timeout_s: float = 30.0
    """Seconds wandb may take to start, and to upload what is left when the run ends (the rest
    stays in RUN_DIR/wandb for `wandb sync`). An unreachable service costs this plus ~10 s of
    wandb's own login checks, once per start; then training goes on without wandb. At most half
    of `parallel.timeout_s`: the other ranks wait for rank 0 in a collective meanwhile."""
