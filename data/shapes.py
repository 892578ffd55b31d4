"""Captioned videos of moving shapes (numpy frames, written with PyAV), for demos and tests.

Each video is a coloured circle, square or triangle moving in one direction over a plain
background; the caption says which ("a red circle moving right on a blue background"),
so text conditioning carries real information. Sizes and lengths vary per video.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vidscale.data.video import write_video

COLORS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "white": (240, 240, 240), "black": (15, 15, 15), "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def render(shape: str, color: str, bg: str, motion: str, H: int, W: int, T: int, seed: int = 0) -> np.ndarray:
    """[T, H, W, 3] uint8 frames of one shape crossing the frame."""
    rng = np.random.default_rng(seed)
    r = max(3, int(min(H, W) * rng.uniform(0.15, 0.25)))
    dy, dx = MOTIONS[motion]
    cy0, cx0 = rng.uniform(r, H - r), rng.uniform(r, W - r)
    speed = rng.uniform(0.5, 1.0) * min(H, W) / max(T, 1)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    frames = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        cy = (cy0 + dy * speed * t) % H
        cx = (cx0 + dx * speed * t) % W
        if shape == "circle":
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif shape == "square":
            m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        else:  # triangle pointing up
            m = (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        frames[t] = COLORS[bg]
        frames[t][m] = COLORS[color]
    return frames


def make_videos(out: str | Path, n: int, sizes=((48, 64), (64, 48), (96, 128), (128, 96)),
                frames=(9, 33), fps: int = 8, seed: int = 0, ext: str = ".mp4") -> list[Path]:
    """Write `n` videos with `.txt` caption sidecars into `out`; returns the video paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    names = list(COLORS)
    for i in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color, bg = rng.choice(names, 2, replace=False)
        motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
        H, W = sizes[rng.integers(len(sizes))]
        T = int(rng.integers(frames[0], frames[1] + 1))
        p = out / f"shapes_{i:05d}{ext}"
        write_video(p, render(shape, color, bg, motion, H, W, T, seed=seed * 100_003 + i), fps=fps,
                    lossless=ext == ".mp4")  # the same call writes the same frames
        p.with_suffix(".txt").write_text(f"a {color} {shape} moving {motion} on a {bg} background\n")
        paths.append(p)
    return paths
