"""Recipes: typed, nested dataclasses hold every default once; YAML and `--set` override.

    cfg = load_config("recipes/debug.yaml", ["train.steps=20", "parallel.ulysses=2"])

Unknown keys, wrong types and bad values raise `RecipeError`, a one-line message that
names the file, the key and what was expected, before any worker starts. The parallel
layout is checked by `check_layout`, here when the recipe loads and again by each launcher
for the world size it is about to start.

One module per section (`model`, `data`, `objective`, `train` with `optim`, `parallel`,
`checkpoint`, `logging`, `cluster` with `slurm`, `vae`, `plan`), `recipe.py` for the whole
`Config`, `load.py` (YAML, overrides, writing back) and `validate.py` (value and layout
checks). This package re-exports their public names: import from `vidscale.scaling.config`.

Each set of allowed values is one table, owned by the code that acts on it: attention
kernels (`models.attention.KERNELS`), model sizes (`models.sizes.SIZES`), objectives and
schedules (`models.diffusion`), `data.on_error` (`data.loader.ON_ERROR`); the engine's own
(checksums, launchers, devices) are defined beside their section here. The `data`
section's parts are declared in data/args.py, below the engine, so data components can
name the part they take.
"""
from vidscale.scaling.config.checkpoint import CHECKSUMS, CheckpointArgs
from vidscale.scaling.config.cluster import INTERFACE, LAUNCHERS, PLACEMENTS, ClusterArgs, SlurmArgs, network_env
from vidscale.scaling.config.data import DataArgs
from vidscale.scaling.config.errors import RecipeError
from vidscale.scaling.config.load import load_config, load_config_text, save_config, set_values, to_yaml
from vidscale.scaling.config.logging import LoggingArgs
from vidscale.scaling.config.model import ModelArgs, model_config
from vidscale.scaling.config.objective import COND_MODES, ObjectiveArgs
from vidscale.scaling.config.parallel import BACKENDS, GRAD_DTYPES, ZERO_STAGES, ParallelArgs
from vidscale.scaling.config.plan import PlanArgs
from vidscale.scaling.config.recipe import TASKS, Config
from vidscale.scaling.config.train import DECAY_SHAPES, DEVICES, DTYPES, LR_SCHEDULES, OptimArgs, TrainArgs
from vidscale.scaling.config.validate import check_elastic, check_layout, elastic_worlds, validate
from vidscale.scaling.config.vae import VAEArgs

__all__ = [
    "BACKENDS", "CHECKSUMS", "COND_MODES", "DECAY_SHAPES", "DEVICES", "DTYPES", "GRAD_DTYPES", "INTERFACE",
    "LAUNCHERS", "LR_SCHEDULES", "PLACEMENTS", "TASKS", "ZERO_STAGES",
    "CheckpointArgs", "ClusterArgs", "Config", "DataArgs", "LoggingArgs", "ModelArgs", "ObjectiveArgs", "OptimArgs",
    "ParallelArgs", "PlanArgs", "SlurmArgs", "TrainArgs", "VAEArgs",
    "RecipeError", "check_elastic", "check_layout", "elastic_worlds", "load_config", "load_config_text", "model_config",
    "network_env", "save_config", "set_values", "to_yaml", "validate",
]
