"""`model.compile`: torch.compile the token-wise parts of every block.

What is compiled: each block's MLP (fc1 -> GELU -> fc2) and its attention's projection
(fused QKV -> QK-RMSNorm -> RoPE). Their shapes depend only on the packed length: the
first change of length recompiles them once with a dynamic length (dynamo's automatic
dynamic shapes), and grad/no-grad (validation) compiles once more. What is not: everything that loops over
the videos of a batch (per-video modulation, the packed attention kernels, cross-attention),
whose Python structure changes with every batch and would recompile each step, and the
sequence-parallel all-to-alls. This keeps compile compatible with sequence parallelism
(the kernel stays outside).

ZeRO-3 (measured): DeepSpeed's per-submodule gather/release hooks sit inside these regions;
dynamo traces into them and recompiles on every hook until its cache limit, then runs
eager (numerics unchanged, no gain, minutes of compiling). So under ZeRO-3 the model is
left eager with a warning. Making it pay needs the compiled modules registered as ZeRO-3
leaf modules (`deepspeed.utils.set_z3_leaf_modules`) before `deepspeed.initialize`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from vidscale.models.attention import SelfAttention
from vidscale.models.dit import Mlp


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile in place; parameter names (and checkpoints) are unchanged."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned by ZeRO-3
        warnings.warn("model.compile: left eager under ZeRO-3 (DeepSpeed's per-module hooks would "
                      "recompile every step); use parallel.zero_stage 0-2 to compile", stacklevel=2)
        return model
    for m in model.modules():
        if isinstance(m, Mlp):
            m.compile()
        elif isinstance(m, SelfAttention):
            m.project = torch.compile(m.project)
    return model
