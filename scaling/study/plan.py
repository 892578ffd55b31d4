"""Sweep recipes: a base recipe and a grid of model sizes x compute budgets (IsoFLOP).

    name: tiny-isoflop
    base: ../debug.yaml            # the recipe every run starts from (relative to this file)
    set: {logging.every: 5}        # recipe overrides for every run (dotted keys or nested;
                                   # a string is the value as written, never re-read as YAML)
    models: [tiny, {name: w64, hidden: 64, depth: 2, heads: 2}]   # named sizes or shapes
    aspect: 32                     # with `depths`: shapes of hidden = aspect x depth ...
    depths: [2, 3, 4]              # ... and heads = hidden / head_dim
    budgets: [3e10, 1e11]          # training FLOPs of each run
    lr: [1e-3, 2e-3]               # optional grid axes (a scalar is one value) ...
    tokens_per_batch: [1024]
    seeds: [0]
    cells: [{model: tiny, budget: 3e10, lr: 3e-3}]  # ... or per-cell overrides

`load_sweep(path)` checks it (one-line `RecipeError`s naming the file and key) and
`plan(spec)` expands it into runs. A run's length is never hand-set: it follows from its
budget through the FLOPs model of `scaling/train/flops.py` (every matmul of the packed batch,
attention quadratic in each video's own length, padding included) applied to the
expected packed batch, the mean over batches drawn from the run's own data loader:
    steps = round(budget / (dp x grad_accum x E[training FLOPs of one packed batch])).
The learning-rate schedule (warmup, then cosine decay to the end) follows the derived
length; warmup is capped at a quarter of it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vidscale.data.args import source_name
from vidscale.data.loader import build_loader
from vidscale.models.sizes import param_count
from vidscale.scaling.checkpoint.storage import tag_for
from vidscale.scaling.config import Config, RecipeError, check_layout, load_config, model_config, validate
from vidscale.scaling.study.fit import HOLDOUT
from vidscale.scaling.train.engine import decay_start
from vidscale.scaling.train.flops import forward_flops

SWEEP_SCHEDULES = ("independent", "wsd-branches")
PROBE_BATCHES = 8
"""Packed batches drawn to estimate the expected batch (per data setting, shared by models)."""


@dataclass
class ModelSpec:
    name: str = ""
    """Label of the model in run names (default: the size, or h<hidden>d<depth>)."""
    size: str = ""
    """A row of the size table, or '' for the base recipe's size with the overrides below."""
    hidden: int = 0
    depth: int = 0
    heads: int = 0
    """0: hidden / head_dim for shapes, the table's heads for named sizes."""


@dataclass
class CellSpec:
    model: str = ""
    """Model label the override applies to ('' = every model)."""
    budget: float = 0.0
    """Budget it applies to (0 = every budget)."""
    lr: float = 0.0
    tokens_per_batch: int = 0


