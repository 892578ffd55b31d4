"""`vidscale make-videos OUT --n N`: write captioned videos of moving shapes (for demos and
tests of `vidscale prepare`): OUT/shapes_NNNNN.mp4 with a .txt caption beside each."""
from __future__ import annotations

import argparse

from vidscale.data.shapes import make_videos


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("make-videos", help="write captioned demo videos of moving shapes", description=__doc__)
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=32, help="number of videos (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ext", default=".mp4", choices=[".mp4", ".webm", ".gif"], help="container (default .mp4)")
    return p


def run(args) -> int:
    if args.n < 1:
        raise ValueError(f"--n {args.n}: expected a positive number of videos")
    paths = make_videos(args.out, args.n, seed=args.seed, ext=args.ext)
    print(f"vidscale make-videos: wrote {len(paths)} videos with captions to {args.out}")
    return 0
