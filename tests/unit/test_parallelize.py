"""parallelize() applies the same steps on every engine: activation checkpointing on the plain
single-process engine recomputes each block and leaves the gradients as they were; a model
that cannot take a step fails with one line."""
import pytest
import torch

from vidscale.data.synthetic import synthetic_video
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack
from vidscale.models.vae import VideoVAE
from vidscale.scaling.config import load_config, model_config
from vidscale.scaling.objective import build_objective, diffusion_inputs, step_generator
from vidscale.scaling.parallel.dims import ParallelDims
from vidscale.scaling.parallel.parallelize import build_model, parallelize
from vidscale.scaling.train.tasks import vae_config

from conftest import ROOT


def _grads(ac: bool):
    cfg = load_config(ROOT / "recipes/debug.yaml", [f"model.activation_checkpointing={str(ac).lower()}",
                                                    "parallel.zero_stage=0"])
    dims = ParallelDims(world=1, rank=0)
    model = parallelize(build_model(lambda: VideoDiT(model_config(cfg.model)), torch.device("cpu"), 0), dims,
                        cfg.model)
    with torch.no_grad():  # adaLN-Zero starts at zero output: give every block a real one
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    calls = []
    model.blocks[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    vids = [synthetic_video(i, 0, 4, [1, 4], [[8, 8]], [4, 8], 384, [1, 2, 2]) for i in range(2)]
    tokens, meta = pack([v[0] for v in vids], [v[1] for v in vids], (1, 2, 2))
    obj = build_objective(cfg.objective)
    t, noise = diffusion_inputs(obj, tokens, meta, step_generator(0, 0, 0, 0))
    terms = obj.loss_terms(lambda x, tm: model(x, tm, meta), tokens, t, noise, meta.seg_ids)
    (terms * meta.real_mask()).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


def test_activation_checkpointing_on_the_plain_engine_recomputes_with_equal_gradients():
    ref, calls_ref = _grads(False)
    got, calls = _grads(True)
    assert calls_ref == 1 and calls == 2  # the block ran again in backward
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=n)


def test_models_that_cannot_be_parallelized_fail_in_one_line():
    cfg = load_config(ROOT / "recipes/vae-debug.yaml", ["model.activation_checkpointing=true"])
    vae = VideoVAE(vae_config(cfg))
    with pytest.raises(ValueError, match="activation_checkpointing") as e:
        parallelize(vae, ParallelDims(world=1, rank=0), cfg.model)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="parallel.ulysses"):
        parallelize(VideoVAE(vae_config(cfg)), ParallelDims(world=2, rank=0, ulysses=2), cfg.model)
