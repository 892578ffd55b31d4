"""`train.init_from`: a new run that starts from trained weights (weights only).

    train.init_from: a `vidscale export` file, a run directory (its latest complete checkpoint;
                     with `train.init_from_ema` its EMA weights) or a safetensors file of the
                     same architecture
    -> step 0, a new optimizer, schedule, data order and resolution (3D RoPE has no table to
       interpolate); `checkpoint.resume` instead continues a run exactly.

The weights are read one tensor at a time and never as a whole model per rank:
  - safetensors files (an export, a foreign file, a plain-torch checkpoint's model.safetensors
    or ema.safetensors): `safe_open`, per tensor; a ZeRO-3 rank reads only the rows that
    cover its own flat partition;
  - a ZeRO checkpoint's EMA: its per-rank EMA shards (safetensors) re-cut per tensor;
  - a ZeRO checkpoint's live weights: DeepSpeed's universal conversion (one fp32 file per
    parameter, checkpoint/zero.py), made by rank 0 into the new run's own directory
    (RUN_DIR/.init_from-universal: the source run is only read, never written) and removed
    once every rank has loaded it; each file memory-mapped under the weights-only loader.
Nothing is unpickled beyond what `checkpoint.zero.load_torch` allows.

The weights go into the plain model after its own `init_weights()` and before the engine
wraps it (`build_engine(..., init=...)`): ZeRO-3 ranks write their partition (`p.ds_tensor`)
and DeepSpeed makes its fp32 masters from them, plain torch and ZeRO-1/2 copy full tensors.
Parameters whose shapes differ from the model's, and the model's parameters the source
lacks, are an error listing each (name, shape in the source, shape in the model) unless
`train.init_allow_resize`: then they keep the fresh initialisation, and the source's
parameters the model lacks are ignored; all of them are recorded. Where the weights came
from is written to RUN_DIR/init_from.json and as the first record of metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vidscale.models.dit import VideoDiT
from vidscale.models.vae import VideoVAE
from vidscale.scaling.checkpoint import storage
from vidscale.scaling.checkpoint import zero as ckpt_zero
from vidscale.scaling.checkpoint.manager import resolve
from vidscale.scaling.checkpoint.weights import EMA_FILE, MODEL_FILE
from vidscale.scaling.config import Config, RecipeError, load_config, model_config
from vidscale.scaling.parallel import collectives
from vidscale.scaling.train.tasks import vae_config

SCRATCH_DIR = ".init_from-universal"
"""RUN_DIR/.init_from-universal: the source checkpoint's universal conversion while it loads."""
RECORD_FILE = "init_from.json"
"""RUN_DIR/init_from.json: where a run's starting weights came from (`Source.record` + the plan)."""


class InitFromError(RecipeError):
    """`train.init_from` cannot start this run (one line: the path and what is wrong)."""


@dataclass
class Source:
    """Weights to start from, read one tensor at a time."""
    path: Path
    """The file, or the checkpoint's step_* directory, the weights are read from."""
    shapes: dict[str, tuple[int, ...]]
    """Every tensor the source holds: name -> shape."""
    record: dict
    """What the run records about it: {"init_from", "ema", "step" or "xxh3_128", ...}."""
    read: Callable[[str], torch.Tensor]
    """name -> the full tensor."""
    read_rows: Callable[[str, int, int], torch.Tensor] | None = None
    """(name, first row, end row) -> those rows of the tensor (safetensors: only they are read)."""

    def flat_range(self, name: str, start: int, end: int) -> torch.Tensor:
        """flat(tensor)[start:end], zero padded past its end (a ZeRO-3 partition)."""
        shape = self.shapes[name]
        numel = math.prod(shape)
        lo, hi = min(start, numel), min(end, numel)
        if lo < hi and self.read_rows is not None and len(shape) > 0:
            row = numel // shape[0] if shape[0] else 1
            first, last = lo // row, -(-hi // row)
            flat = self.read_rows(name, first, last).reshape(-1)[lo - first * row:hi - first * row]
        elif lo < hi:
            flat = self.read(name).reshape(-1)[lo:hi]
        else:
            flat = torch.zeros(0)
        return torch.nn.functional.pad(flat, (0, (end - start) - flat.numel()))


