"""What a checkpoint holds, and saving/restoring a `Trainer` with it.

One checkpoint directory (`RUN_DIR/checkpoints/step_XXXXXXXX`, committed atomically by
`ckpt_io`) holds:

    state.json              step, tokens seen, the parallel layout, the engine kind
    config.yaml             the resolved recipe
    rng/rank00000.json      per-rank RNG states: python, numpy, torch (+cuda), as JSON
    loader/dp00000.json     each data-parallel rank's loader state (JSON)
    TorchEngine (parallel.zero_stage=0, one process):
      model.safetensors, ema.safetensors, optimizer.pt (tensors only: loaded with
      weights_only=True), scheduler.json
    ZeRO engine (scaling/zero.py):
      zero/...              DeepSpeed's sharded model + optimizer + scheduler states
      ema/rank00000.safetensors   each rank's EMA shard, sharded like the model

Same layout: everything is restored as it was, so the losses continue bit for bit. A
different data-parallel size: the loader states are remapped (`data.loader`); model and
optimizer states go through DeepSpeed's universal checkpoint (see `scaling/ckpt_zero.py`).
"""
from __future__ import annotations

import base64
import copy as copy_
import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

from vidscale.scaling.checkpoint import storage as io
from vidscale.scaling.checkpoint.storage import CheckpointError, CorruptCheckpoint  # noqa: F401  (re-exported)

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


# -- tensors for async writes ---------------------------------------------------------------
def host_copy(tree, _memo: dict | None = None):
    """A snapshot of a state tree: every tensor copied to host memory (one copy per tensor,
    however often it is referenced), containers rebuilt with their own types (OrderedDict
    stays OrderedDict), anything else shared as it is."""
    memo = {} if _memo is None else _memo
    if isinstance(tree, torch.Tensor):
        if id(tree) not in memo:
            c = tree.detach().to("cpu", copy=True)
            memo[id(tree)] = torch.nn.Parameter(c, tree.requires_grad) if isinstance(tree, torch.nn.Parameter) else c
        return memo[id(tree)]
    if isinstance(tree, dict):
        out = copy_.copy(tree)
        for k, v in tree.items():
            out[k] = host_copy(v, memo)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(host_copy(v, memo) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v, memo) for v in tree)
    return tree


