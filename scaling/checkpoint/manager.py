"""What a checkpoint holds, and saving/restoring the stateful parts of a run with it.

One checkpoint directory (`RUN_DIR/checkpoints/step_XXXXXXXX`, committed atomically by
`ckpt_io`) holds:

    state.json              step, tokens seen, the parallel layout, the engine kind
    config.yaml             the resolved recipe
    rng/rank00000.json      per-rank RNG states: python, numpy, torch (+cuda), as JSON
    loader/dp00000.json     each data-parallel rank's loader state (JSON)
    the engine's own files (`Engine.checkpoint_files`, scaling/train/engine.py):
      TorchEngine (parallel.zero_stage=0, one process): model.safetensors,
        ema.safetensors, optimizer.pt (tensors only: loaded with weights_only=True),
        scheduler.json
      ZeRO engine (scaling/train/zero.py, files in checkpoint/zero.py): zero/...
        DeepSpeed's sharded model + optimizer + scheduler states, and
        ema/rank00000.safetensors, each rank's EMA shard, sharded like the model

The manager knows none of these parts' internals: the run hands it a `TrainState` (step,
tokens seen) and its stateful parts (engine, data loader, RNG), each of which lists the
files it saves and restores itself from a checkpoint.

Same layout: everything is restored as it was, so the losses continue bit for bit. A
different data-parallel size: the loader states are remapped (`data.loader`); model and
optimizer states go through DeepSpeed's universal checkpoint (see `checkpoint/zero.py`).
"""
from __future__ import annotations

import base64
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vidscale.data.loader import remap_loader_states
from vidscale.scaling.checkpoint import storage as io
from vidscale.scaling.checkpoint.storage import CheckpointError, CorruptCheckpoint  # noqa: F401  (re-exported)
from vidscale.scaling.parallel import collectives
from vidscale.scaling.parallel.dims import ParallelDims

FORMAT = 1


# -- RNG and loader state as JSON ------------------------------------------------------------
def rng_state() -> dict:
    v, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [v, list(mt), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    v, mt, gauss = s["python"]
    random.setstate((v, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(c)), dtype=torch.uint8)
                                      for c in s["cuda"]])


# -- the stateful parts of a run -----------------------------------------------------------
@dataclass
class TrainState:
    """Where the run is: saved in state.json, restored first."""
    step: int = 0
    tokens_seen: int = 0


class Stateful(Protocol):
    """A part of the run that a checkpoint saves (the engine, the loader, the RNG)."""

    def checkpoint_files(self, tmp: Path, snapshot: bool) -> dict:
        """{relative path: ('json', obj) | ('safetensors', tensors) | ('torch', obj) | ('text', str)}
        of this rank; snapshot=True (async save): tensors copied to host memory, written later."""

    def flush_files(self, tmp: Path) -> None:
        """After every listed file is written: make durable what the part wrote on its own."""

    def load_checkpoint(self, path: Path, saved_layout: dict) -> None:
        """Restore from `path`, saved under `saved_layout` (world, dp, sp, ...)."""


class LoaderPart:
    """Each data-parallel rank's loader state; another dp size remaps the old ranks' states
    (`data.loader.remap_loader_states`): every sample not yet consumed in an unfinished
    epoch goes to exactly one new rank."""

    def __init__(self, loader, dims: ParallelDims):
        self.loader, self.dims = loader, dims

    def checkpoint_files(self, tmp: Path, snapshot: bool) -> dict:
        if self.dims.sp_rank != 0:  # the sp ranks of a dp group share one loader
            return {}
        return {f"loader/dp{self.dims.dp_rank:05d}.json": ("json", self.loader.state_dict())}

    def flush_files(self, tmp: Path) -> None:
        pass

    def load_checkpoint(self, path: Path, saved_layout: dict) -> None:
        d = self.dims
        states = [json.loads((path / f"loader/dp{r:05d}.json").read_text()) for r in range(saved_layout["dp"])]
        if saved_layout["dp"] != d.dp:  # the loader's own remap where it has one (the VAE's clips)
            states = getattr(self.loader, "remap_states", remap_loader_states)(states, d.dp)
        self.loader.load_state_dict(states[d.dp_rank])