@dataclass
class Plan:
    """How a source's tensors map onto a model's parameters."""
    load: list[str] = field(default_factory=list)
    resized: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    """(name, shape in the source, shape in the model): kept at the fresh initialisation."""
    missing: list[str] = field(default_factory=list)
    """The model's parameters the source lacks: kept at the fresh initialisation."""
    unexpected: list[str] = field(default_factory=list)
    """The source's tensors the model has no parameter for: ignored."""

    def as_json(self) -> dict:
        return {"loaded": len(self.load), "resized": [[n, list(a), list(b)] for n, a, b in self.resized],
                "missing": self.missing, "unexpected": self.unexpected}


# -- the source ------------------------------------------------------------------------------
def _shape_list(names, limit: int = 8) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _safetensors(path: Path, where: str) -> tuple[dict, dict, Callable, Callable]:
    """(shapes, metadata, read, read_rows) of a safetensors file; only its header is read here."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a corrupt header, a pickle, a truncated file
        raise InitFromError(f"{where}: not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None

    def read(name: str) -> torch.Tensor:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name)

    def read_rows(name: str, first: int, last: int) -> torch.Tensor:
        with safe_open(str(path), "pt") as f:
            return f.get_slice(name)[first:last]
    return shapes, meta, read, read_rows


def _own_dir(p: Path, run_dir: Path) -> bool:
    p, run_dir = p.resolve(), run_dir.resolve()
    return p == run_dir or run_dir in p.parents


def locate(spec: str, run_dir: Path, report=print) -> tuple[Path, str]:
    """(path, kind) of what `spec` names: kind 'file' (a safetensors file), 'torch' (a plain-
    torch checkpoint), 'zero' (a ZeRO checkpoint). Checks nothing is read from this run itself."""
    where = f"train.init_from={spec}"
    p = Path(spec)
    if not p.exists():
        raise InitFromError(f"{where}: no such file or directory (expected a `vidscale export` file, a run "
                            f"directory or a safetensors file)")
    if _own_dir(p, run_dir):
        raise InitFromError(f"{where}: that is this run's own directory ({run_dir}); init_from starts a new run "
                            f"from another run's weights (to continue this one use `vidscale resume {run_dir}`)")
    if p.is_file():
        return p, "file"
    try:
        ckpt = resolve(str(p), p / "checkpoints", report=report)
    except (storage.CheckpointError, FileNotFoundError) as e:
        raise InitFromError(f"{where}: {str(e).splitlines()[0]}") from None
    if ckpt is None:
        raise InitFromError(f"{where}: no complete checkpoint in {p}")
    engine = json.loads((ckpt / "state.json").read_text())["layout"]["engine"]
    return ckpt, ("zero" if engine == "zero" else "torch")


def _model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `cfg`'s model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VideoVAE(vae_config(cfg)) if cfg.task == "vae" else VideoDiT(model_config(cfg.model))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def open_source(spec: str, ema: bool, run_dir: Path, convert: bool = True, hash_file: bool = True,
                located: tuple[Path, str] | None = None, report=print) -> Source:
    """The weights `spec` names (`located`: what `locate` already found for it). convert=False
    (a pre-flight check): the live weights of a ZeRO checkpoint are described from its recipe
    instead of converted, and cannot be read."""
    where = f"train.init_from={spec}"
    path, kind = located or locate(spec, run_dir, report)
    if kind == "file":
        shapes, meta, read, read_rows = _safetensors(path, where)
        is_ema = meta.get("ema") == "true"
        if ema and not is_ema:
            raise InitFromError(f"{where}: train.init_from_ema=true, but this file holds live weights (export the "
                                f"EMA with `vidscale export --ema`, or pass the run directory)")
        rec = {"init_from": str(path.resolve()), "kind": "file", "ema": is_ema,
               "xxh3_128": storage.digest_file(path, "xxh3_128")[0].hexdigest() if hash_file else ""}
        if "step" in meta:
            rec["step"] = int(meta["step"]) if meta["step"].isdigit() else meta["step"]
        return Source(path, shapes, rec, read, read_rows)
    state = json.loads((path / "state.json").read_text())
    rec = {"init_from": str(path.resolve()), "kind": "checkpoint", "ema": ema, "step": state["step"],
           "manifest_sha256": storage.source_id(path)}
    if kind == "torch":
        f = path / (EMA_FILE if ema else MODEL_FILE)
        if not f.is_file():
            raise InitFromError(f"{where}: {path} kept no EMA (optim.ema_decay=0); set train.init_from_ema=false")
        shapes, _, read, read_rows = _safetensors(f, where)
        return Source(path, shapes, rec, read, read_rows)
    if ema:  # each rank's EMA partition (safetensors) and the full shapes
        if not (path / "ema/params.json").is_file():
            raise InitFromError(f"{where}: {path} kept no EMA (optim.ema_decay=0); set train.init_from_ema=false")
        info = json.loads((path / "ema/params.json").read_text())
        world = state["layout"]["world"] if info["stage"] == 3 else 1  # stages 1-2: every shard is whole
        shapes = {n: tuple(s) for n, s in info["shapes"].items()}

        def read_ema(name: str) -> torch.Tensor:
            from safetensors import safe_open
            parts = []
            for r in range(world):
                with safe_open(str(path / f"ema/rank{r:05d}.safetensors"), "pt") as f:
                    parts.append(f.get_tensor(name).reshape(-1))
            return torch.cat(parts)[:math.prod(shapes[name])].view(shapes[name])
        return Source(path, shapes, rec, read_ema)
    if not convert:  # pre-flight: the recipe that wrote it says what it holds
        shapes = _model_shapes(load_config(path / "config.yaml"))
        return Source(path, shapes, rec, _unreadable)
    # one file per parameter, flattened by the conversion: shaped by the recipe that wrote them
    univ = Path(run_dir) / SCRATCH_DIR / ckpt_zero.TAG / "zero"
    recipe = _model_shapes(load_config(path / "config.yaml"))
    shapes = {}
    for d in sorted(univ.iterdir()):
        if (d / "fp32.pt").is_file():
            numel = _universal(d).numel()
            shapes[d.name] = recipe[d.name] if math.prod(recipe.get(d.name, (-1,))) == numel else (numel,)

    def read_universal(name: str) -> torch.Tensor:
        return _universal(univ / name).view(shapes[name])
    return Source(path, shapes, rec, read_universal)


def _universal(d: Path) -> torch.Tensor:
    """One parameter of DeepSpeed's universal checkpoint (a tensor; memory-mapped, weights only)."""
    t = ckpt_zero.load_torch(d / "fp32.pt", map_location="cpu", mmap=True)
    return t["param"] if isinstance(t, dict) else t


