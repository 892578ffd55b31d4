"""FLOPs model of VideoDiT on a packed batch, and the machine's measured matmul peak.

Counted: every matmul the model executes on the packed batch (padding tokens included,
since they are computed), attention quadratic in each video's own length, cross-attention
to each video's own text, and the per-video adaLN / timestep MLPs. A Linear of W weights
costs 2 W FLOPs per row. Training = 3 x forward (backward is twice the forward).
"""
from __future__ import annotations

import time

import torch

from vidscale.models.dit import DiTConfig


def forward_flops(cfg: DiTConfig, seg_lens: list[int], text_lens: list[int], num_videos: int | None = None,
                  split: bool = False):
    """Forward FLOPs for one packed batch.

    seg_lens: self-attention segment lengths (each video, then the padding segment if any);
    text_lens: text tokens of each video. Returns a total, or a dict by part when `split`.
    """
    D, P, Mh, depth = cfg.hidden, cfg.patch_dim, cfg.mlp_hidden, cfg.depth
    V = len(text_lens) if num_videos is None else num_videos
    L = sum(seg_lens)
    Lt = sum(text_lens)
    parts = {
        "embed": 2 * L * P * D + 2 * Lt * (cfg.text_dim * D + D * D) + 2 * V * (256 * D + D * D),
        "attention_proj": depth * 2 * L * (3 * D * D + D * D),
        "attention_core": depth * 4 * D * sum(l * l for l in seg_lens),
        "cross_attention": depth * (2 * L * 2 * D * D + 2 * Lt * 2 * D * D + 4 * D * sum(
            lv * lt for lv, lt in zip(seg_lens[:V], text_lens))),
        "mlp": depth * 2 * L * 2 * D * Mh,
        "adaLN": depth * 2 * (V + 1) * D * 6 * D + 2 * (V + 1) * D * 2 * D,
        "final": 2 * L * D * P,
    }
    return parts if split else sum(parts.values())


def batch_forward_flops(cfg: DiTConfig, meta, split: bool = False):
    segs = [e - s for s, e in meta.segments()]
    texts = [meta.text_bounds[i + 1] - meta.text_bounds[i] for i in range(meta.num_videos)]
    return forward_flops(cfg, segs, texts, meta.num_videos, split)


def train_flops(cfg: DiTConfig, meta) -> int:
    return 3 * batch_forward_flops(cfg, meta)


def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       n: int | None = None, seconds: float = 1.0) -> float:
    """Peak matmul FLOP/s of this machine and dtype: the best of repeated large GEMMs.

    CPU: n = 2048, timed one GEMM at a time. CUDA: n = 8192 (a 2048^3 GEMM on a large GPU
    measures launch latency), timed with CUDA events over batches of 20 GEMMs (no host sync
    between them)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    # operands from a private generator: the global RNG state, which checkpoints save, must not
    # depend on whether (and how often: PEAK_EVERY_S of wall clock) rank 0 measured
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    if cuda:
        torch.cuda.synchronize(device)
        best, t_end, reps = 0.0, time.perf_counter() + seconds, 20
        while True:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                a @ b
            stop.record()
            stop.synchronize()
            best = max(best, reps * 2 * n ** 3 / (start.elapsed_time(stop) / 1e3))
            if time.perf_counter() >= t_end:
                return best
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best
