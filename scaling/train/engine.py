"""Optimizer engines behind one interface that every caller uses without probing.

    engine.kind            'torch' | 'zero' (saved with a checkpoint: resume needs the same)
    engine.module          what the loop calls (the model, or DeepSpeed's wrapper of it)
    engine.model           the plain model (parameters by name, train()/eval())
    engine.loss_scale      multiply the normalised loss by this before backward
    engine.gathers_params  a forward is a collective (ZeRO-3): every rank runs the same forwards
    engine.backward(loss); grad_norm = engine.step(); engine.lr
    engine.checkpoint_files(snapshot) / flush_files(tmp) / load_checkpoint(path, layout)
    engine.full_state_dict() / engine.full_ema()     consolidated weights (collectives)
    with engine.ema_weights(): ...                  the module computes with the EMA (training samples)

`TorchEngine` is the plain single-process path (parallel.zero_stage=0). The DeepSpeed
ZeRO engine (train/zero.py) implements the same interface for any world size.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Protocol

import torch

from vidscale.scaling.checkpoint.storage import host_copy


class Engine(Protocol):
    kind: str
    module: torch.nn.Module
    model: torch.nn.Module
    loss_scale: float
    gathers_params: bool

    @property
    def lr(self) -> float: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor:
        """Optimizer step at the end of the accumulation; returns the gradient norm (a device tensor)."""

    def checkpoint_files(self, tmp: Path, snapshot: bool) -> dict:
        """{relative path: (kind, obj)} of this rank's engine state for a checkpoint in `tmp`
        (a collective for sharded engines). snapshot=True: copies in host memory, written later."""

    def flush_files(self, tmp: Path) -> None:
        """After the files are written: make durable anything the engine wrote on its own."""

    def load_checkpoint(self, path: Path, saved_layout: dict) -> None:
        """Restore from a checkpoint saved under `saved_layout` (another world size is allowed
        where the engine can re-cut its shards)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated full weights on rank 0 (other ranks: {}); every rank must call it."""

    def full_ema(self) -> dict[str, torch.Tensor]:
        """Consolidated full EMA weights on every rank ({} without EMA); every rank must call it."""

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Inside, `module` computes with the EMA weights (the trained ones without an EMA); on
        exit the trained weights are back bit for bit. A collective under ZeRO-3 (every rank
        enters); no rank ever holds more than one consolidated tensor for it."""


def decay_start(warmup: int, total: int, decay_fraction: float) -> int:
    """The first step of a wsd run's cooldown: where a branch of a shared trunk starts."""
    return max(warmup, total - round(decay_fraction * total))


def lr_lambda(warmup: int, total: int, min_ratio: float, schedule: str = "cosine", decay_fraction: float = 0.2,
              decay_shape: str = "linear"):
    """The lr multiplier at each step: linear warmup to 1, then
    cosine: a half cosine down to `min_ratio` over the rest of the run;
    wsd:    1 until the last `decay_fraction` of the run (at least the warmup), then down to
            `min_ratio` along `decay_shape` (linear, or 1 - sqrt(progress))."""
    start = decay_start(warmup, total, decay_fraction)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "wsd":
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, total - start))
            drop = math.sqrt(progress) if decay_shape == "1-sqrt" else progress
            return 1.0 - (1 - min_ratio) * drop
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(params, o) -> torch.optim.Optimizer:
    """AdamW of the recipe's `optim` section."""
    # a plain AdamW: DeepSpeed's own CPU Adam JIT-compiles for minutes. fused: one pass over
    # the states instead of ~10 (measured ~10x faster than the default per-tensor loop on CPU)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=True)


def make_scheduler(optimizer, o, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup, total_steps, o.min_lr_ratio, o.schedule,
                                                                  o.decay_fraction, o.decay_shape))