def _unreadable(name: str) -> torch.Tensor:
    raise AssertionError("a pre-flight source is never read")


# -- matching it to the model ----------------------------------------------------------------------
def plan(source: Source, model_shapes: dict[str, tuple[int, ...]], allow_resize: bool, where: str) -> Plan:
    """Which parameters load; a RecipeError-style one line when shapes or names do not match
    and `train.init_allow_resize` is off."""
    out = Plan()
    for n, shape in model_shapes.items():
        if n not in source.shapes:
            out.missing.append(n)
        elif tuple(source.shapes[n]) != tuple(shape):
            out.resized.append((n, tuple(source.shapes[n]), tuple(shape)))
        else:
            out.load.append(n)
    out.unexpected = [n for n in source.shapes if n not in model_shapes]
    if not out.load:
        raise InitFromError(f"{where}: none of its {len(source.shapes)} tensors is a parameter of this model "
                            f"(it holds {_shape_list(source.shapes)}; the model has "
                            f"{_shape_list(model_shapes)}): not weights of this architecture")
    if allow_resize:
        return out
    problems = []
    if out.resized:
        problems.append(f"{len(out.resized)} parameter(s) differ in shape: " + _shape_list(
            f"{n} (file {list(a)}, model {list(b)})" for n, a, b in out.resized))
    if out.missing:
        problems.append(f"{len(out.missing)} parameter(s) of the model are not in it: {_shape_list(out.missing)}")
    if out.unexpected:
        problems.append(f"{len(out.unexpected)} tensor(s) in it are not parameters of the model: "
                        f"{_shape_list(out.unexpected)}")
    if problems:
        raise InitFromError(f"{where}: " + "; ".join(problems) + "; set train.init_allow_resize=true to keep the "
                            "fresh initialisation for those (and ignore the extra ones)")
    return out


