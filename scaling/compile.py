"""`model.compile`: torch.compile the token-wise parts of every block.

What is compiled: each block's MLP (fc1 -> GELU -> fc2) and its attention's projection
(fused QKV -> QK-RMSNorm -> RoPE). Their shapes depend only on the packed length, which is
fixed by the token budget, so each compiles once. What is not: everything that loops over
the videos of a batch (per-video modulation, the packed attention kernels, cross-attention),
whose Python structure changes with every batch and would recompile each step, and the
sequence-parallel all-to-alls. This keeps compile compatible with sequence parallelism
(the kernel stays outside) and with ZeRO-3 (DeepSpeed's parameter-gather hooks run on the
module calls, which dynamo leaves to eager as DeepSpeed marks them compiler-disabled).
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention import SelfAttention
from models.dit import Mlp


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile in place; parameter names (and checkpoints) are unchanged."""
    for m in model.modules():
        if isinstance(m, Mlp):
            m.compile(dynamic=False)
        elif isinstance(m, SelfAttention):
            m.project = torch.compile(m.project, dynamic=False)
    return model
