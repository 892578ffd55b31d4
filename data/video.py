"""Video files with PyAV: decode into clips at native size, and write small videos. Images
(Pillow) become one-frame clips, so they take the same path to latents as videos.

Decoding streams frames (a long video is never held whole): frames are resampled to a
target frame rate by their timestamps, resized only when asked (the size must divide what
the VAE and patch need), and grouped into clips of a fixed frame count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
"""Still images (an animated webp gives its first frame; a gif is a video)."""


@dataclass
class Clip:
    frames: np.ndarray
    """[T, H, W, 3] uint8 RGB."""
    fps: float
    start: int
    """Index of the first frame (at `fps`) in the video."""
    orig_size: tuple[int, int]
    """(H, W) of the source video."""
    image: bool = False
    """A still image (its frames are one picture)."""


def target_size(H: int, W: int, multiple: int, max_area: int = 0) -> tuple[int, int]:
    """Native size, scaled down to H*W <= max_area keeping aspect when asked, then rounded to
    the nearest multiple (>= one multiple). The rounding changes the aspect ratio by at most
    half a multiple per side; no pixels are cropped."""
    scale = 1.0
    if max_area and H * W > max_area:
        scale = (max_area / (H * W)) ** 0.5

    def rnd(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)
    h, w = rnd(H * scale), rnd(W * scale)
    while max_area and h * w > max_area and max(h, w) > multiple:  # rounding up may overshoot
        if h >= w:
            h -= multiple
        else:
            w -= multiple
    return h, w


def clip_lengths(frames: int, temporal: int, pt: int) -> int:
    """Largest usable clip length <= frames: 1 + temporal * k frames whose latent frame count
    (1 + k) divides by the temporal patch pt. 0 when none fits."""
    for n in range(frames, 0, -1):
        if (n - 1) % temporal == 0 and (1 + (n - 1) // temporal) % pt == 0:
            return n
    return 0


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def image_frames(temporal: int, pt: int) -> int:
    """Frames of an image's clip: 1, the one frame a causal VAE encodes alone (one latent frame),
    when that divides by the temporal patch pt; else the image repeated into the shortest still
    clip of pt latent frames, 1 + temporal * (pt - 1) frames (what `clip_lengths` accepts)."""
    return 1 if pt == 1 else 1 + temporal * (pt - 1)


def decode_image(path: str | Path, multiple: int, max_area: int = 0, temporal: int = 4, pt: int = 1) -> Clip:
    """An image as a clip of `image_frames(temporal, pt)` identical frames (RGB, EXIF rotation
    applied, alpha dropped), sized like a video frame (`target_size`). Raises on unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        W0, H0 = im.size
        h, w = target_size(H0, W0, multiple, max_area)
        if (h, w) != (H0, W0):
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        img = np.asarray(im, dtype=np.uint8)
    n = image_frames(temporal, pt)
    return Clip(np.broadcast_to(img, (n, *img.shape)).copy(), 0.0, 0, (H0, W0), image=True)