class RngPart:
    """Each rank's python / numpy / torch (/cuda) RNG states, restored on the same world size
    only (the training noise is keyed by (seed, step, micro-batch, dp rank), not by them)."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def checkpoint_files(self, tmp: Path, snapshot: bool) -> dict:
        return {f"rng/rank{self.dims.rank:05d}.json": ("json", rng_state())}

    def flush_files(self, tmp: Path) -> None:
        pass

    def load_checkpoint(self, path: Path, saved_layout: dict) -> None:
        if saved_layout["world"] == self.dims.world:
            set_rng_state(json.loads((path / f"rng/rank{self.dims.rank:05d}.json").read_text()))


class Checkpointer:
    """Saves and restores a run's parts. `save()` on every rank at the same step.

    parts: {name: Stateful} in the order they are saved and restored (the engine first:
    its save is a collective). layout: the parallel layout and the engine kind, written to
    state.json; resuming needs the same engine kind, any world size.
    """

    def __init__(self, run_dir: Path, args, dims: ParallelDims, state: TrainState, parts: dict[str, Stateful],
                 layout: dict, config_text: str, timeout_s: float):
        self.args, self.dims, self.state, self.parts = args, dims, state, parts
        self.root = Path(run_dir) / "checkpoints"
        self.metrics = Path(run_dir) / "metrics.jsonl"
        self._layout, self.config_text, self.timeout_s = dict(layout), config_text, timeout_s
        self.last_step: int | None = None
        self.stalls: list[float] = []   # seconds the loop waited per save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        io.set_checksum(args.checksum)

    def layout(self) -> dict:
        return dict(self._layout)

    def should_save(self, step: int) -> bool:
        return (self.args.every > 0 and step % self.args.every == 0) or step in self.args.keep_steps

    # -- save ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Save at the current step; with checkpoint.async_save every file (DeepSpeed's shards
        included) is written in the background and this returns after the in-memory snapshot."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight; raises the error of a failed background save
        io.PINNED.begin()  # the last snapshot is written: its pinned buffers serve this one
        d, step = self.dims, self.state.step
        tag = io.tag_for(step)
        io.arm_faults(step)
        err = None
        if d.rank == 0:
            try:
                io.prepare(self.root, tag)
            except CheckpointError as e:
                err = e
        self._agree_prepared(err, tag)  # also the barrier: nobody writes before the directory exists
        tmp = io.tmp_dir(self.root, tag)
        meta = {"step": step, "tokens_seen": self.state.tokens_seen, "layout": self.layout(), "format": FORMAT}
        try:
            files = {}
            for part in self.parts.values():
                files.update(part.checkpoint_files(tmp, self.args.async_save))
            if d.rank == 0:
                files["state.json"] = ("json", meta)
                files["config.yaml"] = ("text", self.config_text)
        except BaseException as e:
            self._mark_failed(tmp, e)
            raise
        if self.args.async_save:
            self._thread = threading.Thread(target=self._finish_bg, args=(tmp, tag, files, meta), daemon=True)
            self._thread.start()
        else:
            self._finish(tmp, tag, files, meta)
            collectives.barrier()  # every rank returns with the checkpoint committed
        self.last_step = step
        self.stalls.append(time.perf_counter() - t0)
        return self.root / tag

    def _write(self, tmp: Path, files: dict) -> None:
        from safetensors.torch import save_file
        for rel, (kind, obj) in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "json":
                io.write_json(p, obj)
            elif kind == "text":
                io.write_bytes(p, obj.encode())
            elif kind == "safetensors":  # written by the library straight from the tensors
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in obj.items()}
                io.write_with(p, lambda path, t=tensors: save_file(t, str(path)))
            else:  # torch.save streams through the hashing writer
                io.write_stream(p, lambda f, o=obj: torch.save(o, f))

    def _finish(self, tmp: Path, tag: str, files: dict, meta: dict) -> None:
        d = self.dims
        try:
            self._write(tmp, files)
            for part in self.parts.values():
                part.flush_files(tmp)
            (tmp / f".done-{d.rank:05d}").touch()
            _await(tmp, ".done", d.world, self.timeout_s)
            io.write_part(tmp, d.rank)
            if d.rank == 0:
                io.commit(self.root, tmp, tag, d.world, meta, self.timeout_s)
                io.retain(self.root, self.args.keep_last, self.args.keep_every, tag, self.args.keep_steps)
        except BaseException as e:
            self._mark_failed(tmp, e)
            raise

    def _finish_bg(self, *args) -> None:
        try:
            self._finish(*args)
        except BaseException as e:  # surfaced by the next wait()
            self._error = e

    def _mark_failed(self, tmp: Path, e: BaseException) -> None:
        """Tell the other ranks (they poll the directory) and drop the temporary files."""
        io.forget(tmp)
        try:
            (tmp / f".failed-{self.dims.rank:05d}").write_text(str(e)[:500])
        except OSError:
            pass
        if self.dims.world == 1:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Block until a background save is committed; re-raise its error, if any. Every rank
        calls it at the same point (the next save, the end of the run) and all of them raise
        when one failed: rank 0's commit fails where no other rank sees it, and they would
        otherwise wait for it in the next collective until parallel.timeout_s."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failed = self._error is not None
        if self.args.async_save and self.dims.distributed:
            elsewhere = collectives.agree(failed)
        else:
            elsewhere = failed
        if failed:
            e, self._error = self._error, None
            raise e
        if elsewhere:
            raise CheckpointError(f"checkpoint: the background save of step {self.last_step} failed on another "
                                  "rank (its error names the cause)")

    def _agree_prepared(self, err: CheckpointError | None, tag: str) -> None:
        """Every rank learns whether rank 0 could create the temporary directory (instead of
        waiting in a barrier for a rank that already raised); rank 0's error names the path."""
        failed = collectives.agree(err is not None)
        if err is not None:
            raise err
        if failed:
            raise CheckpointError(f"checkpoint: rank 0 could not create {io.tmp_dir(self.root, tag)} "
                                  "(its error names the cause)")

    # -- restore ---------------------------------------------------------------------------
    def restore(self, spec: str) -> Path | None:
        """Load the checkpoint `spec` names (see `resolve`) into every part."""
        d = self.dims
        report = lambda m: print(f"vidscale: {m}", flush=True)  # noqa: E731
        if d.rank == 0:  # a re-save this run's last process died in the middle of: the old save back
            for tag in io.recover(self.root):
                report(f"{self.root / tag}: put back (a re-save of it was interrupted before it replaced it)")
        if d.distributed:  # rank 0's choice: the ranks must take the same path through the collectives below
            spec = collectives.broadcast_json(spec, src=0)
        if spec == "auto" and d.distributed:
            path = self._find_latest_striped(report)
        else:
            path = resolve(spec, self.root, report=report) if d.rank == 0 else None
            path = self._broadcast_path(path)
        if path is None:
            found = io.committed(self.root)
            if found:  # never start over on top of a run whose checkpoints are all damaged
                raise CorruptCheckpoint(
                    f"{self.root}: none of its {len(found)} checkpoint(s) passed verification (the errors above "
                    "name the files); nothing was changed. Restore them from a copy, or start a new run "
                    "in another directory")
            if d.rank == 0:
                print(f"vidscale: no complete checkpoint in {self.root}: starting fresh", flush=True)
            return None
        saved = json.loads((path / "state.json").read_text())
        old = saved["layout"]
        if old["engine"] != self._layout["engine"]:
            raise ValueError(f"{path}: saved by the {old['engine']} engine (parallel.zero_stage="
                             f"{old['zero_stage']}); resume with the same parallel.zero_stage")
        for part in self.parts.values():
            try:
                part.load_checkpoint(path, old)
            except RuntimeError as e:  # torch's load_state_dict: many lines, none naming the checkpoint
                if "state_dict" not in str(e) and "size mismatch" not in str(e):
                    raise
                why = "; ".join(x.strip() for x in str(e).splitlines() if x.strip())
                why = why if len(why) <= 300 else why[:300] + "..."
                raise ValueError(f"{path}: does not fit this run's model ({why}); resume with the model "
                                 "settings it was saved with") from None
        self.state.step, self.state.tokens_seen = saved["step"], saved["tokens_seen"]
        self.last_step = self.state.step
        if d.rank == 0:
            if spec != "auto":
                self._retire_newer(path)
            truncate_metrics(self.metrics, self.state.step)
            print(f"vidscale: resumed from {path} (step {self.state.step}, saved with {_fmt(old)}, "
                  f"now {_fmt(self.layout())})", flush=True)
        return path

    def _retire_newer(self, path: Path) -> None:
        """Rank 0, after restoring an explicit checkpoint of this run dir that is not its newest
        (a rewind): the newer ones are renamed `rewound-step_N` (kept, never deleted, no longer
        resumed) and `latest` names the restored one, so that a restart (`auto`) continues the
        rewound line of the run, as `metrics.jsonl` (truncated to the restored step) does."""
        if path.parent.resolve() != self.root.resolve():
            return
        step = io.step_of(path.name)
        newer = [t for s, t in io.committed(self.root) if s > step]
        for tag in newer:
            dest, n = self.root / f"rewound-{tag}", 1
            while dest.exists():
                dest, n = self.root / f"rewound{n}-{tag}", n + 1
            (self.root / tag).rename(dest)
        if newer:
            io.fsync_path(self.root)
            io.set_latest(self.root, path.name)
            print(f"vidscale: rewound to {path.name}: the later checkpoint(s) {', '.join(newer)} are kept as "
                  f"rewound-* in {self.root} and no longer resumed", flush=True)

    def _find_latest_striped(self, report) -> Path | None:
        """`find_latest` with the checksum work split over the ranks: each verifies a stripe of
        the files, and a checkpoint is used only if every rank found its stripe intact. Rank 0
        lists the checkpoints (a node with a stale view of a shared filesystem must not pick
        another one)."""
        d = self.dims
        tags = collectives.broadcast_json([t for _, t in reversed(io.committed(self.root))] if d.rank == 0 else None,
                                          src=0)
        for tag in tags:
            bad = False
            try:
                io.verify(self.root / tag, rank=d.rank, world=d.world)
            except CorruptCheckpoint:
                bad = True
            if not collectives.agree(bad):
                return self.root / tag
            if d.rank == 0:  # rank 0's output is the one users see: name the file from here
                try:
                    io.verify(self.root / tag)
                except CorruptCheckpoint as e:
                    report(f"{e}; falling back to the previous checkpoint")
        return None

    def _broadcast_path(self, path: Path | None) -> Path | None:
        """Rank 0 chose; every rank loads the same checkpoint (the path as bytes, no pickle)."""
        if not self.dims.distributed:
            return path
        raw = collectives.broadcast_bytes(str(path).encode() if path is not None else b"")
        return Path(raw.decode()) if raw else None


