"""The `objective` section."""
from __future__ import annotations

from dataclasses import dataclass

COND_MODES = ("first", "last", "first_last")
"""`objective.cond_mode` (scaling/objective.py's `clean_frames_mask` places the frames)."""


@dataclass
class ObjectiveArgs:
    name: str = "flow"
    """'flow' (rectified flow, velocity target) or 'ddpm' (epsilon prediction)."""
    schedule: str = "linear"
    """DDPM beta schedule: linear or cosine."""
    num_steps: int = 1000
    """DDPM's timesteps. The linear betas (1e-4..0.02 at 1000) scale by 1000 / num_steps, so the
    last timestep is pure noise at any count."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "1.0"
    """Rectified flow's timestep shift: a number (1 = none; > 1 spends more steps at high noise),
    or 'auto': each video's own shift sqrt(tokens / shift_ref_tokens), in training (per video of
    a packed batch) and in sampling (for the requested size)."""
    shift_ref_tokens: int = 4096
    """With shift 'auto': the patch-token count whose shift is 1."""
    caption_dropout: float = 0.0
    """Probability of training a video with an empty caption (for classifier-free guidance)."""
    cond_frames: int = 0
    """Image-to-video: condition on up to this many clean latent frames per end (0 = off)."""
    cond_mode: str = "first"
    """Where `cond_frames` sit (Open-Sora's head / tail / loop masks): 'first' (leading frames:
    image-to-video), 'last' (trailing frames: video that ends on an image) or 'first_last' (both
    ends, the same number at each: loops and interpolation between two images). Each video
    draws 0..cond_frames per end and always keeps at least one frame to denoise."""