class Checkpointer:
    """Saves and restores a `Trainer`. `save()` on every rank at the same step."""

    def __init__(self, trainer):
        self.tr = trainer
        self.cfg = trainer.cfg.checkpoint
        self.root = trainer.run_dir / "checkpoints"
        self.last_step: int | None = None
        self.stalls: list[float] = []   # seconds the loop waited per save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        io.set_checksum(self.cfg.checksum)

    @property
    def zero(self) -> bool:
        return hasattr(self.tr.engine, "ds")

    def layout(self) -> dict:
        d = self.tr.dims
        return {"world": d.world, "dp": d.dp, "sp": d.sp, "ulysses": d.ulysses, "ring": d.ring,
                "zero_stage": self.tr.cfg.parallel.zero_stage, "engine": "zero" if self.zero else "torch"}

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    # -- save ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Save at the current step; with checkpoint.async_save every file (DeepSpeed's shards
        included) is written in the background and this returns after the in-memory snapshot."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight; raises the error of a failed background save
        tr, d = self.tr, self.tr.dims
        tag = io.tag_for(tr.step)
        io.arm_faults(tr.step)
        err = None
        if d.rank == 0:
            try:
                io.prepare(self.root, tag)
            except CheckpointError as e:
                err = e
        self._agree_prepared(err)  # also the barrier: nobody writes before the directory exists
        tmp = io.tmp_dir(self.root, tag)
        try:
            files = {}
            if self.zero:
                from vidscale.scaling.checkpoint.zero import save_zero
                # collective: writes each rank's shards (async: snapshots them for the thread)
                files.update(save_zero(tr.engine, tmp, defer=self.cfg.async_save))
            files.update(self._snapshot())
        except BaseException as e:
            self._mark_failed(tmp, e)
            raise
        meta = {"step": tr.step, "tokens_seen": tr.tokens_seen, "layout": self.layout(), "format": FORMAT}
        if self.cfg.async_save:
            self._thread = threading.Thread(target=self._finish_bg, args=(tmp, tag, files, meta), daemon=True)
            self._thread.start()
        else:
            self._finish(tmp, tag, files, meta)
            self._barrier()  # every rank returns with the checkpoint committed
        self.last_step = tr.step
        self.stalls.append(time.perf_counter() - t0)
        return self.root / tag

    def _snapshot(self) -> dict:
        """{relative path: ('json', obj) | ('safetensors', tensors) | ('torch', obj) | ('text', str)}
        for this rank; with async_save, tensors are copied to host memory (so the loop may go on
        while they are written); a synchronous save writes them from where they are."""
        from vidscale.scaling.config import to_yaml
        tr, d = self.tr, self.tr.dims
        files: dict = {f"rng/rank{d.rank:05d}.json": ("json", rng_state())}
        if d.sp_rank == 0:  # the sp ranks of a dp group share one loader
            files[f"loader/dp{d.dp_rank:05d}.json"] = ("json", tr.loader.state_dict())
        if d.rank == 0:
            files["state.json"] = ("json", {"step": tr.step, "tokens_seen": tr.tokens_seen,
                                            "layout": self.layout(), "format": FORMAT})
            files["config.yaml"] = ("text", to_yaml(tr.cfg))
        eng = tr.engine
        copy = host_copy if self.cfg.async_save else (lambda tree: tree)
        if self.zero:
            from vidscale.scaling.checkpoint.zero import ema_files
            files.update(copy(ema_files(eng)))
        else:
            files["model.safetensors"] = ("safetensors", copy(eng.module.state_dict()))
            if eng.ema is not None:
                files["ema.safetensors"] = ("safetensors", copy(eng.ema))
            files["optimizer.pt"] = ("torch", copy(eng.optimizer.state_dict()))
            sch = eng.scheduler.state_dict()
            sch.pop("lr_lambdas", None)  # functions: rebuilt from the recipe
            files["scheduler.json"] = ("json", sch)
        return files

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
        d = self.tr.dims
        try:
            self._write(tmp, files)
            if self.zero:
                from vidscale.scaling.checkpoint.zero import fsync_zero
                fsync_zero(self.tr.engine, tmp)
            (tmp / f".done-{d.rank:05d}").touch()
            _await(tmp, ".done", d.world, self.tr.cfg.parallel.timeout_s)
            io.write_part(tmp, d.rank)
            if d.rank == 0:
                io.commit(self.root, tmp, tag, d.world, meta, self.tr.cfg.parallel.timeout_s)
                io.retain(self.root, self.cfg.keep_last, self.cfg.keep_every, tag)
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
            (tmp / f".failed-{self.tr.dims.rank:05d}").write_text(str(e)[:500])
        except OSError:
            pass
        if self.tr.dims.world == 1:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Block until a background save is committed; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def _agree_prepared(self, err: CheckpointError | None) -> None:
        """Every rank learns whether rank 0 could create the temporary directory (instead of
        waiting in a barrier for a rank that already raised); rank 0's error names the path."""
        from vidscale.scaling.train import signals
        failed = signals.agree(err is not None, self.tr.dims, self.tr.device)
        if err is not None:
            raise err
        if failed:
            raise CheckpointError(f"checkpoint: rank 0 could not create {io.tmp_dir(self.root, io.tag_for(self.tr.step))} "
                                  "(its error names the cause)")

    def _barrier(self) -> None:
        if self.tr.dims.distributed:
            import torch.distributed as dist
            dist.barrier()

    # -- restore ---------------------------------------------------------------------------
    def restore(self, spec: str) -> Path | None:
        """Load the checkpoint `spec` names (see `resolve`) into the trainer."""
        tr, d = self.tr, self.tr.dims
        report = lambda m: print(f"vidscale: {m}", flush=True)  # noqa: E731
        if spec == "auto" and d.distributed:
            path = self._find_latest_striped(report)
        else:
            path = resolve(spec, self.root, report=report) if d.rank == 0 else None
            path = self._broadcast_path(path)
        if path is None:
            if d.rank == 0:
                print(f"vidscale: no complete checkpoint in {self.root}: starting fresh", flush=True)
            return None
        state = json.loads((path / "state.json").read_text())
        old = state["layout"]
        if old["engine"] != self.layout()["engine"]:
            raise ValueError(f"{path}: saved by the {old['engine']} engine (parallel.zero_stage="
                             f"{old['zero_stage']}); resume with the same parallel.zero_stage")
        if self.zero:
            from vidscale.scaling.checkpoint.zero import load_zero
            load_zero(tr.engine, path, old, self.layout(), d)
        else:
            self._load_torch(path)
        if old["world"] == d.world:
            set_rng_state(json.loads((path / f"rng/rank{d.rank:05d}.json").read_text()))
        self._load_loader(path, old)
        tr.step, tr.tokens_seen = state["step"], state["tokens_seen"]
        self.last_step = tr.step
        if d.rank == 0:
            truncate_metrics(tr.run_dir / "metrics.jsonl", tr.step)
            print(f"vidscale: resumed from {path} (step {tr.step}, saved with {_fmt(old)}, now {_fmt(self.layout())})",
                  flush=True)
        return path

    def _find_latest_striped(self, report) -> Path | None:
        """`find_latest` with the checksum work split over the ranks: each verifies a stripe of
        the files, and a checkpoint is used only if every rank found its stripe intact."""
        import torch.distributed as dist
        d = self.tr.dims
        tags = [t for _, t in reversed(io.committed(self.root))]
        n = torch.tensor([len(tags)], device=self.tr.device)  # every rank must see the same list
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        for tag in tags[:int(n.item())]:
            bad = 0
            try:
                io.verify(self.root / tag, rank=d.rank, world=d.world)
            except CorruptCheckpoint:
                bad = 1
            t = torch.tensor([bad], device=self.tr.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if not t.item():
                return self.root / tag
            if d.rank == 0:  # rank 0's output is the one users see: name the file from here
                try:
                    io.verify(self.root / tag)
                except CorruptCheckpoint as e:
                    report(f"{e}; falling back to the previous checkpoint")
        return None

    def _broadcast_path(self, path: Path | None) -> Path | None:
        """Rank 0 chose; every rank loads the same checkpoint (the path as bytes, no pickle)."""
        if not self.tr.dims.distributed:
            return path
        import torch.distributed as dist
        raw = str(path).encode() if path is not None else b""
        n = torch.tensor([len(raw)], dtype=torch.int64, device=self.tr.device)
        dist.broadcast(n, src=0)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self.tr.device)
        if self.tr.dims.rank == 0 and raw:
            buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        if int(n.item()):
            dist.broadcast(buf, src=0)
        return Path(bytes(buf.cpu().tolist()).decode()) if int(n.item()) else None

    def _load_torch(self, path: Path) -> None:
        from safetensors.torch import load_file
        eng, dev = self.tr.engine, self.tr.device
        eng.module.load_state_dict(load_file(str(path / "model.safetensors"), device=str(dev)))
        eng.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dev, weights_only=True))
        sch = json.loads((path / "scheduler.json").read_text())
        sch["lr_lambdas"] = [None] * len(eng.optimizer.param_groups)
        eng.scheduler.load_state_dict(sch)
        if eng.ema is not None:
            if not (path / "ema.safetensors").exists():
                raise ValueError(f"{path}: saved without EMA (optim.ema_decay=0); resume with optim.ema_decay=0")
            ema = load_file(str(path / "ema.safetensors"), device=str(dev))
            with torch.no_grad():
                for k, v in eng.ema.items():
                    v.copy_(ema[k])

    def _load_loader(self, path: Path, old: dict) -> None:
        """Same dp size: each rank's state as saved (exact). Another dp size: the states of
        all old ranks are remapped (`data.loader.remap_loader_states`): every sample not yet
        consumed in an unfinished epoch goes to exactly one new rank."""
        from vidscale.data.loader import remap_loader_states
        tr, d = self.tr, self.tr.dims
        states = [json.loads((path / f"loader/dp{r:05d}.json").read_text()) for r in range(old["dp"])]
        if old["dp"] != d.dp:
            states = remap_loader_states(states, d.dp)
        tr.loader.load_state_dict(states[d.dp_rank])


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
    keep = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