def resolve(spec: str, root: Path, report=print) -> Path | None:
    """'auto' -> the newest complete checkpoint under `root` (None if there is none; newer
    damaged ones are reported and skipped); a path -> that step_* directory (verified), or
    the newest complete one of that run directory / checkpoints directory."""
    if spec == "auto":
        return io.find_latest(root, report)
    p = Path(spec)
    if (p / io.MANIFEST).exists() or io.step_of(p.name) is not None:
        io.verify(p)
        return p
    for r in (p / "checkpoints", p):
        if io.committed(r):
            found = io.find_latest(r, report)
            if found is None:
                raise CorruptCheckpoint(f"{spec}: no complete checkpoint in {r}")
            return found
    raise FileNotFoundError(f"{spec}: no checkpoint there (expected a run directory, its checkpoints/ "
                            "or a step_* directory)")


def _await(tmp: Path, prefix: str, world: int, timeout_s: float) -> None:
    """Wait until every rank has left `prefix-RANK` in tmp; a `.failed-*` from any rank aborts."""
    deadline = time.monotonic() + timeout_s
    while True:
        failed = sorted(tmp.glob(".failed-*"))
        if failed:
            raise CheckpointError(f"checkpoint: {failed[0].name[1:]}: {failed[0].read_text()}")
        if all((tmp / f"{prefix}-{r:05d}").exists() for r in range(world)):
            return
        if time.monotonic() > deadline:
            raise CheckpointError(f"checkpoint: {tmp}: not every rank finished writing within {timeout_s:.0f} s")
        time.sleep(0.005)


def _fmt(layout: dict) -> str:
    return f"world {layout['world']} = dp {layout['dp']} x sp {layout['sp']}"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint's step (logged by the interrupted run after its last
    save): the resumed run logs them again, so the file reads like one uninterrupted run."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a torn last line: the process died while appending it
                print(f"vidscale: {path}: dropped a torn last line ({len(line)} bytes)", flush=True)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON; repair or remove that line") from None
        if rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