@dataclass
class SweepArgs:
    name: str = "sweep"
    base: str = ""
    """The base recipe, relative to the sweep file."""
    set: dict[str, Any] = field(default_factory=dict)
    """Recipe overrides for every run."""
    models: list[ModelSpec] = field(default_factory=list)
    aspect: int = 0
    """With `depths`: hidden = aspect x depth (a fixed aspect ratio)."""
    depths: list[int] = field(default_factory=list)
    head_dim: int = 32
    budgets: list[float] = field(default_factory=list)
    """Training FLOPs per run, one IsoFLOP curve each."""
    lr: list[float] = field(default_factory=list)
    """Learning rates (a grid axis; empty = the base recipe's)."""
    tokens_per_batch: list[int] = field(default_factory=list)
    """Packed batch sizes in tokens (a grid axis; empty = the base recipe's)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    cells: list[CellSpec] = field(default_factory=list)
    min_steps: int = 5
    """A budget that gives a model fewer steps is an error, not a silent tiny run."""
    nproc: int = 0
    """Processes per run (0 = the base recipe's cluster.nproc)."""
    sweep_dir: str = ""
    """Where runs, results.csv and report.md go (default runs/sweeps/<name>)."""
    schedule: str = "independent"
    """'independent': every run trains from scratch with the base recipe's schedule.
    'wsd-branches': runs that differ only in budget share one trunk (the largest budget's run,
    optim.schedule=wsd); each smaller budget's run branches from the trunk's checkpoint at the
    start of its own cooldown and only trains the cooldown (`cost.json` says what it saved)."""
    gpu_peak_tflops: float = 0.0
    """The peak dense bf16 TFLOP/s of the GPUs the sweep is planned for (e.g. 989 for an H100
    SXM): `--dry-run` then estimates GPU-hours per run (0 = no estimate)."""
    assumed_mfu: float = 0.35
    """Model FLOPs utilisation assumed for those estimates."""
    holdout: list[str] = field(default_factory=list)
    """Runs the report's fit leaves out and then predicts (`vidscale fit --holdout`), e.g.
    ['budget>=4e10']: the sweep checks its own extrapolation."""


@dataclass
class Run:
    name: str
    model: str
    budget: float
    cfg: Config
    params: int
    steps: int
    tokens: float
    """Planned real tokens: steps x the expected real tokens of a step."""
    flops: float
    """Planned training FLOPs: steps x the expected FLOPs of a step."""
    lr: float
    tokens_per_batch: int
    seed: int
    trunk: str = ""
    """wsd-branches: the run this one branches from ('' for trunks and independent runs)."""
    branch_step: int = 0
    """wsd-branches: the step it starts from (the first step of its cooldown)."""

    @property
    def spent_flops(self) -> float:
        """FLOPs this run itself trains (a branch skips the steps its trunk did for it)."""
        return self.flops * (self.steps - self.branch_step) / self.steps


@dataclass
class Sweep:
    args: SweepArgs
    path: Path
    base: Path
    dir: Path
    base_cfg: Config | None = None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested mapping as dotted recipe keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; every mistake is a one-line RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: sweep file not found")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # yaml scanner errors are multi-line
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sweep keys at the top level")
    for key in ("lr", "tokens_per_batch", "seeds", "budgets", "depths"):
        if key in raw and not isinstance(raw[key], list):
            raw[key] = [raw[key]]  # a scalar is a one-value axis
    if isinstance(raw.get("models"), list):
        raw["models"] = [{"size": m} if isinstance(m, str) else m for m in raw["models"]]
    if isinstance(raw.get("set"), dict):
        raw["set"] = flatten(raw["set"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepArgs), OmegaConf.create(raw))
        args: SweepArgs = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise RecipeError(f"{path}: key '{key}': {str(e).splitlines()[0]}") from None

    def bad(key, value, expected):
        raise RecipeError(f"{path}: key '{key}' = {value!r}: expected {expected}")

    if not args.base:
        bad("base", args.base, "the base recipe, e.g. base: ../debug.yaml")
    base = (path.parent / args.base).resolve()
    if not base.is_file():
        bad("base", args.base, f"an existing recipe file (looked for {base})")
    if not args.models and not args.depths:
        bad("models", args.models, "model sizes (names or {hidden, depth}) or aspect + depths")
    if args.depths and args.aspect < 1:
        bad("aspect", args.aspect, "a positive width per layer, with depths")
    if not args.budgets or any(not (b > 0 and math.isfinite(b)) for b in args.budgets):
        bad("budgets", args.budgets, "a list of positive training FLOPs, e.g. [1e11, 3e11]")
    if any(x <= 0 for x in args.lr):
        bad("lr", args.lr, "positive learning rates")
    if any(x < 1 for x in args.tokens_per_batch):
        bad("tokens_per_batch", args.tokens_per_batch, "positive token budgets")
    if not args.seeds:
        bad("seeds", args.seeds, "at least one seed")
    if args.gpu_peak_tflops < 0 or not 0 < args.assumed_mfu <= 1:
        bad("gpu_peak_tflops/assumed_mfu", (args.gpu_peak_tflops, args.assumed_mfu), "TFLOP/s >= 0 and an MFU in (0, 1]")
    if args.schedule not in SWEEP_SCHEDULES:
        bad("schedule", args.schedule, f"one of {', '.join(SWEEP_SCHEDULES)}")
    if args.min_steps < 1 or args.nproc < 0 or args.head_dim < 1:
        bad("min_steps/nproc/head_dim", (args.min_steps, args.nproc, args.head_dim), "positive integers")
    for i, m in enumerate(args.models):
        if not m.size and not (m.hidden or m.depth):
            bad(f"models[{i}]", m, "a size name or hidden/depth")
    labels = [_label(m) for m in _model_specs(args)]
    if len(set(labels)) != len(labels):
        bad("models", labels, "distinct model names")
    for i, h in enumerate(args.holdout):
        if not HOLDOUT.fullmatch(h):
            bad(f"holdout[{i}]", h, "COLUMN OP VALUE with OP one of >=, <=, >, <, = (e.g. budget>=4e10)")
    for i, c in enumerate(args.cells):
        if c.model and c.model not in labels:
            bad(f"cells[{i}].model", c.model, f"one of {labels}")
        if c.budget and c.budget not in args.budgets:
            bad(f"cells[{i}].budget", c.budget, f"one of the budgets {args.budgets}")
    sweep_dir = Path(args.sweep_dir or Path("runs") / "sweeps" / args.name)
    sweep = Sweep(args, path, base, sweep_dir.absolute())
    # a run is finished when its evaluation writes final.json: without a validation loss none
    # ever would, and every rerun would resume at its last step and fail again
    base_cfg = _base_config(sweep)
    if base_cfg.task != "dit":
        bad("task", base_cfg.task, "dit: a sweep fits the DiT's validation loss (the base recipe or set: task)")
    if base_cfg.train.val_videos < 1:
        bad("train.val_videos", base_cfg.train.val_videos,
            "at least 1: a sweep's runs finish with their validation loss (the base recipe or set:)")
    for m in _model_specs(args):  # every run's recipe must load (types, sizes, layout)
        base_cfg = _run_config(sweep, m, args.lr[0] if args.lr else 0, args.tokens_per_batch[0]
                               if args.tokens_per_batch else 0, args.seeds[0], steps=1)
        check_layout(base_cfg, base_cfg.cluster.nproc, f"{path}: model {_label(m)}")
    return sweep


def _model_specs(args: SweepArgs) -> list[ModelSpec]:
    specs = list(args.models)
    for d in args.depths:
        h = args.aspect * d
        specs.append(ModelSpec(hidden=h, depth=d))
    return specs


def _label(m: ModelSpec) -> str:
    if m.name:
        return m.name
    if m.size and not (m.hidden or m.depth):
        return m.size
    return (m.size + "-" if m.size else "") + f"h{m.hidden}d{m.depth}"


def _base_config(sweep: Sweep) -> Config:
    """The base recipe with the sweep's `set` overrides (loaded once: OmegaConf merges are slow)."""
    if sweep.base_cfg is None:
        # strings are set exactly as written (a path `/data/run #2`, or 'null', 'true', stay
        # strings); other values are YAML already and go through the override syntax
        over = [_override(k, v) for k, v in sweep.args.set.items() if not isinstance(v, str)]
        values = {k: v for k, v in sweep.args.set.items() if isinstance(v, str)}
        try:
            cfg = load_config(sweep.base, over, values=values)
        except RecipeError as e:
            raise RecipeError(f"{sweep.path}: {e}") from None
        if cfg.data.source != "synthetic":  # Ray workers run elsewhere: paths must be absolute
            cfg = _with(cfg, data={"source": str(Path(cfg.data.source).absolute())})
        if cfg.data.sources:
            cfg = _with(cfg, data={"sources": [replace(s, path=str(Path(s.path).absolute()), name=source_name(s))
                                               for s in cfg.data.sources]})
        sweep.base_cfg = cfg
    return sweep.base_cfg


def _with(cfg: Config, **sections) -> Config:
    """cfg with fields of its sections replaced: _with(cfg, model={"depth": 2})."""
    out = replace(cfg, **{k: v for k, v in sections.items() if not isinstance(v, dict)})
    for sec, kw in sections.items():
        if isinstance(kw, dict):
            out = replace(out, **{sec: replace(getattr(out, sec), **kw)})
    return out


def _run_config(sweep: Sweep, m: ModelSpec, lr: float, tpb: int, seed: int, steps: int,
                **extra) -> Config:
    a = sweep.args
    cfg = _base_config(sweep)
    model: dict[str, Any] = {}
    if m.size:
        model["size"] = m.size
    if m.hidden:
        model["hidden"] = m.hidden
        model["heads"] = m.heads or max(1, m.hidden // a.head_dim)
    elif m.heads:
        model["heads"] = m.heads
    if m.depth:
        model["depth"] = m.depth
    train = {"seed": seed, "steps": steps, **extra.pop("train", {})}
    if tpb:
        train["tokens_per_batch"] = tpb
    cfg = _with(cfg, model=model, train=train, optim={"lr": lr or cfg.optim.lr, **extra.pop("optim", {})},
                cluster={"nproc": a.nproc or cfg.cluster.nproc}, **extra)
    if m.hidden and model_config(cfg.model).hidden % model_config(cfg.model).heads:
        raise RecipeError(f"{sweep.path}: model {_label(m)}: hidden {m.hidden} is not divisible by "
                          f"{model_config(cfg.model).heads} heads")
    validate(cfg, f"{sweep.path}: model {_label(m)}")
    return cfg


def _fmt_budget(b: float) -> str:
    """1e+11 -> 1e11, 3e+09 -> 3e9, 2.5e10 -> 2.5e10."""
    mant, exp = f"{b:.2g}".split("e") if "e" in f"{b:.2g}" else (f"{b:.2g}", "0")
    return f"{mant}e{int(exp)}"


def expected_batch(cfg: Config, cache: dict) -> tuple[list[tuple[list[int], list[int]]], float]:
    """Segment and text lengths of PROBE_BATCHES packed batches from the run's own loader,
    and their mean real tokens. Cached per data setting: every model shares it."""
    sp = cfg.parallel.ulysses * cfg.parallel.ring
    key = (json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg.data)), sort_keys=True),
           cfg.train.tokens_per_batch, cfg.train.seed, tuple(cfg.model.patch), cfg.model.in_channels, sp)
    if key not in cache:
        check_layout(cfg, cfg.cluster.nproc, f"run {cfg.name}")
        loader = build_loader(cfg.data, seed=cfg.train.seed, tokens_per_batch=cfg.train.tokens_per_batch,
                              patch=cfg.model.patch, channels=cfg.model.in_channels, text_dim=cfg.model.text_dim,
                              dp_size=cfg.cluster.nproc // sp, multiple=sp)
        shapes, real = [], 0
        for _ in range(PROBE_BATCHES):
            _, meta = next(loader)
            shapes.append(([e - s for s, e in meta.segments()],
                           [meta.text_bounds[i + 1] - meta.text_bounds[i] for i in range(meta.num_videos)]))
            real += meta.num_real
        cache[key] = (shapes, real / PROBE_BATCHES)
    return cache[key]


def plan(sweep: Sweep) -> list[Run]:
    """Every run of the sweep, sorted by budget then size, with its derived length."""
    a = sweep.args
    cache: dict = {}
    runs = []
    models = sorted(_model_specs(a), key=lambda m: param_count(model_config(
        _run_config(sweep, m, 0, 0, a.seeds[0], 1).model)))
    for budget in sorted(a.budgets):
        for m in models:
            label = _label(m)
            for lr in a.lr or [0.0]:
                for tpb in a.tokens_per_batch or [0]:
                    for seed in a.seeds:
                        c_lr, c_tpb = lr, tpb
                        for cell in a.cells:  # later cells win
                            if cell.model in ("", label) and cell.budget in (0, budget):
                                c_lr, c_tpb = cell.lr or c_lr, cell.tokens_per_batch or c_tpb
                        runs.append(_plan_run(sweep, m, label, budget, c_lr, c_tpb, seed, cache))
    _check_names(sweep, runs)
    if a.schedule == "wsd-branches":
        runs = _branch(runs)
    return runs


def _check_names(sweep: Sweep, runs: list[Run]) -> None:
    """Two runs of one name would share one run dir: a one-line error naming them. (Run names
    are how sweep dirs find their runs: their format stays, so a budget is named to 2
    significant digits and 1.2e11 and 1.23e11 collide, as do repeated budgets, lrs or seeds.)"""
    seen: dict[str, Run] = {}
    for r in runs:
        if r.name in seen:
            o = seen[r.name]
            what = "; ".join(f"{x.model} budget {x.budget:g} lr {x.lr:g} tokens_per_batch {x.tokens_per_batch} "
                             f"seed {x.seed}" for x in (o, r))
            raise RecipeError(f"{sweep.path}: two runs are both named {r.name} ({what}): run names give budgets "
                              "and lrs to 2 significant digits; remove repeated values or make them differ there")
        seen[r.name] = r


def _branch(runs: list[Run]) -> list[Run]:
    """Runs that differ only in budget form a line: the longest is the trunk, every other
    one restarts from the trunk's checkpoint at its own cooldown's first step. All of a line
    share one warmup, so the trunk's lr up to that step is the branch's own (optim.schedule=wsd)."""
    lines: dict[tuple, list[Run]] = {}
    for r in runs:
        lines.setdefault((r.model, r.lr, r.tokens_per_batch, r.seed), []).append(r)
    out = {}
    for line in lines.values():
        line.sort(key=lambda r: r.steps)
        warmup = min(r.cfg.optim.warmup for r in line)
        trunk = line[-1]
        starts = {r.name: decay_start(warmup, r.steps, r.cfg.optim.decay_fraction) for r in line}
        tdir = Path(trunk.cfg.train.run_dir) / "checkpoints"
        for r in line:
            branch = r is not trunk and r.steps < trunk.steps and starts[r.name] > 0
            cfg = _with(r.cfg, optim={"schedule": "wsd", "warmup": warmup})
            if branch:
                cfg = _with(cfg, checkpoint={"branch_from": str(tdir / tag_for(starts[r.name]))})
            else:  # the trunk keeps a checkpoint at every branch point
                keep = sorted({starts[b.name] for b in line if b.steps < r.steps and starts[b.name] > 0})
                cfg = _with(cfg, checkpoint={"keep_steps": keep})
            out[r.name] = replace(r, cfg=cfg, trunk=trunk.name if branch else "",
                                  branch_step=starts[r.name] if branch else 0)
    return [out[r.name] for r in runs]


def cost(runs: list[Run]) -> dict:
    """What the sweep trains against the same points as independent runs (planned FLOPs)."""
    spent = sum(r.spent_flops for r in runs)
    grid = sum(r.flops for r in runs)
    return {"sweep_flops": spent, "grid_flops": grid, "sweep_flops_ratio": spent / grid if grid else None,
            "runs": len(runs), "branches": sum(1 for r in runs if r.trunk)}


def _plan_run(sweep, m, label, budget, lr, tpb, seed, cache) -> Run:
    a = sweep.args
    cfg = _run_config(sweep, m, lr, tpb, seed, steps=1)
    mcfg = model_config(cfg.model)
    shapes, real_per_batch = expected_batch(cfg, cache)
    batch_flops = sum(3 * forward_flops(mcfg, segs, texts, len(texts)) for segs, texts in shapes) / len(shapes)
    dp = cfg.cluster.nproc // (cfg.parallel.ulysses * cfg.parallel.ring)
    per_step = dp * cfg.train.grad_accum
    steps = round(budget / (per_step * batch_flops))
    parts = [label, f"C{_fmt_budget(budget)}"]
    if len(a.lr) > 1 or any(c.lr for c in a.cells):
        parts.append(f"lr{cfg.optim.lr:g}")
    if len(a.tokens_per_batch) > 1 or any(c.tokens_per_batch for c in a.cells):
        parts.append(f"b{cfg.train.tokens_per_batch}")
    if len(a.seeds) > 1:
        parts.append(f"s{seed}")
    name = "-".join(parts)
    if steps < a.min_steps:
        raise RecipeError(f"{sweep.path}: budget {budget:g} gives {label} only {steps} steps "
                          f"({per_step * batch_flops:.3g} FLOPs per step); raise the budget or lower min_steps "
                          f"(min_steps = {a.min_steps})")
    run_dir = sweep.dir / "runs" / name
    cfg = _run_config(sweep, m, lr, tpb, seed, steps, name=name, train={"run_dir": str(run_dir)},
                      checkpoint={"resume": "auto"}, logging={"progress": False},
                      optim={"warmup": min(cfg.optim.warmup, max(1, steps // 4))})
    return Run(name=name, model=label, budget=budget, cfg=cfg, params=param_count(mcfg), steps=steps,
               tokens=steps * per_step * real_per_batch, flops=steps * per_step * batch_flops,
               lr=cfg.optim.lr, tokens_per_batch=cfg.train.tokens_per_batch, seed=seed)
