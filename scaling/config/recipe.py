"""`Config`: a whole recipe, one field per section."""
from __future__ import annotations

from dataclasses import dataclass, field

from vidscale.scaling.config.checkpoint import CheckpointArgs
from vidscale.scaling.config.cluster import ClusterArgs
from vidscale.scaling.config.data import DataArgs
from vidscale.scaling.config.logging import LoggingArgs
from vidscale.scaling.config.model import ModelArgs
from vidscale.scaling.config.objective import ObjectiveArgs
from vidscale.scaling.config.parallel import ParallelArgs
from vidscale.scaling.config.plan import PlanArgs
from vidscale.scaling.config.train import OptimArgs, TrainArgs
from vidscale.scaling.config.vae import VAEArgs

TASKS = ("dit", "vae")
"""`task` (scaling/train/tasks.py builds one)."""


@dataclass
class Config:
    name: str = "run"
    task: str = "dit"
    """What trains: 'dit' (the video diffusion transformer) or 'vae' (the video VAE, section `vae`)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    cluster: ClusterArgs = field(default_factory=ClusterArgs)
    vae: VAEArgs = field(default_factory=VAEArgs)
    plan: PlanArgs = field(default_factory=PlanArgs)
