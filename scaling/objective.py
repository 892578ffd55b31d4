"""What a diffusion training step draws, below both training and sampling.

The objective a recipe names, and the per-step inputs of a micro-batch: timesteps and
noise from a generator keyed by (seed, step, micro-batch, data-parallel rank), so the same
step draws the same numbers on any sequence-parallel layout and after any restart;
caption dropout for classifier-free guidance; the clean frames of image-to-video training
(leading, trailing or both ends). The training loop (scaling/train) and the sampler
(scaling/inference) both import this; neither imports the other's internals.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from vidscale.models.diffusion import make_objective
from vidscale.models.packed import PackedMeta, patchify


def step_generator(seed: int, step: int, micro: int, dp_rank: int) -> torch.Generator:
    """Same (step, micro, dp rank) -> same timesteps and noise, on any sp layout or restart."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 65_537 + dp_rank)


def build_objective(o):
    """The objective of a recipe's `objective` section (ObjectiveArgs)."""
    if o.name == "ddpm":
        return make_objective("ddpm", num_steps=o.num_steps, schedule=o.schedule)
    if o.shift == "auto":
        return make_objective("flow", logit_mean=o.logit_mean, logit_std=o.logit_std, shift=1.0,
                              shift_ref_tokens=o.shift_ref_tokens)
    return make_objective("flow", logit_mean=o.logit_mean, logit_std=o.logit_std, shift=float(o.shift))


def drop_captions(meta: PackedMeta, p: float, gen: torch.Generator) -> PackedMeta:
    """Classifier-free guidance training: empty the caption of each video with probability p."""
    if p <= 0:
        return meta
    keep = torch.rand(meta.num_videos, generator=gen) >= p
    pieces, bounds = [], [0]
    for i in range(meta.num_videos):
        s, e = meta.text_bounds[i], meta.text_bounds[i + 1]
        if keep[i]:
            pieces.append(meta.text[s:e])
        bounds.append(bounds[-1] + (e - s if keep[i] else 0))
    text = torch.cat(pieces) if pieces else meta.text[:0]
    return replace(meta, text=text, text_bounds=tuple(bounds))


def clean_frames_mask(meta: PackedMeta, max_frames: int, channels: int, patch, gen: torch.Generator,
                      mode: str = "first"):
    """Image-to-video training: [L, P] bool marking the latent frames of each video given clean
    and left out of the loss. Each video draws k in 0..max_frames; `mode` (objective.cond_mode)
    places them: 'first' the k leading frames, 'last' the k trailing ones, 'first_last' k at
    each end. At least one frame is always left to denoise. None when off. Drawn on the full
    batch, before any sequence-parallel slice; the draw does not depend on the mode. Under
    token dropping (data.drop_tokens) a video holds a subset of its patches: each kept token
    takes the row of its (t, y, x) coordinates in the whole video's mask."""
    if max_frames <= 0:
        return None
    assert meta.offset == 0 and meta.local_len == meta.seq_len, "draw on a full batch only"
    pt, ph, pw = patch
    mask = torch.zeros(meta.seq_len, channels * pt * ph * pw, dtype=torch.bool)
    ks = torch.randint(0, max_frames + 1, (meta.num_videos,), generator=gen)
    for i, (Tg, Hg, Wg) in enumerate(meta.grid):
        T = Tg * pt
        m = cond_frames_of(T, int(ks[i]), mode)
        if m.any():
            full = m[None, :, None, None].expand(channels, T, Hg * ph, Wg * pw).float()
            s, e = meta.bounds[i], meta.bounds[i + 1]
            c = meta.coords[s:e]  # (t, y, x) in patches; patchify's rows are t-major, then y, then x
            mask[s:e] = (patchify(full, patch) > 0.5)[(c[:, 0] * Hg + c[:, 1]) * Wg + c[:, 2]]
    return mask


def cond_frames_of(T: int, k: int, mode: str) -> torch.Tensor:
    """[T] bool: the clean latent frames of a T-frame video with k per end under `mode`
    (fewer when T is short: one frame always stays to denoise)."""
    m = torch.zeros(T, dtype=torch.bool)
    if mode == "first_last":
        k = min(k, (T - 1) // 2)
        if k > 0:
            m[:k] = m[T - k:] = True
        return m
    k = min(k, T - 1)
    if k > 0:
        if mode == "first":
            m[:k] = True
        elif mode == "last":
            m[T - k:] = True
        else:
            raise ValueError(f"objective.cond_mode = {mode!r}: expected first, last or first_last")
    return m


def video_tokens(meta: PackedMeta) -> torch.Tensor:
    """[V] patch tokens of each whole video, T' x H' x W' (before any token dropping: the
    length `shift=auto` keys on is the one the sampler sees)."""
    return torch.tensor([Tg * Hg * Wg for Tg, Hg, Wg in meta.grid])


def diffusion_inputs(objective, tokens_LP: torch.Tensor, meta: PackedMeta, gen: torch.Generator):
    """Timesteps [V] and noise [L, P] for a full (unsharded) packed batch."""
    t_V = objective.sample_t(meta.num_videos, gen, num_tokens=video_tokens(meta))  # each by its own length
    noise = torch.randn(tokens_LP.shape, generator=gen, dtype=tokens_LP.dtype)
    return t_V, noise
