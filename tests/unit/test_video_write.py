"""Writing videos: the yuv420p conversion, lossless round trips, and `make-videos` repeating
itself exactly from one process to the next (the demo's figures rest on it)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from vidscale.data.shapes import render
from vidscale.data.video import rgb_to_yuv420p, write_video


def decode_yuv(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="yuv420p") for f in c.decode(video=0)])


def test_yuv420p_conversion_agrees_with_ffmpegs_within_rounding():
    rng = np.random.default_rng(0)
    for H, W in ((16, 16), (64, 48), (6, 10)):
        for rgb_colour in rng.integers(0, 256, (40, 3)):
            rgb = np.broadcast_to(rgb_colour.astype(np.uint8), (H, W, 3)).copy()
            ours = rgb_to_yuv420p(rgb).astype(int)
            ref = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
            assert ours.shape == ref.shape == (H * 3 // 2, W)
            assert np.abs(ours - ref.astype(int)).max() <= 1, rgb_colour  # fixed-point rounding only
    # chroma is the mean of each 2x2 block (ffmpeg filters it with its neighbours instead)
    rgb = np.array([[[255, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]], np.uint8)
    mean = np.full((2, 2, 3), (64, 0, 0), np.uint8)  # 255 / 4, rounded
    assert np.abs(rgb_to_yuv420p(rgb)[2:].astype(int) - rgb_to_yuv420p(mean)[2:].astype(int)).max() <= 1
    # pure colours land on the BT.601 limited-range values
    assert rgb_to_yuv420p(np.zeros((2, 2, 3), np.uint8)).tolist() == [[16, 16], [16, 16], [128, 128]]
    assert rgb_to_yuv420p(np.full((2, 2, 3), 255, np.uint8))[:2].tolist() == [[235, 235], [235, 235]]
    with pytest.raises(ValueError, match="5x4: yuv420p needs an even height and width"):
        rgb_to_yuv420p(np.zeros((5, 4, 3), np.uint8))


def test_lossless_mp4_decodes_to_exactly_the_frames_written(tmp_path):
    for H, W in ((64, 48), (96, 128)):
        frames = render("triangle", "yellow", "purple", "left", H, W, 11, seed=3)
        p = tmp_path / f"v{W}.mp4"
        write_video(p, frames, fps=8, lossless=True)
        assert np.array_equal(decode_yuv(p), np.stack([rgb_to_yuv420p(f) for f in frames]))
        # the lossy default is close but not exact
        q = tmp_path / f"q{W}.mp4"
        write_video(q, frames, fps=8)
        d = decode_yuv(q).astype(int) - np.stack([rgb_to_yuv420p(f) for f in frames]).astype(int)
        assert d.shape[0] == 11 and np.abs(d).mean() < 2


def test_make_videos_writes_the_same_files_in_every_process(tmp_path):
    """Two `vidscale make-videos` calls (fresh processes, torch loaded as in the CLI) write files
    equal byte for byte. Lossy x264 from rgb24 made a third of 48 videos differ between calls."""
    digests = []
    for k in range(2):
        out = tmp_path / f"v{k}"
        r = subprocess.run([sys.executable, "-m", "vidscale.scaling.cli.main", "make-videos", str(out), "--n", "24"],
                           capture_output=True, text=True, timeout=300, env={**os.environ})
        assert r.returncode == 0, r.stderr
        files = sorted(p for p in out.iterdir())
        assert len(files) == 48  # 24 videos and their captions
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