def decode_clips(path: str | Path, clip_frames: int, multiple: int, fps: float = 0.0, max_area: int = 0,
                 max_clips: int = 0, temporal: int = 4, pt: int = 1) -> Iterator[Clip]:
    """Yield consecutive clips of `clip_frames` frames; a video shorter than one clip gives
    one shorter clip (the longest valid length). Raises on unreadable files (av.FFmpegError,
    ValueError): the caller decides whether to skip."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # guessed_rate follows the timestamps (GIF average_rate reads 25/3 for 8 fps delays)
        src_fps = float(stream.guessed_rate or stream.average_rate or 0) or 24.0
        out_fps = fps or src_fps
        H0, W0 = stream.codec_context.height, stream.codec_context.width
        h, w = target_size(H0, W0, multiple, max_area)
        buf: list[np.ndarray] = []
        n_out, n_clips, next_t, t0 = 0, 0, 0.0, None
        for frame in container.decode(stream):
            if fps:  # resample by timestamp: keep the frame at or after each 1/fps tick
                t = float(frame.time) if frame.time is not None else n_out / src_fps
                if t0 is None:  # ticks count from the first frame (a stream may start at 2 s)
                    t0 = t
                t -= t0
                if t + 1e-6 < next_t:
                    continue
                reps = 1
                next_t += 1.0 / fps
                while t + 1e-6 >= next_t:  # a slow source repeats the frame to keep the rate
                    reps += 1
                    next_t += 1.0 / fps
            else:
                reps = 1
            img = frame.to_ndarray(format="rgb24", width=w, height=h) if (h, w) != (frame.height, frame.width) \
                else frame.to_ndarray(format="rgb24")
            for _ in range(reps):
                buf.append(img)
                n_out += 1
                if len(buf) == clip_frames:
                    yield Clip(np.stack(buf), out_fps, n_out - clip_frames, (H0, W0))
                    buf, n_clips = [], n_clips + 1
                    if max_clips and n_clips >= max_clips:
                        return
        if n_clips == 0 and buf:
            n = clip_lengths(len(buf), temporal, pt)
            if n:
                yield Clip(np.stack(buf[:n]), out_fps, 0, (H0, W0))
        if n_clips == 0 and not buf:
            raise ValueError(f"{path}: no decodable frames")


def rgb_to_yuv420p(rgb_HWC: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] (H, W even) -> yuv420p as one [H*3/2, W] plane stack (Y, then U, then V),
    BT.601 limited range in exact integer arithmetic; chroma from the mean of each 2x2 block."""
    H, W, _ = rgb_HWC.shape
    if H % 2 or W % 2:
        raise ValueError(f"frame size {H}x{W}: yuv420p needs an even height and width")
    x = rgb_HWC.astype(np.int32)
    R, G, B = x[..., 0], x[..., 1], x[..., 2]
    Y = ((66 * R + 129 * G + 25 * B + 128) >> 8) + 16
    s = x.reshape(H // 2, 2, W // 2, 2, 3).sum(axis=(1, 3))  # 4 x the 2x2 mean
    R4, G4, B4 = s[..., 0], s[..., 1], s[..., 2]
    U = ((-38 * R4 - 74 * G4 + 112 * B4 + 512) >> 10) + 128
    V = ((112 * R4 - 94 * G4 - 18 * B4 + 512) >> 10) + 128
    out = np.empty((H * 3 // 2, W), np.uint8)
    out[:H] = Y
    out[H:].reshape(-1)[:] = np.concatenate([U.reshape(-1), V.reshape(-1)])
    return out


def write_video(path: str | Path, frames_THWC: np.ndarray, fps: int = 24, codec: str | None = None,
                lossless: bool = False) -> None:
    """Write uint8 RGB frames. Codec from the extension: mp4 -> libx264, webm -> libvpx-vp9,
    gif -> gif; sizes must be even for the yuv420p codecs. `lossless` (libx264 only) encodes at
    qp 0: the decoded frames are exactly the yuv420p of the input, whatever the encoder's own
    choices (lossy x264 output varied from one process to the next); players outside ffmpeg
    may not play that profile, so only data the project makes for itself uses it."""
    import av

    path = Path(path)
    codec = codec or {".mp4": "libx264", ".webm": "libvpx-vp9", ".gif": "gif", ".mkv": "libx264",
                      ".avi": "mpeg4", ".mov": "libx264"}[path.suffix]
    T, H, W, _ = frames_THWC.shape
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height = W, H
        s.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec == "libx264":
            s.options = {"qp": "0", "preset": "veryfast"} if lossless else {"crf": "18", "preset": "veryfast"}
        for f in frames_THWC:
            # yuv420p frames are converted here, not by swscale: its rgb24 -> yuv420p path gave
            # two different results for one 64x48 frame depending on where the input lay
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24") if codec == "gif" \
                else av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
