"""The `parallel` section."""
from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "gloo", "nccl")
"""`parallel.backend`: auto is nccl on GPU, gloo on CPU."""
GRAD_DTYPES = ("fp32", "bf16")
"""`parallel.grad_dtype`."""
ZERO_STAGES = (0, 1, 2, 3)
"""`parallel.zero_stage` (0 = plain torch, one process)."""


@dataclass
class ParallelArgs:
    ulysses: int = 1
    """Ulysses (all-to-all) sequence-parallel degree."""
    ring: int = 1
    """Ring-attention sequence-parallel degree (sp = ulysses * ring)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (0 = plain torch, no DeepSpeed)."""
    backend: str = "auto"
    """Collectives: auto (nccl on GPU, gloo on CPU), gloo or nccl."""
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: int = 5_000_000
    """ZeRO gradient reduce(-scatter) bucket, elements. Measured (`vidscale bench dp --buckets`,
    30M model, CPU gloo): dp=2/dp=1 step time 0.83 at 5M vs 1.11 at 50M (one bucket = the
    whole model = no overlap with backward) and 0.92 at 0.5M. Large GPU models: raise it."""
    prefetch_bucket_size: int = 5_000_000
    """ZeRO-3 parameter prefetch (all-gather ahead of use), elements; measured with the above."""
    max_live_parameters: int = 1_000_000_000
    """ZeRO-3 keeps gathered parameters that are used again within this many elements (its reuse
    distance), up to this many at once (DeepSpeed's default, 1e9, for both): a model under 1e9
    parameters stays gathered from forward to backward after the first step (measured, `bench plan`)."""
    overlap_comm: bool = True
    grad_dtype: str = "fp32"
    """bf16 on GPU: the dtype gradients are reduce-scattered and accumulated in (fp32 or bf16;
    DeepSpeed's own default is the model's bf16, which loses low bits of every gradient)."""
    persistence_threshold: int = 0
    """ZeRO-3 keeps parameters with fewer elements whole on every rank (DeepSpeed's default
    is 1e5, which leaves small models unsharded); 0 shards every parameter."""
    max_reuse_distance: int = 1_000_000_000
    """ZeRO-3 keeps a gathered parameter instead of releasing it when the step uses it again
    within this many elements of other parameters (DeepSpeed's `stage3_max_reuse_distance`,
    default 1e9), as it does one whose next use the prefetcher already looked past
    (`prefetch_bucket_size`). A model smaller than these windows is gathered once per step:
    its backward re-gathers nothing, and hpZ has nothing to save. 0, with
    prefetch_bucket_size=0, releases every parameter after use, as a model far larger than
    the windows does (what `vidscale bench hosts` measures on a small one)."""
    zero_hpz: int = 0
    """ZeRO++ hierarchical partitioning (hpZ; ZeRO-3 only): after the forward all-gather, each
    group of this many consecutive ranks keeps a secondary copy of the parameters partitioned
    among themselves, and the backward (and activation-recompute) gathers read it from there
    instead of from every rank. Set it to the ranks per node, so those gathers never leave
    the node; it costs a 1/zero_hpz share of the parameters per rank. Must divide the world
    size (parameters are partitioned over all dp x sp ranks). 0 or 1 = off."""
    timeout_s: int = 300
    """Collective timeout: a failing rank never leaves the others waiting longer."""
