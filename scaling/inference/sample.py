"""Generation: text-to-video, image-to-video and SDEdit from a trained VideoDiT.

`sample_latent` is the core and knows only the model and the objective's sampler:

* classifier-free guidance (Ho & Salimans 2022): the conditional and the unconditional
  (empty caption = zero text tokens, what `objective.caption_dropout` trains) predictions
  come from one packed forward of two copies of the video, mixed as u + g * (c - u);
* clean-frame conditioning (image-to-video): given leading and/or trailing latent frames
  (a first frame, a last frame, or both: a loop or an interpolation) are held at their clean
  values in every model input and in the output, as training with `objective.cond_frames`
  and `objective.cond_mode` showed them;
* SDEdit (Meng et al. 2022): start from the encoded video noised to level `strength`
  (flow: t = strength; DDPM: timestep strength * (num_steps - 1)) instead of pure noise.

`Generator` adds the text encoder, the run's latent encoder and video files around it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidscale.data.video import write_video
from vidscale.models.latent import build_latent_encoder
from vidscale.models.packed import pack, patchify, unpatchify
from vidscale.models.text import TextEncoder
from vidscale.scaling.checkpoint.weights import find_weights, load_weights
from vidscale.scaling.objective import build_objective


def _meta(shape_CTHW, texts, patch, device):
    C, T, H, W = shape_CTHW
    dummy = torch.zeros(C, T, H, W)
    _, meta = pack([dummy] * len(texts), texts, patch)
    return meta.to(device)


def guided_model_fn(model, text_LD: torch.Tensor, shape_CTHW, patch, cfg_scale: float = 1.0,
                    device: torch.device | str = "cpu"):
    """(x [N, P], t [1]) -> prediction [N, P] for one video, with classifier-free guidance."""
    if cfg_scale == 1.0:
        meta = _meta(shape_CTHW, [text_LD], patch, device)
        return lambda x, t: model(x, t.to(device).repeat(1), meta)
    meta2 = _meta(shape_CTHW, [text_LD, text_LD[:0]], patch, device)

    def fn(x_NP, t_V):
        out = model(torch.cat([x_NP, x_NP]), t_V.to(device).repeat(2), meta2)  # [2N, P]
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return fn


def clean_frame_mask(shape_CTHW, frames: int, patch, last: int = 0) -> torch.Tensor:
    """[N, P] bool: the token values that belong to the first `frames` and the last `last`
    latent frames."""
    m = torch.zeros(shape_CTHW, dtype=torch.bool)
    m[:, :frames] = True
    if last:
        m[:, shape_CTHW[1] - last:] = True
    return patchify(m.float(), patch) > 0.5


def clean_frames(shape_CTHW, patch, first_CkHW=None, last_CjHW=None):
    """(mask [N, P] bool, values [N, P]): the given leading and trailing latent frames as tokens."""
    T = shape_CTHW[1]
    k = 0 if first_CkHW is None else first_CkHW.shape[1]
    j = 0 if last_CjHW is None else last_CjHW.shape[1]
    if k + j > T:
        raise ValueError(f"--first-frame and --last-frame: {k} + {j} conditioning latent frames overlap in a "
                         f"{T}-frame latent video: ask for more --frames")
    full = torch.zeros(shape_CTHW)
    if k:
        full[:, :k] = first_CkHW.float().cpu()
    if j:
        full[:, T - j:] = last_CjHW.float().cpu()
    return clean_frame_mask(shape_CTHW, k, patch, last=j), patchify(full, patch)


def _with_clean(fn, mask_NP, clean_NP):
    return lambda x, t: fn(torch.where(mask_NP, clean_NP, x), t)


def _noise_level(objective, strength: float):
    if objective.name == "flow":
        return float(strength)
    return int(round(strength * (objective.num_steps - 1)))


@torch.no_grad()
def sample_latent(model, objective, text_LD: torch.Tensor, shape_CTHW, patch, steps: int = 50,
                  cfg_scale: float = 1.0, seed: int = 0, cond_CkHW: torch.Tensor | None = None,
                  init_CTHW: torch.Tensor | None = None, strength: float = 1.0,
                  device: torch.device | str = "cpu", last_CjHW: torch.Tensor | None = None,
                  model_call=None) -> torch.Tensor:
    """One latent C x T x H x W from noise (or from `init_CTHW` noised to `strength`).

    `cond_CkHW` / `last_CjHW`: clean leading / trailing latent frames kept fixed. `model_call`
    (x [N, P], t [V], meta) -> prediction replaces `model(x, t, meta)`: a sequence-parallel
    group samples through `scaling/inference/parallel.py`'s."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength {strength}: expected a noise level in [0, 1]")
    shape_CTHW = tuple(int(s) for s in shape_CTHW)
    patch = tuple(patch)
    gen = torch.Generator().manual_seed(seed)
    N = patchify(torch.zeros(shape_CTHW), patch).shape[0]
    noise = torch.randn(N, patchify(torch.zeros(shape_CTHW), patch).shape[1], generator=gen).to(device)
    fn = guided_model_fn(model_call or model, text_LD.to(device), shape_CTHW, patch, cfg_scale, device)
    mask = clean = None
    if cond_CkHW is not None or last_CjHW is not None:
        mask, clean = (t.to(device) for t in clean_frames(shape_CTHW, patch, cond_CkHW, last_CjHW))
        fn = _with_clean(fn, mask, clean)
    x_init = t_start = None
    if init_CTHW is not None:
        if tuple(init_CTHW.shape) != shape_CTHW:
            raise ValueError(f"init latent {tuple(init_CTHW.shape)} does not match the requested {shape_CTHW}")
        x0 = patchify(init_CTHW.float().cpu(), patch).to(device)
        if strength == 0.0:  # nothing to denoise: the input itself
            return init_CTHW.float().cpu().clone()
        t_start = _noise_level(objective, strength)
        t_tok = torch.full((N,), float(t_start), dtype=torch.float64, device=device)
        x_init = objective.q_sample(x0, t_tok, noise)
        steps = max(1, int(round(steps * strength)))
    x = objective.sample(fn, noise, 1, steps=steps, generator=gen, x_init=x_init, t_start=t_start, num_tokens=N)
    if mask is not None:
        x = torch.where(mask, clean, x)
    return unpatchify(x.float().cpu(), _grid(shape_CTHW, patch), shape_CTHW[0], patch)


