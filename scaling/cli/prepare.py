"""`vidscale prepare SRC OUT`: videos and images -> webdataset shards of latents + text tokens.

Decodes every video under SRC with PyAV at native resolution (optionally scaled down to
`data.max_area`, rounded to what the latent encoder x patch needs), resamples to
`data.fps` when set, cuts clips of `data.clip_frames` frames (at most `data.max_clips` per
video), encodes them with `data.encoder` and their captions with `data.text_encoder`, and
writes rolling tar shards plus OUT/index.json. Captions come from `data.captions` (jsonl
or csv with 'file' and 'caption') or a .txt beside each video. Images (jpg, png, webp) are
one-frame clips in the same shards. Unreadable videos are
logged, counted and skipped; when no video gives a sample the command fails (exit 2).

    vidscale prepare videos/ shards/ --set data.encoder=pixel --set data.clip_frames=17
"""
from __future__ import annotations

import argparse

from vidscale.data.prepare import parse_part, prepare
from vidscale.data.shards import merge_parts
from vidscale.scaling.config import DEVICES, load_config


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="turn videos into latent shards", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a video or image file, or a folder of them (searched recursively)")
    p.add_argument("out", help="output folder for shard-*.tar and index.json")
    p.add_argument("--recipe", default=None, help="recipe whose data/model sections to use (default: defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set data.clip_frames=33 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="prepare only every N-th video starting at I (parallel jobs into one OUT; the "
                        "last part to finish writes index.json)")
    p.add_argument("--workers", type=int, default=0, help="video decoding processes (default 0: in this one)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the VAE and text encoder run (auto: cuda when present)")
    return p


def run(args) -> int:
    cfg = load_config(args.recipe, args.overrides)
    part = parse_part(args.part)
    index = prepare(args.src, args.out, cfg.data, channels=cfg.model.in_channels, patch=cfg.model.patch,
                    progress=not args.no_progress, device=args.device, workers=args.workers, part=part)
    skipped = f"; skipped {index['failed']} unreadable video(s)" if index["failed"] else ""
    files = index["videos"] + index.get("images", 0)
    what = (f"{files} files ({index['videos']} videos, {index['images']} images)" if index.get("images")
            else f"{files} videos")
    print(f"vidscale prepare: {index['samples']} samples from {files - index['failed']} of {what} "
          f"in {len(index['shards'])} shard(s) at {args.out} "
          f"({index['seconds']:.1f} s){skipped}")
    if part is not None:
        merged = merge_parts(args.out, part[1])
        print(f"vidscale prepare: part {part[0]}/{part[1]} done; " +
              (f"all parts present: {merged['samples']} samples in {len(merged['shards'])} shard(s), "
               f"{args.out}/index.json written" if merged else "index.json follows when the last part ends"))
    return 0
