"""The DeepSpeed ZeRO part of a checkpoint: shards, EMA shards, universal conversion, export.

    step_XXXXXXXX/zero/state/...        DeepSpeed's own files (`ds.save_checkpoint`, tag
                                        "state"): each rank's partition of the fp32 weights
                                        and AdamW moments, the LR scheduler, module states
    step_XXXXXXXX/ema/rank00000.safetensors   each rank's EMA partition (like `p.ds_tensor`)
    step_XXXXXXXX/ema/params.json             name -> full shape, to reassemble them

Same world size: DeepSpeed loads its shards as they were (exact). Another world size:
rank 0 converts the shards once with DeepSpeed's universal checkpoint
(`deepspeed.checkpoint.ds_to_universal`) into `checkpoints/.universal/TAG` (next to, never
inside, the verified checkpoint; with its own manifest, verified before every use and rebuilt
when damaged or made from an earlier save of TAG, which storage drops when TAG is saved
again), and every rank loads it with `load_universal`. A checkpoint of another run (a branch
resuming its trunk's step) is only read: its conversion goes to `RUN_DIR/.resume-universal`
of the run that loads it, removed once every rank has loaded it. EMA
partitions are reassembled from the shards and re-cut for the new world here.
DeepSpeed writes and reads through `ManifestEngine`, our implementation of its checkpoint-
engine interface: every shard is hashed as torch.save streams it out and fsynced (no
second read for the manifest), and loads are memory-mapped (the verification pass just
read the files into the page cache, so DeepSpeed copies from there instead of reading and
unpickling into fresh buffers again). DeepSpeed reads its files with
`torch.load(weights_only=False)` (its engine, the universal conversion and loading,
`zero_to_fp32`): every DeepSpeed call here that reads runs under `weights_only_loads()`,
which turns each of those into `torch.load(weights_only=True)` allowing exactly the two
non-tensor types DeepSpeed stores (`ZERO_GLOBALS`); a file whose pickle names anything else
is refused with a `CheckpointError`, never executed. And we only hand DeepSpeed files whose
checksum matched the manifest. Everything of ours is safetensors or JSON.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import shutil
import threading
from argparse import Namespace
from pathlib import Path

import torch

from vidscale.scaling.checkpoint import storage as io
from vidscale.scaling.checkpoint.storage import host_copy
from vidscale.scaling.parallel import collectives

TAG = "state"


@functools.cache
def zero_globals() -> tuple:
    """Exactly the non-tensor types DeepSpeed pickles into its checkpoints: found by saving
    ZeRO-1, -2 and -3 checkpoints of recipes/debug.yaml (and the universal conversion) and
    listing `torch.serialization.get_unsafe_globals_in_checkpoint` of every file. Stages 1
    and 2 also store `fragment_address` (a dataclass of two ints: where a parameter's slice
    sits in the flat partition)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return (LossScaler, ZeroStageEnum, fragment_address)


_torch_load = torch.load
_patch_lock = threading.Lock()
_patch_depth = [0]


