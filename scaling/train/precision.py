"""The forward's precision: one autocast context for training, evaluation and sampling.

Under bf16 on GPU, DeepSpeed holds the weights in bf16; every forward (training steps, the
held-out loss, samples written during training, the VAE's PSNR) must then run under the
same autocast, or an fp32 input meets bf16 weights.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_for(dtype: str, device: torch.device):
    """The autocast context of `train.dtype` (bf16) on `device`, or a no-op context (fp32)."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
