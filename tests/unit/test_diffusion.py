"""Objectives: DDPM's closed form, and a tiny model overfits a fixed batch under each objective."""
import pytest
import torch

from vidscale.models.diffusion import DDPM, RectifiedFlow
from vidscale.models.dit import VideoDiT
from vidscale.models.packed import pack

from conftest import dit_config  # noqa: E402


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_closed_form_matches_forward_process(schedule):
    d = DDPM(num_steps=1000, schedule=schedule)
    g = torch.Generator().manual_seed(0)
    n, t = 20000, 300
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    x = x0.clone()
    for s in range(t + 1):  # t+1 forward steps reach x_t (steps are 0-indexed)
        x = d.q_step(x, s, torch.randn(x.shape, generator=g, dtype=torch.float64))
    direct = d.q_sample(x0, torch.full((n,), t), torch.randn(x.shape, generator=g, dtype=torch.float64))
    abar = d.alphas_cumprod[t].item()
    for sample in (x, direct):
        assert abs(sample.mean().item() - abar ** 0.5 * 1.5) < 0.02
        assert abs(sample.var().item() - (1 - abar)) < 0.03
    assert abs(x.mean() - direct.mean()) < 0.03 and abs(x.var() - direct.var()) < 0.04


def test_flow_interpolates_between_data_and_noise():
    f = RectifiedFlow()
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(f.q_sample(x0, torch.zeros(5), eps), x0)
    assert torch.allclose(f.q_sample(x0, torch.ones(5), eps), eps)
    t = f.sample_t(10000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.02


@pytest.mark.parametrize("objective", [DDPM(), RectifiedFlow()], ids=["ddpm", "flow"])
def test_tiny_model_overfits_fixed_batch(objective):
    torch.manual_seed(0)
    cfg = dit_config(hidden=64, depth=2, heads=4, in_channels=2, text_dim=8)
    m = VideoDiT(cfg)
    m.init_weights()
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 1, 6, 4, generator=g)]
    x0, meta = pack(lats, [torch.randn(3, 8, generator=g), torch.randn(2, 8, generator=g)], cfg.patch)
    t = objective.sample_t(2, g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = objective.loss_terms(lambda x, tt: m(x, tt, meta), x0, t, noise, meta.seg_ids).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_samplers_return_the_data_when_the_model_is_exact():
    """With the exact denoiser of a single point x*, both samplers land on x*."""
    x_star = torch.randn(6, 4, dtype=torch.float64)
    seg = torch.zeros(6, dtype=torch.long)
    ddpm = DDPM()

    def eps_fn(x, t):
        abar = ddpm.alphas_cumprod[t.long()][0]
        return (x - abar.sqrt() * x_star) / (1 - abar).sqrt()

    noise = torch.randn(6, 4, dtype=torch.float64)
    out = ddpm.sample(eps_fn, noise, 1, steps=50, generator=torch.Generator().manual_seed(0))
    assert (out - x_star).abs().max() < 1e-3
    flow = RectifiedFlow()

    def v_fn(x, t):
        tt = t[0].double() / 1000
        return (x - x_star) / tt if tt > 0 else noise - x_star

    out = flow.sample(v_fn, noise, 1, steps=20)
    assert (out - x_star).abs().max() < 1e-6
    del seg