def load_torch(path, map_location=None, mmap: bool = False, **_ignored):
    """torch.load(weights_only=True) allowing only `zero_globals()`; a pickle that names any
    other global (a crafted shard's `__reduce__`, say) raises CheckpointError, unexecuted.
    Extra keyword arguments (weights_only=False above all) are ignored on purpose."""
    try:
        with torch.serialization.safe_globals(list(zero_globals())):
            return _torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                   str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise io.CheckpointError(f"checkpoint file {path}: refused to unpickle it ({why}); only tensors and "
                                 f"{', '.join(c.__module__ + '.' + c.__name__ for c in zero_globals())} "
                                 f"are loaded") from None


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every `torch.load` (DeepSpeed's, which ask for weights_only=False) is `load_torch`."""
    def load(f, map_location=None, *args, **kw):
        return load_torch(f, map_location=map_location, mmap=kw.get("mmap") or False)
    with _patch_lock:
        if _patch_depth[0] == 0:
            torch.load = load
        _patch_depth[0] += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth[0] -= 1
            if _patch_depth[0] == 0:
                torch.load = _torch_load


@functools.cache
def _engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class ManifestEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, writing through `ckpt_io`, loading mmapped."""

        deferred: list | None = None
        """When a list: saves are snapshotted to host memory and queued there (async save)."""

        def save(self, state_dict, path: str):
            if self.deferred is not None:
                self.deferred.append((Path(path), host_copy(state_dict)))
                return
            io.write_stream(Path(path), lambda f: torch.save(state_dict, f))

        def load(self, path: str, map_location=None):
            try:
                return load_torch(path, map_location=map_location, mmap=True)
            except RuntimeError:  # not a zipfile checkpoint (an older/foreign one): read it whole
                return load_torch(path, map_location=map_location)

    return ManifestEngine


def _manifest_engine(ds) -> None:
    """Plug `ManifestEngine` into a DeepSpeed engine (once), keeping its settings."""
    cls = _engine_class()
    if not isinstance(ds.checkpoint_engine, cls):
        eng = cls.__new__(cls)
        eng.__dict__.update(ds.checkpoint_engine.__dict__)
        ds.checkpoint_engine = eng


def save_zero(ds, tmp: Path, defer: bool = False) -> dict:
    """Every rank: DeepSpeed saves its shards (a collective), each hashed and fsynced as it is
    written (`ManifestEngine`); `fsync_zero` flushes what DeepSpeed wrote on its own.
    defer=True (async save): the shards are only snapshotted to host memory; returned as
    {relative path: ('torch', state)} for the background writer."""
    from torch.utils.serialization import config as ser
    _manifest_engine(ds)
    ce = ds.checkpoint_engine
    ce.deferred = [] if defer else None
    zdir = tmp / "zero"
    crc = ser.save.compute_crc32
    ser.save.compute_crc32 = False  # halves torch.save time; the manifest's checksum covers integrity
    try:
        ds.save_checkpoint(str(zdir), tag=TAG, save_latest=False)
        queued = ce.deferred or []
    except Exception as e:
        raise io.CheckpointError(f"checkpoint: cannot write {zdir}: {e}") from e
    finally:
        ser.save.compute_crc32 = crc
        ce.deferred = None
    return {p.relative_to(tmp).as_posix(): ("torch", state) for p, state in queued}


def fsync_zero(tmp: Path, rank: int) -> None:
    """Flush the DeepSpeed files this rank wrote outside our writer (its recovery script)."""
    for p in sorted((tmp / "zero" / TAG).glob("*")):
        if p.is_file() and _mine(p.name, rank) and not io.recorded(p):
            io.fsync_path(p)


def _mine(name: str, r: int) -> bool:
    return f"_rank_{r}_" in name or (r == 0 and "zero_pp_rank" not in name)


def ema_files(ema: dict | None, model, stage: int, rank: int) -> dict:
    """This rank's EMA files: its partition, and (rank 0) the full shapes."""
    if ema is None:
        return {}
    out = {f"ema/rank{rank:05d}.safetensors": ("safetensors", dict(ema))}
    if rank == 0:
        shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
        out["ema/params.json"] = ("json", {"stage": stage, "shapes": shapes})
    return out


def full_ema(path: Path, world: int) -> dict[str, torch.Tensor]:
    """Reassemble full EMA tensors from the shards of a checkpoint saved by `world` ranks."""
    from safetensors.torch import load_file
    info = json.loads((path / "ema/params.json").read_text())
    shards = [load_file(str(path / f"ema/rank{r:05d}.safetensors")) for r in range(world)]
    out = {}
    for n, shape in info["shapes"].items():
        if info["stage"] != 3:
            out[n] = shards[0][n].view(shape)
        else:
            out[n] = torch.cat([s[n] for s in shards])[:math.prod(shape)].view(shape)
    return out


def load_ema(ema: dict, model, stage: int, path: Path, old_world: int, d) -> None:
    """Restore this rank's EMA partition; another world size re-cuts the full tensors."""
    if not (path / "ema/params.json").exists():
        raise ValueError(f"{path}: saved without EMA (optim.ema_decay=0); resume with optim.ema_decay=0")
    from safetensors.torch import load_file
    if old_world == d.world:
        src = load_file(str(path / f"ema/rank{d.rank:05d}.safetensors"))
    else:
        full = full_ema(path, old_world)
        src = {}
        for n, shard in ema.items():
            flat = full[n].reshape(-1)
            if stage == 3:  # ZeRO-3 partition: rank r holds flat[r*ps:(r+1)*ps], zero padded
                ps = shard.numel()
                flat = torch.nn.functional.pad(flat, (0, ps * d.world - flat.numel()))[d.rank * ps:(d.rank + 1) * ps]
            src[n] = flat.view(shard.shape)
    with torch.no_grad():
        for n, v in ema.items():
            v.copy_(src[n])


def universal_dir(path: Path) -> Path:
    return io.universal_dir(path.parent, path.name)


def convert_universal(path: Path, report=print, out: Path | None = None) -> Path:
    """Rank 0: DeepSpeed's universal checkpoint of `path` (once; cached beside it with its
    own manifest, or at `out`). A cached one is used only if it verifies and was made from this
    very save of `path`; otherwise it is rebuilt."""
    out = Path(out) if out is not None else universal_dir(path)
    source = io.source_id(path)
    if out.exists():
        try:
            if io.verify(out)["meta"].get("source") == source:
                return out
            why = "it was made from an earlier save of this step"
        except io.CorruptCheckpoint as e:
            why = str(e)
        report(f"vidscale: rebuilding the universal conversion {out}: {why}")
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    tmp = out.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with weights_only_loads():
        ds_to_universal(Namespace(input_folder=str(path / "zero" / TAG), output_folder=str(tmp / TAG),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=False))
    io.seal(tmp, {"source": source})
    tmp.rename(out)
    return out


FOREIGN_SCRATCH = ".resume-universal"


def load_zero(ds, path: Path, old_world: int, dims, run_dir: Path | None = None) -> None:
    """Every rank: load DeepSpeed's states, converting them once if the world changed (beside
    `path` when it is a checkpoint of `run_dir`, the run loading it; else into that run)."""
    _manifest_engine(ds)
    if old_world == dims.world:
        with weights_only_loads():
            load_path, _ = ds.load_checkpoint(str(path / "zero"), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    else:
        own = run_dir is None or path.parent.resolve() == (Path(run_dir) / "checkpoints").resolve()
        out = universal_dir(path) if own else Path(run_dir) / FOREIGN_SCRATCH
        err = ""
        if dims.rank == 0:
            try:
                convert_universal(path, out=out)
            except Exception as e:  # tell the other ranks instead of leaving them in the barrier
                err = f"{type(e).__name__}: {e}"
        _agree_ok(err, dims)
        ds._config.load_universal_checkpoint = True
        try:
            with weights_only_loads():
                load_path, _ = ds.load_checkpoint(str(out), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            ds._config.load_universal_checkpoint = False  # later saves are ordinary ones
        if not own:  # a scratch copy: gone once every rank has loaded it
            collectives.barrier()
            if dims.rank == 0:
                shutil.rmtree(out, ignore_errors=True)
    if load_path is None:
        raise io.CheckpointError(f"checkpoint {path}: DeepSpeed found no checkpoint to load")


def _agree_ok(err: str, dims) -> None:
    """Every rank raises if rank 0's conversion failed (rank 0 with its error)."""
    if collectives.agree(bool(err)):
        where = " on rank 0" if dims.distributed else ""
        raise io.CheckpointError(f"checkpoint: universal conversion failed{where}: {err or 'see its log'}")


def export_weights(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """Consolidated full fp32 weights of a ZeRO checkpoint, without any process group."""
    state = json.loads((path / "state.json").read_text())
    if ema:
        if not (path / "ema/params.json").exists():
            raise ValueError(f"{path}: this run kept no EMA (optim.ema_decay=0); export without --ema")
        return full_ema(path, state["layout"]["world"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with weights_only_loads():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(path / "zero"), tag=TAG)
    return {k: v.contiguous() for k, v in sd.items()}