def apply_recipe_optim(optimizer, scheduler, o) -> list[str]:
    """After loading a checkpoint: the recipe's `optim.lr`, `betas`, `eps` and `weight_decay`
    replace the ones the optimizer and the schedule were saved with (a resume with
    `--set optim.lr=...`, e.g. after a divergence, must train with it), and the current rate
    follows the recipe's schedule (its shape, e.g. `train.steps`, already does). Returns 'optim.KEY: saved -> now' for each that differs;
    nothing is touched where none does (an unchanged resume stays exact bit for bit)."""
    changed = []
    groups = optimizer.param_groups
    for key, want in (("betas", tuple(o.betas)), ("eps", o.eps), ("weight_decay", o.weight_decay)):
        have = groups[0][key]
        if (tuple(have) if key == "betas" else have) != want:
            changed.append(f"optim.{key}: {have} -> {want}")
            for g in groups:
                g[key] = want
    if any(base != o.lr for base in scheduler.base_lrs):
        changed.append(f"optim.lr: {scheduler.base_lrs[0]:g} -> {o.lr:g}")
        scheduler.base_lrs = [o.lr] * len(groups)
    # this step's rate from the recipe's peak and schedule (train.steps, warmup, schedule may
    # have changed too), computed as the scheduler itself does: the saved rate when nothing did
    saved = groups[0]["lr"]
    for g, base, f in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]
    if groups[0]["lr"] != saved and not any(c.startswith("optim.lr:") for c in changed):
        changed.append(f"lr at step {scheduler.last_epoch}: {saved:g} -> {groups[0]['lr']:g} (the recipe's schedule)")
    return changed


def say_recipe_optim(changed: list[str]) -> None:
    if changed:
        print(f"vidscale: the recipe's optimizer settings replace the checkpoint's (saved -> now): "
              f"{'; '.join(changed)}", flush=True)


class TorchEngine:
    """One process, plain torch: AdamW, warmup + cosine, clipping, an EMA of the weights."""
    kind = "torch"
    loss_scale = 1.0
    gathers_params = False

    def __init__(self, model: torch.nn.Module, optim, total_steps: int):
        self.module = self.model = model
        self.optim = optim
        self.grad_clip = optim.grad_clip
        self.optimizer = make_optimizer(model.parameters(), optim)
        self.scheduler = make_scheduler(self.optimizer, optim, total_steps)
        self.ema_decay = optim.ema_decay
        self.ema = {n: p.detach().clone() for n, p in model.named_parameters()} if self.ema_decay > 0 else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                names = list(self.ema)  # one multi-tensor op, not a Python loop of small ones
                params = dict(self.module.named_parameters())
                torch._foreach_lerp_([self.ema[n] for n in names], [params[n].detach() for n in names],
                                     1 - self.ema_decay)
        return grad_norm.detach()

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_files(self, tmp: Path, snapshot: bool) -> dict:
        copy = host_copy if snapshot else (lambda tree: tree)
        files = {"model.safetensors": ("safetensors", copy(self.module.state_dict()))}
        if self.ema is not None:
            files["ema.safetensors"] = ("safetensors", copy(self.ema))
        files["optimizer.pt"] = ("torch", copy(self.optimizer.state_dict()))
        sch = self.scheduler.state_dict()
        sch.pop("lr_lambdas", None)  # functions: rebuilt from the recipe
        files["scheduler.json"] = ("json", sch)
        return files

    def flush_files(self, tmp: Path) -> None:
        pass  # every file went through the checkpoint writer

    def load_checkpoint(self, path: Path, saved_layout: dict) -> None:
        from safetensors.torch import load_file
        dev = next(self.module.parameters()).device
        self.module.load_state_dict(load_file(str(path / "model.safetensors"), device=str(dev)))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dev, weights_only=True))
        sch = json.loads((path / "scheduler.json").read_text())
        sch["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sch)
        say_recipe_optim(apply_recipe_optim(self.optimizer, self.scheduler, self.optim))
        if self.ema is not None:
            if not (path / "ema.safetensors").exists():
                raise ValueError(f"{path}: saved without EMA (optim.ema_decay=0); resume with optim.ema_decay=0")
            ema = load_file(str(path / "ema.safetensors"), device=str(dev))
            with torch.no_grad():
                for k, v in self.ema.items():
                    v.copy_(ema[k])

    # -- weights -------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def full_ema(self) -> dict[str, torch.Tensor]:
        return dict(self.ema) if self.ema is not None else {}

    @contextlib.contextmanager
    def ema_weights(self):
        with swapped_data(self.model, self.ema):
            yield


@contextlib.contextmanager
def swapped_data(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None):
    """Parameters whose `.data` is `tensors[name]` inside (cast to the parameter's dtype), the
    original storage put back on exit: no copy of the trained weights is made or rounded."""
    if not tensors:
        yield
        return
    params = dict(model.named_parameters())
    saved = {n: params[n].data for n in tensors}
    try:
        for n, t in tensors.items():
            params[n].data = t.to(saved[n].device, saved[n].dtype)
        yield
    finally:
        for n, t in saved.items():
            params[n].data = t
