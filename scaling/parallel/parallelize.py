"""Apply parallelism to a plain model, in a fixed order, for every engine.

    model = build_model(make_model, device, seed)     # or built partitioned by ZeRO-3 (train/zero.py)
    parallelize(model, dims, cfg.model)               # 1. sequence-parallel kernel, 2. activation checkpointing
    ... the engine wraps it (DeepSpeed hooks, optimizer) ...
    apply_compile(model)                              # 3. last: after the engine's hooks are in place

The model never looks anything up: it is handed its packed attention kernel
(`set_attention`). A model without one (the VAE) cannot be sequence-parallel; one without
a `blocks` list cannot be checkpointed per block: both are one-line errors.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from vidscale.models.attention import get_kernel
from vidscale.scaling.parallel.compile import apply_compile  # noqa: F401  (step 3, re-exported)
from vidscale.scaling.parallel.dims import ParallelDims
from vidscale.scaling.parallel.sequence import build_sp_attention


def build_model(make_model, device: torch.device, seed: int) -> nn.Module:
    """Construct on the meta device, materialise on `device`, then `init_weights()`
    (which touches every parameter and buffer) under the recipe's seed."""
    with torch.device("meta"):
        model = make_model()
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def apply_sp(model: nn.Module, dims: ParallelDims, attn_backend: str) -> None:
    """Hand the model the packed attention kernel of this rank's layout (the local kernel
    when sp = 1; Ulysses / ring / USP around it otherwise)."""
    if not hasattr(model, "set_attention"):
        if dims.sp > 1:
            raise ValueError(f"parallel.ulysses x parallel.ring = {dims.sp}: {type(model).__name__} has no "
                             "sequence-parallel attention; use parallel.ulysses=1 parallel.ring=1")
        return
    model.set_attention(build_sp_attention(dims, get_kernel(attn_backend)))


def checkpointed(forward, offload: bool):
    """`forward` recomputed in backward (non-reentrant `torch.utils.checkpoint`).

    The recompute runs under the autocast state the forward ran under (bf16 stays bf16;
    fairscale's wrapper recomputed under `torch.cuda.amp.autocast`, i.e. fp16 on GPU and no
    autocast on CPU: gradients of another computation than the forward's). `offload` keeps the
    saved block inputs in host memory (`torch.autograd.graph.save_on_cpu`)."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and sampling: nothing to save
            return forward(*args, **kwargs)
        save = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload
                else contextlib.nullcontext())
        with save:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_ac(model: nn.Module, offload: bool) -> None:
    """Recompute each block in backward; optionally keep its saved inputs in CPU memory.

    `forward` is replaced on the block itself, so parameter names (and checkpoints) do not change.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"model.activation_checkpointing=true: {type(model).__name__} has no list of blocks to "
                         "checkpoint; set model.activation_checkpointing=false")
    for blk in blocks:
        blk.forward = checkpointed(blk.forward, offload)


def parallelize(model: nn.Module, dims: ParallelDims, margs) -> nn.Module:
    """Steps 1 and 2 on a built model (`margs`: the recipe's `model` section)."""
    apply_sp(model, dims, margs.attn_backend)
    if margs.activation_checkpointing:
        apply_ac(model, margs.ac_offload)
    return model
