"""The `plan` section (the hardware a recipe was planned for)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlanArgs:
    """The hardware a recipe was planned for, and the planner's assumptions (`vidscale plan`,
    scaling/train/planner.py). A test plans every shipped recipe on its own `gpus` x `gpu_memory_gb`."""
    gpus: int = 0
    """GPUs the recipe was planned for (0 = not planned)."""
    gpu_memory_gb: float = 0.0
    """Memory of each of those GPUs, GiB."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak of one GPU, TFLOP/s (989: H100 SXM; `--gpu-tflops` overrides)."""
    mfu: float = 0.4
    """Model FLOPs utilisation the step time assumes (calibrate with `vidscale bench plan`)."""
    bandwidth_gb_s: float = 100.0
    """Bytes per second one rank moves in collectives, GB/s (NVLink ~150-400, InfiniBand ~25-50)."""
    host_bandwidth_gb_s: float = 25.0
    """Host <-> GPU copy rate under offload, GB/s (PCIe 4 x16 ~25)."""
    runtime_gb: float = 2.0
    """CUDA context, allocator fragmentation and kernels' scratch, GiB per rank."""
