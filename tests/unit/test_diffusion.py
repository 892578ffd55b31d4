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


@pytest.mark.parametrize("t_start", [None, 400])
def test_ddpm_one_step_starts_from_the_last_timestep(t_start):
    """A one-step DDPM sample (or an SDEdit whose steps x strength rounds to 1) evaluates the
    model once, at the starting timestep, and with the exact denoiser lands on the data."""
    x_star = torch.randn(6, 4, dtype=torch.float64)
    ddpm, seen = DDPM(num_steps=100 if t_start is None else 1000), []

    def eps_fn(x, t):
        seen.append(int(t[0]))
        abar = ddpm.alphas_cumprod[t.long()][0]
        return (x - abar.sqrt() * x_star) / (1 - abar).sqrt()

    start = ddpm.num_steps - 1 if t_start is None else t_start
    noise = torch.randn(6, 4, dtype=torch.float64)
    x = noise if t_start is None else ddpm.q_sample(x_star, torch.full((6,), t_start), noise)
    out = ddpm.sample(eps_fn, noise, 1, steps=1, x_init=x, t_start=t_start)
    assert seen == [start]
    torch.testing.assert_close(out, x_star)


# -- resolution-aware timestep shift ------------------------------------------------------------------
def test_auto_shift_is_each_videos_own_rule_in_a_packed_batch():
    """objective.shift=auto: in one packed batch of three sizes, every video's timestep is the
    unshifted draw moved by its own shift sqrt(tokens / ref), whatever else is packed with it."""
    from vidscale.models.diffusion import shift_time
    from vidscale.scaling.config import load_config
    from vidscale.scaling.objective import build_objective, diffusion_inputs, step_generator, video_tokens
    cfg = load_config("recipes/debug.yaml", ["objective.shift=auto", "objective.shift_ref_tokens=16"])
    obj = build_objective(cfg.objective)
    lat = [torch.randn(4, 2, 8, 8), torch.randn(4, 4, 16, 16), torch.randn(4, 1, 4, 4)]
    tokens, meta = pack(lat, [torch.randn(3, 8)] * 3, (1, 2, 2), multiple=4)
    n = video_tokens(meta)
    assert n.tolist() == [32, 256, 4]
    t, _ = diffusion_inputs(obj, tokens, meta, step_generator(0, 5, 0, 0))
    o = cfg.objective
    plain = RectifiedFlow(o.logit_mean, o.logit_std).sample_t(3, step_generator(0, 5, 0, 0))  # the same draw, unshifted
    for v, s in enumerate([2 ** 0.5, 4.0, 0.5]):  # sqrt(32/16), sqrt(256/16), sqrt(4/16)
        assert t[v].item() == pytest.approx(shift_time(plain[v].item(), s), abs=1e-12)
    # alone in a batch, a video gets the same timestep shift as when packed with others
    tokens1, meta1 = pack(lat[1:2], [torch.randn(3, 8)], (1, 2, 2))
    assert obj.shift_for(video_tokens(meta1))[0].item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="token count"):
        obj.sample_t(3, step_generator(0, 5, 0, 0))


def test_auto_shift_keys_on_the_whole_video_under_token_dropping():
    """With data.drop_tokens a video keeps a random subset of its patches; its shift still keys
    on the whole video's T' x H' x W' tokens, the length the sampler uses for that size."""
    from vidscale.data.packing import pack_dropped
    from vidscale.scaling.config import load_config
    from vidscale.scaling.objective import build_objective, diffusion_inputs, step_generator
    cfg = load_config("recipes/debug.yaml", ["objective.shift=auto", "objective.shift_ref_tokens=16"])
    obj = build_objective(cfg.objective)
    lat, texts = [torch.randn(4, 2, 8, 8), torch.randn(4, 4, 16, 16)], [torch.randn(3, 8)] * 2
    full, full_meta = pack(lat, texts, (1, 2, 2))
    kept, meta = pack_dropped(lat, texts, (1, 2, 2), keep=[20, 100], gen=torch.Generator().manual_seed(0))
    assert meta.bounds == (0, 20, 120)
    t_full, _ = diffusion_inputs(obj, full, full_meta, step_generator(0, 5, 0, 0))
    t_kept, _ = diffusion_inputs(obj, kept, meta, step_generator(0, 5, 0, 0))
    assert torch.equal(t_kept, t_full)  # the times of the undropped videos, shifts 2 and 4


def test_sampling_with_auto_shift_follows_the_training_rule():
    """The sampler's times for a requested size are an even grid moved by that size's shift,
    the same rule training used; a fixed shift is applied the same way; SDEdit starts exactly
    at its noise level."""
    from vidscale.models.diffusion import shift_time
    seen = []

    def v_fn(x, t_model):
        seen.append(t_model[0].item() / 1000)
        return torch.zeros_like(x)

    flow = RectifiedFlow(shift_ref_tokens=16)
    noise = torch.randn(64, 4)  # 64 tokens: shift sqrt(64/16) = 2
    flow.sample(v_fn, noise, 1, steps=4, num_tokens=64)
    grid = [1.0, 0.75, 0.5, 0.25]
    assert seen == pytest.approx([shift_time(u, 2.0) for u in grid], abs=1e-6)
    assert flow.shift_for(64) == pytest.approx(2.0)
    seen.clear()
    RectifiedFlow(shift=3.0).sample(v_fn, noise, 1, steps=4)
    assert seen == pytest.approx([shift_time(u, 3.0) for u in grid], abs=1e-6)
    seen.clear()
    flow.sample(v_fn, noise, 1, steps=4, num_tokens=64, t_start=0.6, x_init=noise)
    assert seen[0] == pytest.approx(0.6, abs=1e-6) and seen == sorted(seen, reverse=True)


@pytest.mark.parametrize("value, ok", [("auto", True), ("3", True), ("0", False), ("fast", False)])
def test_shift_key_takes_a_number_or_auto(value, ok):
    from vidscale.scaling.config import load_config
    if ok:
        load_config("recipes/debug.yaml", [f"objective.shift={value}"])
    else:
        with pytest.raises(ValueError) as e:
            load_config("recipes/debug.yaml", [f"objective.shift={value}"])
        assert "objective.shift" in str(e.value) and "'auto'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("num_steps", [20, 50, 100, 250, 1000])
def test_ddpm_linear_schedule_ends_in_noise_at_any_step_count(num_steps):
    """The linear betas are rescaled by 1000 / num_steps (Nichol & Dhariwal): the last timestep is
    pure noise whatever the count, and 1000 steps keep Ho et al.'s 1e-4..0.02 exactly."""
    d = DDPM(num_steps=num_steps)
    assert d.alphas_cumprod[-1].item() < 1e-4, d.alphas_cumprod[-1].item()
    assert d.betas.max().item() < 1
    if num_steps == 1000:
        assert torch.equal(d.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        assert d.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=1e-2)
