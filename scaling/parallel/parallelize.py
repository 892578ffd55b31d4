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


def apply_ac(model: nn.Module, offload: bool) -> None:
    """Recompute each block in backward; optionally keep its saved inputs in CPU memory.

    fairscale wraps `forward` in place, so parameter names (and checkpoints) do not change.
    """
    from fairscale.nn.checkpoint import checkpoint_wrapper

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"model.activation_checkpointing=true: {type(model).__name__} has no list of blocks to "
                         "checkpoint; set model.activation_checkpointing=false")
    for i, blk in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(blk, offload_to_cpu=offload)


def parallelize(model: nn.Module, dims: ParallelDims, margs) -> nn.Module:
    """Steps 1 and 2 on a built model (`margs`: the recipe's `model` section)."""
    apply_sp(model, dims, margs.attn_backend)
    if margs.activation_checkpointing:
        apply_ac(model, margs.ac_offload)
    return model
