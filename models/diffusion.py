"""Diffusion objectives and samplers over packed token sequences.

Both objectives work on token space ([L, P] patches), which is the latent space cut into
patches: the MSE over tokens equals the MSE over the latent. Timesteps are one per video;
`seg_ids` broadcasts them to tokens (padding tokens are masked out of every loss).

DDPM (Ho et al. 2020): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), epsilon
prediction, the simple loss of Algorithm 1, ancestral sampling of Algorithm 2 (on a
respaced subsequence of timesteps when fewer steps are asked for).
Rectified flow (Liu et al. 2022; Esser et al. 2024): x_t = (1 - t) x_0 + t eps, velocity
target eps - x_0, logit-normal t, Euler sampling from t = 1 to 0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [L,P], t_model [V]) -> [L,P]


def per_token(t_V: torch.Tensor, seg_ids_L: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-video value to tokens; padding tokens (id V) get the value 0."""
    return torch.cat([t_V, t_V.new_zeros(1)])[seg_ids_L]


def _keep_clean(x_t, x0, clean):
    return x_t if clean is None else torch.where(clean, x0, x_t)


def _masked_mse(pred, target, clean):
    err = (pred.float() - target.float()).pow(2)
    if clean is not None:  # conditioning values are inputs, not predictions
        err = err.masked_fill(clean, 0.0)
    return err.mean(-1)


SCHEDULES = ("linear", "cosine")
"""DDPM beta schedules (`objective.schedule`)."""


