"""Recipes: typed, nested dataclasses hold every default once; YAML and `--set` override.

    cfg = load_config("recipes/debug.yaml", ["train.steps=20", "parallel.ulysses=2"])

Unknown keys, wrong types and bad values raise `RecipeError`, a one-line message that
names the file, the key and what was expected, before any worker starts. The parallel
layout is checked by `check_layout`, here when the recipe loads and again by each launcher
for the world size it is about to start.

Each set of allowed values is one table, owned by the code that acts on it: attention
kernels (`models.attention.KERNELS`), model sizes (`models.sizes.SIZES`), objectives and
schedules (`models.diffusion`), `data.on_error` (`data.loader.ON_ERROR`); the engine's own
(checksums, launchers, devices) are defined below. The `data` section's parts are declared
in data/args.py, below the engine, so data components can name the part they take.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

import xxhash
import yaml
from omegaconf import MISSING, OmegaConf  # noqa: F401
from omegaconf.errors import OmegaConfBaseException

from vidscale.data.args import LoaderArgs, PrepareArgs, source_name
from vidscale.data.loader import ON_ERROR
from vidscale.models.attention import KERNELS
from vidscale.models.diffusion import OBJECTIVES, SCHEDULES
from vidscale.models.dit import DiTConfig
from vidscale.models.sizes import SIZES, config_for

CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
"""`checkpoint.checksum`: name -> hasher (scaling/checkpoint/storage.py hashes with it). The
table sits here, at the head of the engine chain, because the checkpoint package reads
recipes (it imports this module), so this module cannot import it."""
LAUNCHERS = ("local", "ray", "slurm")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""`cluster.launcher` and the CLI's `--launcher` (cluster/launch.py dispatches on them)."""
DEVICES = ("auto", "cpu", "cuda")
"""`train.device` and `vidscale prepare --device`: auto is cuda when present."""
TASKS = ("dit", "vae")
"""`task` (scaling/train/tasks.py builds one)."""
DTYPES = ("fp32", "bf16")
"""`train.dtype`."""
BACKENDS = ("auto", "gloo", "nccl")
"""`parallel.backend`: auto is nccl on GPU, gloo on CPU."""
GRAD_DTYPES = ("fp32", "bf16")
"""`parallel.grad_dtype`."""
ZERO_STAGES = (0, 1, 2, 3)
"""`parallel.zero_stage` (0 = plain torch, one process)."""
COND_MODES = ("first", "last", "first_last")
"""`objective.cond_mode` (scaling/objective.py's `clean_frames_mask` places the frames)."""


class RecipeError(ValueError):
    """A user mistake in a recipe or an override; the message is one line."""


