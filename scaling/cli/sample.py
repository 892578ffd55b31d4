"""`vidscale sample RUN_DIR --prompt "..." --out OUT.mp4`: generate a video from a trained run.

RUN_DIR is a run directory (its EMA weights when the run kept an EMA) or a .safetensors
file written by training or `vidscale export`. The video is decoded with the run's latent
encoder (data.encoder) and written with PyAV (.mp4, .gif, .webm, .mkv) or as PNG frames (.png).
An existing output is refused before any work (choose another --out).

  vidscale sample runs/x --prompt "a red square moving right" --frames 17 --height 64 --width 64 \\
      --steps 50 --cfg-scale 4 --seed 0 --out red.mp4
  vidscale sample runs/x --prompt "..." --first-frame img.png --out i2v.mp4       # image-to-video
  vidscale sample runs/x --prompt "..." --last-frame end.png --out to_end.mp4     # ends on an image
  vidscale sample runs/x --prompt "..." --first-frame a.png --last-frame b.png --out ab.mp4  # a -> b
  vidscale sample runs/x --prompt "..." --first-frame a.png --last-frame a.png --out loop.mp4  # a loop
  vidscale sample runs/x --prompt "..." --init-video in.mp4 --strength 0.6 --out edit.mp4  # SDEdit
"""
from __future__ import annotations

import argparse
import json

from vidscale.scaling.inference.sample import Generator, SampleArgs, check_out, to_uint8, write_frames


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sample", help="generate a video from a run or a weights file", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="run directory or .safetensors weights file")
    p.add_argument("--prompt", default="", help="caption ('' samples unconditionally)")
    p.add_argument("--frames", type=int, default=17, help="video frames (1 + temporal * k; 1 = an image)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (flow Euler or DDPM ancestral)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-frame", default="", metavar="IMG", help="image-to-video: keep this first frame")
    p.add_argument("--last-frame", default="", metavar="IMG",
                   help="end on this image (with --first-frame: interpolate; the same image twice: a loop)")
    p.add_argument("--init-video", default="", metavar="VIDEO", help="SDEdit: start from this video")
    p.add_argument("--strength", type=float, default=0.8, help="SDEdit noise level in [0, 1]")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when an EMA exists")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True,
                   help="OUT.mp4, OUT.gif, OUT.webm, OUT.mkv or OUT.png (frames OUT_0000.png, ...); never "
                        "overwritten: an existing OUT (or OUT_NNNN.png frame) is refused")
    return p


def run(args) -> int:
    check_out(args.out)  # a bad or taken --out fails before the weights load and the sampler runs
    gen = Generator.from_path(args.run, ema=not args.no_ema, device=args.device)
    a = SampleArgs(prompt=args.prompt, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                   cfg_scale=args.cfg_scale, seed=args.seed, first_frame=args.first_frame,
                   last_frame=args.last_frame, init_video=args.init_video, strength=args.strength, fps=args.fps)
    a.check()
    gen.latent_shape(a.frames, a.height, a.width)  # bad sizes fail before any work
    frames = gen(a)
    paths = write_frames(args.out, to_uint8(frames), fps=args.fps)
    print(json.dumps({"out": [str(p) for p in paths], "frames": int(frames.shape[1]),
                      "height": int(frames.shape[2]), "width": int(frames.shape[3]),
                      "sampler": gen.objective.name, "steps": args.steps, "cfg_scale": args.cfg_scale}))
    return 0
