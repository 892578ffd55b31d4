"""Checkpoint save/load throughput of a ZeRO-3 run vs the raw speed of the same disk.

One process, DeepSpeed ZeRO-3 (the recipe's engine), a 30M-parameter model by default,
one training step so the AdamW moments exist. Measured in one run, on the run directory's
filesystem:
  raw_write_MBps   one file of the checkpoint's size written in 8 MiB chunks, then fsync
  raw_read_MBps    that file read back after dropping it from the page cache (fadvise)
  save_MBps        `Checkpointer.save()` (sync): DeepSpeed's shards, EMA, RNG, loader,
                   each file checksummed as it is written and fsynced, the manifest,
                   atomic rename, `latest` (retention's deletion of the previous checkpoint
                   runs in the background and is waited for outside the timing)
  load_MBps        resume: manifest verification (checksum of every file) + loading the
                   shards (memory-mapped), EMA, RNG and loader state, after dropping the
                   files from the cache; load_noverify_MBps: the same load without the
                   checksum pass
  save_ratio / load_ratio   ours / raw (goal >= 0.5)
  stall_s          how long the training loop is blocked per save with
                   checkpoint.async_save=true (DeepSpeed's own shards are written before
                   save() returns; our files, hashing and the commit go to a thread);
                   stall_sync_s is the same save without the thread
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from vidscale.scaling.checkpoint import storage as ckpt_io
from vidscale.scaling.config import load_config
from vidscale.scaling.train.loop import Trainer


QUICK = {"size": "debug", "repeats": 1}
"""`--quick`: flag values (scaling/cli/bench.py)."""
QUICK_SET: list[str] = []
"""`--quick`: recipe overrides."""


def add_args(p) -> None:
    p.add_argument("--recipe", default="recipes/debug.yaml", help="base recipe (default recipes/debug.yaml)")
    p.add_argument("--size", default="30M", help="model.size (default 30M: ~0.5 GB of checkpoint)")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temporary one)")
    p.add_argument("--repeats", type=int, default=3, help="saves/loads to time; the best is reported")


def _drop_cache(paths) -> None:
    """Evict these files' pages (clean after fsync) so reads come from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


def raw_write_read(path: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write (+fsync) and to read back (uncached) `nbytes` in one file."""
    chunk = memoryview(os.urandom(8 << 20))  # sliced without copying
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[:min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())
    tw = time.perf_counter() - t0
    _drop_cache([path])
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    tr = time.perf_counter() - t0
    path.unlink()
    return tw, tr


def _load_without_verify(ck, path: Path) -> None:
    """The load alone (what `restore` does after the manifest check)."""
    old = json.loads((path / "state.json").read_text())["layout"]
    for part in ck.parts.values():  # the engine (DeepSpeed's shards, EMA), RNG, loader
        part.load_checkpoint(path, old)


def run(args) -> dict:
    os.environ.setdefault("RANK", "0"), os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    base = Path(args.dir) if args.dir else None
    with tempfile.TemporaryDirectory(prefix="vidscale-bench-ckpt-", dir=base) as tmp:
        tmp = Path(tmp)
        cfg = load_config(args.recipe, [f"model.size={args.size}", "train.tokens_per_batch=256",
                                        "parallel.zero_stage=3", "logging.progress=false",
                                        "logging.tensorboard=false", "checkpoint.keep_last=1",
                                        f"train.run_dir={tmp / 'run'}", *args.overrides])
        tr = Trainer(cfg)
        t0 = time.perf_counter()
        tr.train_step()
        step_s = time.perf_counter() - t0
        ck = tr.ckpt
        saves, stalls_async, loads, loads_nv, tw, trd = [], [], [], [], [], []
        nbytes = 0
        # raw and ours interleaved, best of `repeats`: the disk is shared and its speed drifts
        for _ in range(args.repeats):
            # every write measurement starts from a settled disk: nothing dirty, no deletion pending
            ck.args.async_save = False
            tr.state.step += 1  # a new tag per save
            os.sync()
            t0 = time.perf_counter()
            path = tr.save()
            saves.append(time.perf_counter() - t0)
            ckpt_io.wait_deletions()  # retention deletes in the background: not while raw runs
            files = _files(path)
            nbytes = sum(p.stat().st_size for p in files)
            os.sync()
            w, r = raw_write_read(tmp / "raw.bin", nbytes)
            tw.append(w), trd.append(r)
            _drop_cache(files)
            t0 = time.perf_counter()
            ck.restore(str(path))  # verifies every checksum, then loads
            loads.append(time.perf_counter() - t0)
            _drop_cache(files)
            t0 = time.perf_counter()
            _load_without_verify(ck, path)
            loads_nv.append(time.perf_counter() - t0)
            ck.args.async_save = True
            tr.state.step += 1
            os.sync()
            t0 = time.perf_counter()
            tr.save()
            stalls_async.append(time.perf_counter() - t0)
            ck.wait()
            ckpt_io.wait_deletions()
        ckpt_io.verify(ckpt_io.find_latest(ck.root))
        tr.dims.destroy()

    mb = nbytes / 2**20
    save_mbps, load_mbps = mb / min(saves), mb / min(loads)
    raw_w, raw_r = mb / min(tw), mb / min(trd)
    return {"ckpt_MB": round(mb, 1), "files": len(files),
            "save_MBps": round(save_mbps, 1), "raw_write_MBps": round(raw_w, 1),
            "save_ratio": round(save_mbps / raw_w, 3),
            "load_MBps": round(load_mbps, 1), "raw_read_MBps": round(raw_r, 1),
            "load_ratio": round(load_mbps / raw_r, 3),
            "load_noverify_MBps": round(mb / min(loads_nv), 1),
            "load_noverify_ratio": round(mb / min(loads_nv) / raw_r, 3),
            "stall_s": round(min(stalls_async), 3), "stall_sync_s": round(min(saves), 3),
            "step_s": round(step_s, 3), "model_size": args.size}
