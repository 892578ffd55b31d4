"""Sequence parallelism on gloo: Ulysses, ring and USP (2x2) equal the single-process model.

One spawn of 4 CPU processes tests the three layouts in turn (sp=2 layouts run as two
data-parallel copies). Each rank writes what it measured to a JSON file; the test judges
the files, not the exit codes.
"""
import json
import os

import pytest
import torch

from vidscale.cluster.local import spawn_ranks

from conftest import dit_config  # noqa: E402

pytestmark = pytest.mark.dist
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (ulysses, ring)


def _model_and_batch():
    from vidscale.models.dit import VideoDiT
    from vidscale.models.packed import pack

    cfg = dit_config(hidden=48, depth=2, heads=4, in_channels=3, patch=(1, 2, 2), text_dim=32)
    torch.manual_seed(0)
    m = VideoDiT(cfg)
    m.init_weights()
    with torch.no_grad():  # randomise the zero-initialised parts so every path carries gradient
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    # 30 + 24 + 16 real tokens, packed to 96: videos straddle slice boundaries and the
    # last quarter is all padding, so real-token counts per rank are uneven
    lats = [torch.randn(3, 5, 4, 6, generator=g), torch.randn(3, 4, 4, 6, generator=g),
            torch.randn(3, 1, 8, 8, generator=g)]
    texts = [torch.randn(5, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(7, 32, generator=g)]
    x, meta = pack(lats, texts, cfg.patch, pad_to=96)
    t = torch.tensor([10.0, 500.0, 900.0])
    w = torch.randn(x.shape, generator=g)
    return m, x, t, meta, w


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from vidscale.models.attention import sdpa_loop
    from vidscale.scaling.parallel.dims import ParallelDims
    from vidscale.scaling.parallel.sequence import build_sp_attention

    dist.init_process_group("gloo", rank=rank, world_size=world)
    m, x, t, meta, w = _model_and_batch()
    L = meta.seq_len
    out_ref = m(x, t, meta)
    ((out_ref * w).sum() / L).backward()
    grads_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    res = {}
    for u, r in LAYOUTS:
        dims = ParallelDims(world=world, rank=rank, ulysses=u, ring=r)
        dims.init("gloo")
        m.set_attention(build_sp_attention(dims, sdpa_loop))
        m.zero_grad(set_to_none=True)
        n = L // dims.sp
        sl = slice(dims.sp_rank * n, (dims.sp_rank + 1) * n)
        mr = meta.shard(dims.sp_rank, dims.sp)
        out = m(x[sl], t, mr)
        ((out * w[sl]).sum() / L).backward()
        grad_diff = 0.0
        for name, p in m.named_parameters():
            # each rank holds its slice's part (none for a rank whose slice never uses p)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=dims.group("sp"))
            grad_diff = max(grad_diff, (grad - grads_ref[name]).abs().max().item())
        res[f"{u}x{r}"] = {"out_diff": (out - out_ref[sl]).abs().max().item(), "grad_diff": grad_diff,
                           "real": int(mr.real_mask().sum()),
                           "grad_scale": max(g.abs().max().item() for g in grads_ref.values())}
        m.set_attention(sdpa_loop)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def test_ulysses_ring_usp_equal_single_process(tmp_path):
    world = 4
    codes = spawn_ranks(_worker, world, (str(tmp_path),))
    files = [tmp_path / f"rank{r}.json" for r in range(world)]
    assert all(f.exists() for f in files), f"ranks exited with {codes} before writing results"
    res = [json.loads(f.read_text()) for f in files]
    for u, r in LAYOUTS:
        key = f"{u}x{r}"
        print(f"sp parity {key}: outputs {max(res[k][key]['out_diff'] for k in range(world)):.2e}, "
              f"gradients {max(res[k][key]['grad_diff'] for k in range(world)):.2e}")
        for rank in range(world):
            # 10x the figures README.md states (measured: outputs 2.4e-7, gradients 1.2e-7)
            assert res[rank][key]["out_diff"] <= 2.4e-6, (key, rank, res[rank][key])
            assert res[rank][key]["grad_diff"] <= 1.2e-6, (key, rank, res[rank][key])
            assert res[rank][key]["grad_scale"] > 1e-3  # gradients are not trivially zero
        reals = [res[rank][key]["real"] for rank in range(u * r)]
        assert len(set(reals)) > 1, (key, reals)  # uneven real tokens across sp ranks