def applies(cfg: Config, run_dir: Path) -> bool:
    """Whether this start loads `train.init_from`: not when it restores a checkpoint (a resumed
    run's weights are its own, and its source may be gone by then)."""
    restores = cfg.checkpoint.resume not in ("", "auto") or bool(
        cfg.checkpoint.resume and storage.committed(Path(run_dir) / "checkpoints"))
    return bool(cfg.train.init_from) and not restores


def check(cfg: Config, run_dir: Path, report=print) -> Plan | None:
    """Pre-flight, before any worker starts: the source exists, is not this run, and fits the
    model (names and shapes). Nothing is converted or hashed."""
    if not applies(cfg, run_dir):
        return None
    src = open_source(cfg.train.init_from, cfg.train.init_from_ema, run_dir, convert=False, hash_file=False,
                      report=report)
    return plan(src, _model_shapes(cfg), cfg.train.init_allow_resize, f"train.init_from={cfg.train.init_from}")


@dataclass
class Init:
    """What `build_engine` applies to the freshly initialised model."""
    source: Source
    plan: Plan
    rank: int

    def __call__(self, model: torch.nn.Module) -> None:
        """Copy the planned tensors into `model` (after its init_weights, before any engine)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.plan.load:
                p = params[n]
                part = getattr(p, "ds_tensor", None)
                if part is not None:  # ZeRO-3: this rank's flat partition, rank r holds flat[r*ps:(r+1)*ps]
                    ps = part.numel()
                    vals = self.source.flat_range(n, self.rank * ps, (self.rank + 1) * ps)
                    part.copy_(vals.to(part.dtype).view_as(part))
                else:
                    p.copy_(self.source.read(n).to(p.dtype))

    def record(self) -> dict:
        return {**self.source.record, **self.plan.as_json()}

    def release(self, run_dir: Path) -> None:
        """Every rank, once the weights are in: rank 0 removes the conversion scratch."""
        collectives.barrier()
        if self.rank == 0:
            shutil.rmtree(Path(run_dir) / SCRATCH_DIR, ignore_errors=True)


def recorded_source(run_dir: Path) -> dict | None:
    """`Source.record` of the weights a run started from, as its first start wrote it to
    RUN_DIR/init_from.json (without the plan); None for a run that started from scratch. A
    resumed start has no `Init` (its weights are its own) but its final weights still say
    where step 0 came from."""
    p = Path(run_dir) / RECORD_FILE
    if not p.is_file():
        return None
    plan_keys = Plan().as_json()
    return {k: v for k, v in json.loads(p.read_text()).items() if k not in plan_keys}


def prepare(cfg: Config, run_dir: Path, dims) -> Init:
    """Every rank: open the source (rank 0 converts a ZeRO checkpoint first), check it against
    the model, and return what loads it. Every rank raises the same error on a mismatch."""
    spec = cfg.train.init_from
    err, found = "", ["", ""]
    if dims.rank == 0:  # verifies a checkpoint once, here; the other ranks take rank 0's choice
        try:
            path, kind = locate(spec, run_dir)
            if kind == "zero" and not cfg.train.init_from_ema:
                ckpt_zero.convert_universal(path, out=run_dir / SCRATCH_DIR)  # the source is only read
            found = [str(path), kind]
        except (RecipeError, OSError, ValueError) as e:
            err = str(e) if isinstance(e, RecipeError) else f"train.init_from={spec}: {type(e).__name__}: {e}"
    err, found = collectives.broadcast_json([err, found])
    if err:
        raise InitFromError(err)
    src = open_source(spec, cfg.train.init_from_ema, run_dir, hash_file=dims.rank == 0,
                      located=(Path(found[0]), found[1]))
    return Init(src, plan(src, _model_shapes(cfg), cfg.train.init_allow_resize, f"train.init_from={spec}"),
                dims.rank)