def _grid(shape_CTHW, patch):
    _, T, H, W = shape_CTHW
    return (T // patch[0], H // patch[1], W // patch[2])


# -- frames <-> files --------------------------------------------------------------------
def to_uint8(frames_CTHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] C x T x H x W -> uint8 T x H x W x 3."""
    x = ((frames_CTHW.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(1, 2, 3, 0).numpy()


def from_uint8(frames_THWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(3, 0, 1, 2).float() / 127.5 - 1


OUT_SUFFIXES = (".mp4", ".gif", ".webm", ".mkv", ".png")
"""What `write_frames` writes: a video through PyAV, or (.png) one image per frame."""


def _check_suffix(path: Path) -> None:
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {path}: expected a {', '.join(OUT_SUFFIXES[:-1])} or {OUT_SUFFIXES[-1]} path")


def existing_outputs(path: str | Path) -> list[Path]:
    """The files `write_frames(path, ...)` would overwrite or leave beside its own: the video
    itself, or (.png) every OUT_NNNN.png frame there, whatever the frame count."""
    path = Path(path)
    if path.suffix != ".png":
        return [path] if path.exists() else []
    if not path.parent.is_dir():
        return []
    frame = re.compile(re.escape(path.stem) + r"_\d{4,}\.png")
    return sorted(p for p in path.parent.iterdir() if frame.fullmatch(p.name))


def check_out(path: str | Path) -> None:
    """`vidscale sample --out`, before any work: a suffix `write_frames` takes, and nothing there
    yet (a shorter PNG sample would otherwise leave an earlier one's last frames beside it)."""
    path = Path(path)
    _check_suffix(path)
    taken = existing_outputs(path)
    if taken:
        more = f" (and {len(taken) - 1} more frames)" if len(taken) > 1 else ""
        raise ValueError(f"--out {path}: {taken[0]} already exists{more}; choose another --out "
                         f"(nothing is overwritten)")


def write_frames(path: str | Path, frames_THWC: np.ndarray, fps: int = 8) -> list[Path]:
    """OUT.mp4 / OUT.gif / OUT.webm / OUT.mkv via PyAV; OUT.png writes OUT_0000.png, OUT_0001.png, ..."""
    path = Path(path)
    _check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        from PIL import Image
        outs = []
        for i, f in enumerate(frames_THWC):
            p = path.with_name(f"{path.stem}_{i:04d}.png")
            Image.fromarray(f).save(p)
            outs.append(p)
        return outs
    T, H, W, _ = frames_THWC.shape
    if path.suffix != ".gif" and (H % 2 or W % 2):  # yuv420p needs even sizes
        frames_THWC = np.pad(frames_THWC, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    write_video(path, frames_THWC, fps=fps)
    return [path]


def read_image(path: str | Path, H: int, W: int, flag: str = "--first-frame") -> torch.Tensor:
    """An image file -> 3 x 1 x H x W in [-1, 1] (resized to the requested size)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {p}: file not found")
    img = Image.open(p).convert("RGB").resize((W, H), Image.BICUBIC)
    return from_uint8(np.asarray(img)[None])


def read_video(path: str | Path, frames: int, H: int, W: int) -> torch.Tensor:
    """The first `frames` frames of a video file -> 3 x T x H x W in [-1, 1] (resized)."""
    import av
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--init-video {p}: file not found")
    out = []
    with av.open(str(p)) as c:
        for f in c.decode(video=0):
            out.append(np.asarray(f.to_image().convert("RGB").resize((W, H), Image.BICUBIC)))
            if len(out) == frames:
                break
    if not out:
        raise ValueError(f"--init-video {p}: no decodable frames")
    while len(out) < frames:  # a shorter video holds its last frame
        out.append(out[-1])
    return from_uint8(np.stack(out))


@dataclass
class SampleArgs:
    prompt: str = ""
    frames: int = 17
    height: int = 64
    width: int = 64
    steps: int = 50
    cfg_scale: float = 1.0
    seed: int = 0
    first_frame: str = ""
    last_frame: str = ""
    init_video: str = ""
    strength: float = 0.8
    fps: int = 8

    def check(self) -> None:
        """One-line ValueError for values no sampler can use (sizes are checked by `latent_shape`)."""
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: expected at least 1 sampler step")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"--strength {self.strength}: expected a noise level in [0, 1]")
        if self.fps < 1:
            raise ValueError(f"--fps {self.fps}: expected a positive frame rate")


class Generator:
    """Model + objective + text encoder + the run's latent encoder."""

    def __init__(self, model, cfg, device: str | torch.device = "cpu", text_encoder=None, latent_encoder=None):
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, torch.device(device)
        self.objective = build_objective(cfg.objective)
        self.patch = tuple(cfg.model.patch)
        self.encoder = latent_encoder or build_latent_encoder(cfg.data.encoder, cfg.model.in_channels)
        self._text = text_encoder
        if self.encoder.channels != cfg.model.in_channels:
            raise ValueError(f"data.encoder = {cfg.data.encoder!r} gives {self.encoder.channels} channels "
                             f"but the model takes model.in_channels = {cfg.model.in_channels}")

    @classmethod
    def from_path(cls, path: str | Path, ema: bool = True, device: str = "cpu") -> "Generator":
        model, cfg = load_weights(find_weights(path, ema), device)
        return cls(model, cfg, device)

    def encode_text(self, prompt: str) -> torch.Tensor:
        if not prompt:
            return torch.zeros(0, self.cfg.model.text_dim)
        if self._text is None:
            self._text = TextEncoder(self.cfg.data.text_encoder)
        t = self._text.encode([prompt])[0]
        if t.shape[-1] != self.cfg.model.text_dim:
            raise ValueError(f"text encoder {self.cfg.data.text_encoder!r} gives {t.shape[-1]}-wide tokens, "
                             f"the model takes model.text_dim = {self.cfg.model.text_dim}")
        return t

    def latent_shape(self, frames: int, H: int, W: int) -> tuple[int, int, int, int]:
        e, (pt, ph, pw) = self.encoder, self.patch
        s = e.spatial * ph, e.spatial * pw
        if H < 1 or W < 1 or H % s[0] or W % s[1]:
            raise ValueError(f"--height {H} --width {W}: must be positive multiples of {s[0]} x {s[1]} "
                             f"(latent encoder x{e.spatial} times patch {ph}x{pw})")
        if frames < 1 or (frames - 1) % e.temporal:
            raise ValueError(f"--frames {frames}: expected 1 + {e.temporal} * k frames "
                             f"(the latent encoder compresses time {e.temporal}x after the first frame)")
        T = 1 + (frames - 1) // e.temporal
        if T % pt:
            raise ValueError(f"--frames {frames}: {T} latent frames are not divisible by the temporal patch {pt}")
        return (self.cfg.model.in_channels, T, H // e.spatial, W // e.spatial)

    def encode_video(self, frames_CTHW: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(frames_CTHW[None].float())[0].float()

    def encode_last_frame(self, image_C1HW: torch.Tensor, T: int) -> torch.Tensor:
        """The latent frame that ends a T-latent-frame video on this image: a causal encoder
        codes every frame after the first in groups of `temporal`, so the image held still
        for one group gives that group's latent (T = 1: the image alone, the first frame)."""
        if T == 1:
            return self.encode_video(image_C1HW)[:, :1]
        still = image_C1HW.expand(-1, 1 + self.encoder.temporal, -1, -1)
        return self.encode_video(still)[:, -1:]

    def decode(self, latent_CTHW: torch.Tensor, frames: int) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.decode(latent_CTHW[None].float())[0, :, :frames].float().clamp(-1, 1)

    def __call__(self, a: SampleArgs) -> torch.Tensor:
        """Frames C x T x H x W in [-1, 1] for the request."""
        a.check()
        shape = self.latent_shape(a.frames, a.height, a.width)
        text = self.encode_text(a.prompt)
        cond = last = init = None
        if a.first_frame:
            cond = self.encode_video(read_image(a.first_frame, a.height, a.width))[:, :1]
        if a.last_frame:
            last = self.encode_last_frame(read_image(a.last_frame, a.height, a.width, "--last-frame"), shape[1])
        if a.init_video:
            init = self.encode_video(read_video(a.init_video, a.frames, a.height, a.width))
            init = init[:, :shape[1]]
        lat = sample_latent(self.model, self.objective, text, shape, self.patch, a.steps, a.cfg_scale, a.seed,
                            cond_CkHW=cond, init_CTHW=init, strength=a.strength if init is not None else 1.0,
                            device=self.device, last_CjHW=last)
        return self.decode(lat, a.frames)