class DDPM:
    name = "ddpm"

    def __init__(self, num_steps: int = 1000, schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_steps = num_steps
        if schedule == "linear":
            # Nichol & Dhariwal 2021: the 1000-step endpoints scaled by 1000 / num_steps, so any
            # step count ends near pure noise (alpha_bar_T ~ 4e-5) as 1000 steps do (unscaled,
            # 100 steps stop at alpha_bar_T = 0.36 and the sampler's N(0, I) start is off-support)
            scale = 1000 / num_steps
            betas = torch.linspace(beta_start * scale, beta_end * scale, num_steps,
                                   dtype=torch.float64).clamp(max=0.999)
        elif schedule == "cosine":  # Nichol & Dhariwal 2021
            s = 0.008
            f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)],
                                 dtype=torch.float64)
        else:
            raise ValueError(f"objective.schedule: unknown schedule {schedule!r}, expected one of {list(SCHEDULES)}")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def sample_t(self, num_videos: int, generator: torch.Generator | None = None,
                 num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Uniform integer timesteps (`num_tokens`: the videos' lengths, which DDPM ignores)."""
        return torch.randint(0, self.num_steps, (num_videos,), generator=generator).double()

    def model_time(self, t_V: torch.Tensor) -> torch.Tensor:
        return t_V.float()

    def q_sample(self, x0, t_tok, noise):
        """Sample q(x_t | x_0) in closed form; t_tok holds each token's integer timestep."""
        # the table lives on the host; the index on the training device (a CUDA index into a
        # CPU table is an error): index a copy on the index's device
        abar = self.alphas_cumprod.to(t_tok.device)[t_tok.long()].to(x0.dtype)[:, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_step(self, x_prev, t: int, noise):
        """One step of the forward process q(x_t | x_{t-1}) (for tests of the closed form)."""
        b = float(self.betas[t])
        return math.sqrt(1 - b) * x_prev + math.sqrt(b) * noise

    def loss_terms(self, model_fn: ModelFn, x0_LP, t_V, noise_LP, seg_ids_L, clean_LP=None):
        """Per-token epsilon-prediction MSE (mean over the patch dim), shape [L].

        `clean_LP` (bool [L, P]): values given to the model clean (conditioning frames) and
        left out of the loss."""
        x_t = _keep_clean(self.q_sample(x0_LP, per_token(t_V, seg_ids_L), noise_LP), x0_LP, clean_LP)
        eps = model_fn(x_t, self.model_time(t_V))
        return _masked_mse(eps, noise_LP, clean_LP)

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise_LP, num_videos: int, steps: int | None = None,
               generator: torch.Generator | None = None, x_init=None, t_start: int | None = None,
               num_tokens: int | None = None):
        """Ancestral sampling (Algorithm 2) on a respaced schedule of `steps` timesteps.

        `x_init`/`t_start` start from a partly noised input (SDEdit) instead of pure noise.
        """
        steps = steps or self.num_steps
        last = self.num_steps - 1 if t_start is None else t_start
        n = min(steps, last + 1)
        # evenly spaced from `last` down to 0, both ends kept; one step is `last` alone (x_0 in
        # one jump), not t = 0, where linspace(0, last, 1) would put it
        ts = torch.linspace(0, last, n).round().long().unique().flip(0) if n > 1 else torch.tensor([last])
        abar = self.alphas_cumprod
        x = noise_LP if x_init is None else x_init
        for i, t in enumerate(ts.tolist()):
            t_prev = ts[i + 1].item() if i + 1 < len(ts) else -1
            a_t = abar[t].item()
            a_prev = abar[t_prev].item() if t_prev >= 0 else 1.0
            beta = 1 - a_t / a_prev  # respaced beta between t_prev and t
            t_V = torch.full((num_videos,), float(t), device=x.device)
            eps = model_fn(x, t_V).to(x.dtype)
            mean = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta)
            if t_prev >= 0:
                var = beta * (1 - a_prev) / (1 - a_t)  # posterior variance beta-tilde
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                x = mean + math.sqrt(var) * z
            else:
                x = mean
        return x


def shift_time(t, s):
    """The resolution shift of a time in [0, 1] (s = 1: none; s > 1: noisier)."""
    return s * t / (1 + (s - 1) * t)


class RectifiedFlow:
    name = "flow"

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0,
                 shift_ref_tokens: int = 0):
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift
        self.shift_ref_tokens = shift_ref_tokens
        """> 0: the shift grows with each video's own length, shift x sqrt(tokens / shift_ref_tokens)
        (a longer or larger video needs more noise to hide the same content: SD3, Open-Sora)."""

    def shift_for(self, num_tokens):
        """The shift of a video of `num_tokens` patch tokens (a number or a tensor of them)."""
        if self.shift_ref_tokens <= 0:
            return self.shift
        return self.shift * (num_tokens / self.shift_ref_tokens) ** 0.5

    def sample_t(self, num_videos: int, generator: torch.Generator | None = None,
                 num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logit-normal times, each shifted by its video's own rule (`num_tokens`: [V] lengths;
        needed when the shift depends on length)."""
        u = torch.randn(num_videos, generator=generator, dtype=torch.float64)
        t = torch.sigmoid(self.logit_mean + self.logit_std * u)
        if self.shift_ref_tokens > 0:
            if num_tokens is None:
                raise ValueError("objective.shift=auto: the timesteps need each video's token count")
            return shift_time(t, self.shift_for(torch.as_tensor(num_tokens, dtype=torch.float64)))
        return shift_time(t, self.shift)

    def model_time(self, t_V: torch.Tensor) -> torch.Tensor:
        return (t_V * 1000).float()

    def q_sample(self, x0, t_tok, noise):
        t = t_tok.to(x0.dtype)[:, None]
        return (1 - t) * x0 + t * noise

    def loss_terms(self, model_fn: ModelFn, x0_LP, t_V, noise_LP, seg_ids_L, clean_LP=None):
        x_t = _keep_clean(self.q_sample(x0_LP, per_token(t_V, seg_ids_L), noise_LP), x0_LP, clean_LP)
        v = model_fn(x_t, self.model_time(t_V))
        return _masked_mse(v, noise_LP - x0_LP, clean_LP)

    def schedule(self, steps: int, num_tokens: int, t_start: float | None = None) -> torch.Tensor:
        """The sampler's steps + 1 times from t_start (default 1) to 0, spaced evenly before the
        shift training used for this size, so sampling spends its steps where training did."""
        s = float(self.shift_for(num_tokens))
        u0 = 1.0 if t_start is None else float(t_start) / (s - (s - 1) * float(t_start))  # shift_time^-1
        return shift_time(torch.linspace(u0, 0.0, steps + 1, dtype=torch.float64), s)

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise_LP, num_videos: int, steps: int | None = None,
               generator: torch.Generator | None = None, x_init=None, t_start: float | None = None,
               num_tokens: int | None = None):
        steps = steps or 50
        ts = self.schedule(steps, num_tokens if num_tokens is not None else noise_LP.shape[0], t_start)
        x = noise_LP if x_init is None else x_init
        for i in range(steps):
            t_V = torch.full((num_videos,), float(ts[i]), dtype=torch.float64, device=x.device)
            v = model_fn(x, self.model_time(t_V)).to(x.dtype)
            x = x + float(ts[i + 1] - ts[i]) * v
        return x


OBJECTIVES = {"ddpm": DDPM, "flow": RectifiedFlow}
"""Training objectives by name (`objective.name`)."""


def make_objective(name: str, **kw):
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown objective {name!r}, expected one of {list(OBJECTIVES)}")
    return OBJECTIVES[name](**kw)
