"""Every collective vidscale issues, in one place.

A process group only has a backend for some devices: gloo reduces CPU tensors, nccl only
CUDA tensors. Callers hand in numbers, flags, paths or tensors wherever they live; these
functions move them to the group's device, communicate, and hand back host values (or
tensors on the caller's device). So a CPU-only test runs the exact code a GPU run runs,
and nothing here fails on nccl because a caller kept a counter on the CPU.

On one process (or without an initialised process group) every function is the identity.
Nothing else in the project calls `torch.distributed` collectives (tests/unit/test_layout.py).
"""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def device(group=None) -> torch.device:
    """The device the group's backend communicates on: the current CUDA device for nccl,
    the CPU for gloo (and for a mixed "cpu:gloo,cuda:nccl" group)."""
    if not initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _on(t: torch.Tensor, group) -> torch.Tensor:
    return t.to(device(group))


# -- numbers and flags (read on the host: a sync; call at logging / save steps) ---------------
def _reduce(x: float | int | torch.Tensor, op, group) -> float:
    t = torch.as_tensor(x, dtype=torch.float64).detach().reshape(1)
    if not initialized():
        return float(t)
    t = _on(t.clone(), group)
    dist.all_reduce(t, op=op, group=group)
    return float(t.cpu())


def sum_(x: float | int | torch.Tensor, group=None) -> float:
    """Sum of a per-rank number over the group, in float64."""
    return _reduce(x, dist.ReduceOp.SUM, group)


def max_(x: float | int | torch.Tensor, group=None) -> float:
    return _reduce(x, dist.ReduceOp.MAX, group)


def min_(x: float | int | torch.Tensor, group=None) -> float:
    return _reduce(x, dist.ReduceOp.MIN, group)


def agree(flag: bool, group=None) -> bool:
    """True on every rank if it is True on any rank (one tiny MAX all-reduce)."""
    return max_(1 if flag else 0, group) > 0


def sum_tensor(t: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise sum of a tensor over the group, returned on t's device (t is untouched)."""
    if not initialized():
        return t.clone()
    out = _on(t.detach().clone(), group)
    dist.all_reduce(out, group=group)
    return out.to(t.device)


def barrier(group=None) -> None:
    if initialized():
        # a barrier is an all-reduce on the group's device: no CUDA-device guess by the backend
        t = torch.zeros(1, device=device(group))
        dist.all_reduce(t, group=group)


# -- objects without pickle: JSON (and bytes) broadcast from a source rank ---------------------
def broadcast_bytes(raw: bytes | None, src: int = 0, group=None) -> bytes:
    """`raw` of rank `src` on every rank (other ranks pass anything, e.g. None)."""
    if not initialized():
        return raw or b""
    dev = device(group)
    n = torch.tensor([len(raw) if raw is not None else 0], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=src, group=group)
    size = int(n.item())
    buf = torch.zeros(size, dtype=torch.uint8, device=dev)
    if dist.get_rank() == src and size:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev))
    if size:
        dist.broadcast(buf, src=src, group=group)
    return bytes(buf.cpu().tolist())


def broadcast_json(obj: Any, src: int = 0, group=None) -> Any:
    """A JSON-able object of rank `src` on every rank (JSON, never pickle)."""
    if not initialized():
        return obj
    raw = json.dumps(obj).encode() if dist.get_rank() == src else None
    return json.loads(broadcast_bytes(raw, src, group).decode())


def gather_json(obj: Any, group=None) -> list:
    """Every rank's JSON-able object, in rank order, on every rank."""
    if not initialized():
        return [obj]
    n = world_size(group)
    raw = json.dumps(obj).encode()
    dev = device(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([len(raw)], dtype=torch.int64, device=dev), group=group)
    width = max(int(s.item()) for s in sizes)
    mine = torch.zeros(width, dtype=torch.uint8, device=dev)
    mine[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev)
    parts = [torch.empty(width, dtype=torch.uint8, device=dev) for _ in range(n)]
    dist.all_gather(parts, mine, group=group)
    return [json.loads(bytes(p[:int(s.item())].cpu().tolist()).decode()) for p, s in zip(parts, sizes)]


# -- tensors (already on the device the backend needs: the training path) --------------------
def all_gather_cat(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation of every rank's equally shaped tensor along dim 0, on t's device."""
    if not initialized():
        return t
    src = _on(t.contiguous(), group)
    parts = [torch.empty_like(src) for _ in range(world_size(group))]
    dist.all_gather(parts, src, group=group)
    return torch.cat(parts).to(t.device)


def all_to_all_single(recv: torch.Tensor, send: torch.Tensor, group=None) -> None:
    """Sequence parallelism's all-to-all (activations live on the training device)."""
    dist.all_to_all_single(recv, send, group=group)


def exchange(send: torch.Tensor, to_rank: int, from_rank: int, group, tag: int = 0):
    """Start sending `send` to `to_rank` while receiving a like tensor from `from_rank`;
    returns (requests, recv). Finish with `wait(requests)` (ring attention's shift)."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, to_rank, group, tag), dist.P2POp(dist.irecv, recv, from_rank, group, tag)]
    return dist.batch_isend_irecv(ops), recv


def wait(reqs) -> None:
    for r in reqs:
        r.wait()