@dataclass
class ModelArgs:
    size: str = "debug"
    """Row of the size table (`models/sizes.py`): debug, tiny, small, S, B, L, XL, 30M, 1B .. 30B."""
    hidden: int = 0
    """Override the table's width (0 keeps it). Sweeps use hidden/depth for custom shapes."""
    depth: int = 0
    """Override the table's depth (0 keeps it)."""
    heads: int = 0
    """Override the table's head count (0 keeps it)."""
    mlp_ratio: float = 0.0
    """Override the table's MLP ratio (0 keeps it)."""
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Patch size (pt, ph, pw) over latent frames, rows and columns."""
    in_channels: int = 4
    """Latent channels C (must match the data's latent encoder)."""
    text_dim: int = 384
    """Width of the text-encoder tokens (384 for the packaged MiniLM)."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (per head) before RoPE."""
    attn_backend: str = "sdpa"
    """Packed attention kernel (`models.attention.KERNELS`): sdpa (per-video SDPA; CPU),
    varlen (flash; GPU), dense (reference)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (non-reentrant torch.utils.checkpoint, under the forward's autocast)."""
    ac_offload: bool = False
    """With activation checkpointing, keep the saved block inputs in CPU memory."""
    compile: bool = False
    """torch.compile each block."""


@dataclass
class DataArgs(PrepareArgs, LoaderArgs):
    """The recipe's `data` section. Its keys stay flat (`data.source`, `data.lookahead`,
    `data.synthetic_videos`, `data.clip_frames`, ...); each is declared by the part that reads
    it (data/args.py): `LoaderArgs` for training, which includes the synthetic generator's
    `SyntheticArgs`, and `PrepareArgs` for `vidscale prepare`. Components take their part."""


@dataclass
class ObjectiveArgs:
    name: str = "flow"
    """'flow' (rectified flow, velocity target) or 'ddpm' (epsilon prediction)."""
    schedule: str = "linear"
    """DDPM beta schedule: linear or cosine."""
    num_steps: int = 1000
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "1.0"
    """Rectified flow's timestep shift: a number (1 = none; > 1 spends more steps at high noise),
    or 'auto': each video's own shift sqrt(tokens / shift_ref_tokens), in training (per video of
    a packed batch) and in sampling (for the requested size)."""
    shift_ref_tokens: int = 4096
    """With shift 'auto': the patch-token count whose shift is 1."""
    caption_dropout: float = 0.0
    """Probability of training a video with an empty caption (for classifier-free guidance)."""
    cond_frames: int = 0
    """Image-to-video: condition on up to this many clean latent frames per end (0 = off)."""
    cond_mode: str = "first"
    """Where `cond_frames` sit (Open-Sora's head / tail / loop masks): 'first' (leading frames:
    image-to-video), 'last' (trailing frames: video that ends on an image) or 'first_last' (both
    ends, the same number at each: loops and interpolation between two images). Each video
    draws 0..cond_frames per end and always keeps at least one frame to denoise."""


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
    """Validation loss every N steps (0 = only at the end)."""
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


@dataclass
class ParallelArgs:
    ulysses: int = 1
    """Ulysses (all-to-all) sequence-parallel degree."""
    ring: int = 1
    """Ring-attention sequence-parallel degree (sp = ulysses * ring)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (0 = plain torch, no DeepSpeed)."""
    backend: str = "auto"
    """Collectives: auto (nccl on GPU, gloo on CPU), gloo or nccl."""
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: int = 5_000_000
    """ZeRO gradient reduce(-scatter) bucket, elements. Measured (`vidscale bench dp --buckets`,
    30M model, CPU gloo): dp=2/dp=1 step time 0.83 at 5M vs 1.11 at 50M (one bucket = the
    whole model = no overlap with backward) and 0.92 at 0.5M. Large GPU models: raise it."""
    prefetch_bucket_size: int = 5_000_000
    """ZeRO-3 parameter prefetch (all-gather ahead of use), elements; measured with the above."""
    max_live_parameters: int = 1_000_000_000
    """ZeRO-3 keeps gathered parameters that are used again within this many elements (its reuse
    distance), up to this many at once (DeepSpeed's default, 1e9, for both): a model under 1e9
    parameters stays gathered from forward to backward after the first step (measured, `bench plan`)."""
    overlap_comm: bool = True
    grad_dtype: str = "fp32"
    """bf16 on GPU: the dtype gradients are reduce-scattered and accumulated in (fp32 or bf16;
    DeepSpeed's own default is the model's bf16, which loses low bits of every gradient)."""
    persistence_threshold: int = 0
    """ZeRO-3 keeps parameters with fewer elements whole on every rank (DeepSpeed's default
    is 1e5, which leaves small models unsharded); 0 shards every parameter."""
    max_reuse_distance: int = 1_000_000_000
    """ZeRO-3 keeps a gathered parameter instead of releasing it when the step uses it again
    within this many elements of other parameters (DeepSpeed's `stage3_max_reuse_distance`,
    default 1e9), as it does one whose next use the prefetcher already looked past
    (`prefetch_bucket_size`). A model smaller than these windows is gathered once per step:
    its backward re-gathers nothing, and hpZ has nothing to save. 0, with
    prefetch_bucket_size=0, releases every parameter after use, as a model far larger than
    the windows does (what `vidscale bench hosts` measures on a small one)."""
    zero_hpz: int = 0
    """ZeRO++ hierarchical partitioning (hpZ; ZeRO-3 only): after the forward all-gather, each
    group of this many consecutive ranks keeps a secondary copy of the parameters partitioned
    among themselves, and the backward (and activation-recompute) gathers read it from there
    instead of from every rank. Set it to the ranks per node, so those gathers never leave
    the node; it costs a 1/zero_hpz share of the parameters per rank. Must divide the world
    size (parameters are partitioned over all dp x sp ranks). 0 or 1 = off."""
    timeout_s: int = 300
    """Collective timeout: a failing rank never leaves the others waiting longer."""


@dataclass
class CheckpointArgs:
    every: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    keep_every: int = 0
    """Also keep every M-th step's checkpoint (0 = off)."""
    async_save: bool = False
    checksum: str = "xxh3_128"
    """Manifest checksum of every file: xxh3_128 (fast, detects damage) or sha256."""
    resume: str = ""
    """'' (fresh), 'auto' (latest complete checkpoint in the run dir) or a checkpoint path."""
    keep_steps: list[int] = field(default_factory=list)
    """Also save at these steps and never delete those checkpoints (a wsd trunk's branch points)."""
    branch_from: str = ""
    """A checkpoint of another run (its step_* directory) to start from when this run has none of
    its own: every part of the state (weights, optimizer, data position, RNG, step), then this
    recipe's own length and schedule. What a wsd-branches sweep's cooldown branches run."""


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


@dataclass
class VAEArgs:
    """The video VAE that a `task: vae` recipe trains (models/vae.py)."""
    base: int = 64
    """Channels of the first level."""
    z_dim: int = 4
    """Latent channels (what the DiT's model.in_channels must then be)."""
    mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Channel multiplier per level; len - 1 spatial x2 downsamplings (x8)."""
    temporal_down: list[bool] = field(default_factory=lambda: [False, True, True])
    """Which downsamplings also halve time (two: x4)."""
    num_res: int = 1
    beta: float = 1.0e-6
    """Weight of the KL term (per element, like the reconstruction MSE)."""
    crop: list[int] = field(default_factory=lambda: [64, 64])
    """Random [H, W] crop of each training clip ([0, 0] = whole frames)."""
    frames: int = 17
    """Frames of each synthetic clip (data.source=synthetic)."""
    val_clips: int = 4
    """Held-out clips for the reconstruction PSNR in the logs."""


@dataclass
class SlurmArgs:
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "01:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    constraint: str = ""
    extra: list[str] = field(default_factory=list)
    """Extra '#SBATCH' options, e.g. ['--exclusive']."""
    signal_seconds: int = 90
    """Pre-emption signal (USR1) this many seconds before the time limit."""
    ray: bool = False
    """Start a Ray cluster inside the allocation and launch through Ray."""


@dataclass
class ClusterArgs:
    launcher: str = "local"
    """Where the ranks run (`LAUNCHERS`): local processes, Ray Train workers or a Slurm job."""
    nproc: int = 1
    """World size (processes, one per device)."""
    address: str = ""
    """Ray cluster address ('' starts an embedded local cluster)."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    """Ray: worker-group failures to recover from (-1: no limit). A node lost from an elastic
    run is a failure too; a resize because resources came back is not."""
    elastic: bool = False
    """Ray: let Ray Train size the worker group between `min_nproc` and `nproc` to what the
    cluster holds: when a node dies the group restarts smaller from the latest complete
    checkpoint (its data-loader state remapped to the new world), and grows back once the
    resources return (checked every `resize_check_s`). Each change is a metrics.jsonl record
    {step, old_world, new_world, seconds_lost}."""
    min_nproc: int = 1
    """Ray, `elastic`: the smallest world the run may continue at (>= 1, <= nproc). The
    layout (parallel.ulysses x parallel.ring) must divide every size in [min_nproc, nproc]."""
    resize_check_s: float = 60.0
    """Ray, `elastic`: seconds between checks for resources to grow the worker group
    (Ray's elastic_resize_monitor_interval_s). A grow restarts the group from the latest
    checkpoint, so a short interval trades steps redone for capacity regained sooner."""
    placement: str = "PACK"
    """Ray: how workers are placed on nodes (`PLACEMENTS`, Ray's placement strategies): PACK
    fills nodes in turn, SPREAD spreads over nodes, STRICT_* fail rather than bend."""
    network_interface: str = ""
    """The interface ranks on different hosts talk over (`eth0`, `ib0`, or a comma list):
    every rank gets it as GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME. '' lets gloo and nccl
    choose, which is right on one host; across hosts gloo otherwise binds the address the
    machine's hostname resolves to, which may be unreachable from the other nodes."""
    slurm: SlurmArgs = field(default_factory=SlurmArgs)


@dataclass
class PlanArgs:
    """The hardware a recipe was planned for, and the planner's assumptions (`vidscale plan`,
    scaling/train/planner.py). A test plans every shipped recipe on its own `gpus` x `gpu_memory_gb`."""
    gpus: int = 0
    """GPUs the recipe was planned for (0 = not planned)."""
    gpu_memory_gb: float = 0.0
    """Memory of each of those GPUs, GiB."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak of one GPU, TFLOP/s (989: H100 SXM; `--gpu-tflops` overrides)."""
    mfu: float = 0.4
    """Model FLOPs utilisation the step time assumes (calibrate with `vidscale bench plan`)."""
    bandwidth_gb_s: float = 100.0
    """Bytes per second one rank moves in collectives, GB/s (NVLink ~150-400, InfiniBand ~25-50)."""
    host_bandwidth_gb_s: float = 25.0
    """Host <-> GPU copy rate under offload, GB/s (PCIe 4 x16 ~25)."""
    runtime_gb: float = 2.0
    """CUDA context, allocator fragmentation and kernels' scratch, GiB per rank."""


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


# ---------------------------------------------------------------------------------------
def _keys(dc, prefix="") -> list[str]:
    out = []
    for f in fields(dc):
        sub = getattr(dc, f.name)
        out.append(prefix + f.name)
        if is_dataclass(sub):
            out += _keys(sub, prefix + f.name + ".")
    return out


_ALL_KEYS = _keys(Config())


def _one_line(err: OmegaConfBaseException, where: str) -> RecipeError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "Key" in type(err).__name__ or "not in struct" in msg or "ConfigAttributeError" in type(err).__name__:
        close = difflib.get_close_matches(key, _ALL_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RecipeError(f"{where}: unknown key '{key}'{hint}")
    if "Validation" in type(err).__name__:
        return RecipeError(f"{where}: key '{key}': {msg}")
    return RecipeError(f"{where}: key '{key}': {msg}")


def _merge(base, other, where: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise _one_line(e, where) from None


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> Config:
    """Defaults <- recipe YAML (optionally with `base: other.yaml`) <- `key=value` overrides
    <- `values`: {key: value} set as they are, never parsed (paths, addresses, job ids that
    the CLI takes as arguments: a run dir named `a #2`, `true` or `${x}` stays exactly that)."""
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        for layer, path in _recipe_layers(Path(recipe)):
            cfg = _merge(cfg, layer, str(path))
    dotlist = []
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"--set {o!r}: expected key=value, e.g. train.steps=20")
        dotlist.append(o)
    for o in dotlist:
        try:
            layer = OmegaConf.from_dotlist([o])
        except OmegaConfBaseException as e:
            raise RecipeError(f"--set {o!r}: {str(e).splitlines()[0]}") from None
        except yaml.YAMLError as e:  # the value is parsed as YAML: `[1` is an unclosed list
            raise RecipeError(f"--set {o!r}: value is not valid YAML ({str(e).splitlines()[0]}); "
                              f"quote it or close its brackets") from None
        cfg = _merge(cfg, layer, f"--set {o}")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if values:
        obj = set_values(obj, values)
    validate(obj, str(recipe) if recipe else "<defaults>")
    return obj


def set_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with `{"section.key": value}` set exactly (type-checked, not parsed)."""
    for key, value in values.items():
        parts = key.split(".")
        chain = [cfg]
        for name in parts[:-1]:
            sub = getattr(chain[-1], name, None)
            if not is_dataclass(sub):
                raise RecipeError(f"unknown key '{key}'")
            chain.append(sub)
        leaf = chain[-1]
        kinds = {f.name: f.type for f in fields(leaf)}
        if parts[-1] not in kinds:
            raise RecipeError(f"unknown key '{key}'")
        current = getattr(leaf, parts[-1])
        if type(value) is not type(current) and not (isinstance(current, float) and type(value) is int):
            kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
            raise RecipeError(f"key '{key}' = {value!r}: expected {kind.get(type(current), type(current).__name__)}")
        if isinstance(value, str) and ("\n" in value or "\x00" in value):
            raise RecipeError(f"key '{key}' = {value!r}: a newline or NUL byte cannot be kept exactly; "
                              "choose another value")
        new = value
        for obj, name in zip(reversed(chain), reversed(parts)):
            new = replace(obj, **{name: new})
        cfg = new
    return cfg


def _recipe_layers(path: Path) -> list[tuple[Any, Path]]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml scanner errors are multi-line
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, type(OmegaConf.create({}))):
        raise RecipeError(f"{path}: expected a mapping of recipe keys at the top level")
    layers = []
    base = raw.pop("base", None) if "base" in raw else None
    if base:
        layers += _recipe_layers((path.parent / str(base)).resolve())
    layers.append((raw, path))
    return layers


def _one_of(values) -> str:
    """'a, b or c' for a message."""
    vs = [str(v) for v in values]
    return ", ".join(vs[:-1]) + " or " + vs[-1] if len(vs) > 1 else vs[0]


LR_SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")

INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}(,[A-Za-z0-9_.:@-]{1,15})*")
"""Linux interface names (at most 15 characters), comma-separated."""


def network_env(cluster: ClusterArgs) -> dict[str, str]:
    """The environment every rank needs to reach the others over `cluster.network_interface`."""
    iface = cluster.network_interface
    return {"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface} if iface else {}


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
    if cfg.checkpoint.every < 0:
        bad("checkpoint.every", cfg.checkpoint.every, "0 (only at the end) or a positive integer")
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
            ("data.drop_tokens", c.data.drop_tokens, 0 <= c.data.drop_tokens < 1, "a fraction in [0, 1)"),
            ("data.lookahead", c.data.lookahead, c.data.lookahead >= 1, "a positive number of videos"),
            ("data.shuffle_buffer", c.data.shuffle_buffer, c.data.shuffle_buffer >= 0, "a number >= 0"),
            ("data.workers", c.data.workers, c.data.workers >= 0, "a number of processes >= 0"),
            ("data.fps", c.data.fps, c.data.fps >= 0, "a frame rate >= 0 (0 keeps the source's)"),
            ("train.val_videos", c.train.val_videos, c.train.val_videos >= 0, "a number >= 0"),
            ("parallel.timeout_s", c.parallel.timeout_s, c.parallel.timeout_s > 0, "a positive number of seconds"),
            ("parallel.max_live_parameters", c.parallel.max_live_parameters, c.parallel.max_live_parameters >= 0,
             "a number of parameters >= 0"),
            ("checkpoint.keep_last", c.checkpoint.keep_last, c.checkpoint.keep_last >= 1, "at least 1"),
            ("cluster.cpus_per_worker", c.cluster.cpus_per_worker, c.cluster.cpus_per_worker > 0, "a positive number"),
            ("cluster.gpus_per_worker", c.cluster.gpus_per_worker, c.cluster.gpus_per_worker >= 0, "a number >= 0"),
            ("cluster.resize_check_s", c.cluster.resize_check_s, c.cluster.resize_check_s > 0,
             "a positive number of seconds"),
            ("cluster.min_nproc", c.cluster.min_nproc, c.cluster.min_nproc >= 1, "a world size >= 1"),
            ("vae.beta", c.vae.beta, c.vae.beta >= 0, "a number >= 0"),
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
    for hw in cfg.data.sizes:
        if len(hw) != 2 or hw[0] % cfg.model.patch[1] or hw[1] % cfg.model.patch[2]:
            bad("data.sizes", hw, f"[H, W] divisible by the patch {cfg.model.patch[1:]}")
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


def _escape(node):
    """Strings as they are: OmegaConf would resolve `${...}` when the file is read back."""
    if isinstance(node, str):
        return node.replace("${", "\\${")
    if isinstance(node, dict):
        return {k: _escape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape(v) for v in node]
    return node


def to_yaml(cfg: Config) -> str:
    plain = OmegaConf.to_container(OmegaConf.structured(cfg))
    return OmegaConf.to_yaml(OmegaConf.create(_escape(plain)))


def save_config(cfg: Config, path: str | Path) -> None:
    """Written to a temporary file and renamed: a reader never sees half a recipe."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def model_config(args: ModelArgs) -> DiTConfig:
    """The `DiTConfig` a recipe's model section describes."""
    over: dict[str, Any] = dict(patch=tuple(args.patch), in_channels=args.in_channels, text_dim=args.text_dim,
                                qk_norm=args.qk_norm, attn_backend=args.attn_backend)
    for k in ("hidden", "depth", "heads", "mlp_ratio"):
        if getattr(args, k):
            over[k] = getattr(args, k)
    return config_for(args.size, **over)
