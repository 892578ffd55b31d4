"""`vidscale prepare SRC OUT`: videos -> webdataset shards of latents + text tokens.

Decodes every video under SRC with PyAV at native resolution (optionally scaled down to
`data.max_area`, rounded to what the latent encoder x patch needs), resamples to
`data.fps` when set, cuts clips of `data.clip_frames` frames (at most `data.max_clips` per
video), encodes them with `data.encoder` and their captions with `data.text_encoder`, and
writes rolling tar shards plus OUT/index.json. Captions come from `data.captions` (jsonl
or csv with 'file' and 'caption') or a .txt beside each video. Unreadable videos are
logged, counted and skipped.

    vidscale prepare videos/ shards/ --set data.encoder=pixel --set data.clip_frames=17
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
import time
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="turn videos into latent shards", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a video file or a folder of videos (searched recursively)")
    p.add_argument("out", help="output folder for shard-*.tar and index.json")
    p.add_argument("--recipe", default=None, help="recipe whose data/model sections to use (default: defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set data.clip_frames=33 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="prepare only every N-th video starting at I (parallel jobs into one OUT; the "
                        "last part to finish writes index.json)")
    p.add_argument("--workers", type=int, default=0, help="video decoding processes (default 0: in this one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the VAE and text encoder run (auto: cuda when present)")
    return p


def find_videos(src: Path) -> list[Path]:
    from vidscale.data.video import VIDEO_EXTS

    if src.is_file():
        return [src]
    if not src.is_dir():
        raise ValueError(f"{src}: no such file or folder")
    return sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())


def load_captions(path: str, src: Path) -> dict[str, str]:
    """Sidecar captions keyed by file path relative to SRC (and by bare file name)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data.captions = {path!r}: file not found")
    rows: list[dict] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{p}:{n}: not valid JSON") from None
    elif p.suffix == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"data.captions = {path!r}: expected a .jsonl or .csv file")
    out = {}
    for n, r in enumerate(rows, 1):
        if "file" not in r or "caption" not in r:
            raise ValueError(f"{p}: row {n} lacks 'file' or 'caption'")
        out[str(r["file"])] = str(r["caption"])
        out.setdefault(Path(str(r["file"])).name, str(r["caption"]))
    return out


def caption_for(video: Path, src: Path, sidecar: dict[str, str]) -> str | None:
    rel = str(video.relative_to(src)) if src.is_dir() else video.name
    if rel in sidecar or video.name in sidecar:
        return sidecar.get(rel, sidecar.get(video.name))
    txt = video.with_suffix(".txt")
    return txt.read_text().strip() if txt.is_file() else None


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def _decode(v: Path, **kw):
    """(clips, '') or (None, error message) for one video: runs in a decode worker."""
    from vidscale.data.video import decode_clips
    try:
        return list(decode_clips(v, **kw)), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure: log, count, skip the file
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def parse_part(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--part {spec!r}: expected I/N, e.g. 0/8") from None
    if not 0 <= i < n:
        raise ValueError(f"--part {spec!r}: expected 0 <= I < N")
    return i, n


def prepare(src: str | Path, out: str | Path, cfg, progress: bool = True, device: str = "cpu",
            workers: int = 0, part: tuple[int, int] | None = None) -> dict:
    """Library entry point of the command; returns the index (plus a summary)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from vidscale.data.shards import ShardWriter
    from vidscale.data.video import clip_lengths
    from vidscale.models.latent import build_latent_encoder
    from vidscale.models.text import TextEncoder

    src, out, d = Path(src), Path(out), cfg.data
    videos = find_videos(src)
    if not videos:
        raise ValueError(f"{src}: no video files (looked for mp4, webm, mkv, mov, avi, gif, m4v)")
    if part is not None:
        videos = videos[part[0]::part[1]]
    sidecar = load_captions(d.captions, src)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = build_latent_encoder(d.encoder, channels=cfg.model.in_channels, device=device)
    pt, ph, pw = cfg.model.patch
    if clip_lengths(d.clip_frames, enc.temporal, pt) != d.clip_frames:
        raise ValueError(f"data.clip_frames = {d.clip_frames}: expected 1 + {enc.temporal}k frames whose "
                         f"{1 + (d.clip_frames - 1) // enc.temporal} latent frames divide by pt={pt}")
    multiple = math.lcm(enc.spatial * ph, enc.spatial * pw)
    text = TextEncoder(d.text_encoder, device=device)
    writer = ShardWriter(out, d.shard_max_bytes, cfg.model.patch,
                         info={"channels": enc.channels, "text_dim": text.dim, "encoder": d.encoder,
                               "text_encoder": d.text_encoder, "temporal": enc.temporal, "spatial": enc.spatial,
                               "clip_frames": d.clip_frames, "latent_dtype": "bf16"}, part=part)
    failed: list[dict] = []
    uncaptioned = 0
    t0 = time.perf_counter()
    pending: list = []  # (video, clips, caption): captions are encoded in batches

    def flush() -> None:
        texts = text.encode([cap for _, _, cap in pending])
        for (v, clips, caption), text_LD in zip(pending, texts):
            rel = str(v.relative_to(src)) if src.is_dir() else v.name
            for c in clips:
                x = torch.from_numpy(np.ascontiguousarray(c.frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
                latent = enc.encode(x)[0].cpu()  # C T' H' W'
                T, H, W = c.frames.shape[:3]
                writer.write(latent, text_LD, {"caption": caption, "source": rel, "fps": c.fps,
                                               "orig_size": list(c.orig_size), "size": [H, W],
                                               "frame_range": [c.start, c.start + T]})
        pending.clear()

    decode = functools.partial(_decode, clip_frames=d.clip_frames, multiple=multiple, fps=d.fps,
                               max_area=d.max_area, max_clips=d.max_clips, temporal=enc.temporal, pt=pt)
    pool = None
    if workers > 1:  # decoding is the CPU-heavy part; imap keeps the order, so shards do not depend on it
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers, initializer=_worker_init)
        results = pool.imap(decode, videos, chunksize=1)
    else:
        results = map(decode, videos)
    bar = tqdm(zip(videos, results), total=len(videos), desc="prepare", unit="video", disable=not progress,
               file=sys.stderr)
    try:
        for v, (clips, msg) in bar:
            if msg:
                failed.append({"file": str(v), "error": msg})
                print(f"vidscale prepare: skipped unreadable video {v}: {msg}", file=sys.stderr)
                continue
            if not clips:
                failed.append({"file": str(v), "error": "shorter than one frame group"})
                continue
            caption = caption_for(v, src, sidecar)
            if caption is None:
                uncaptioned += 1
                caption = ""
            pending.append((v, clips, caption))
            if len(pending) >= text.batch_size:
                flush()
            bar.set_postfix(samples=writer.count, failed=len(failed))
        flush()
    finally:
        bar.close()
        if pool is not None:  # every result is consumed on the normal path
            pool.terminate()
    index = writer.close(videos=len(videos), failed=len(failed), failed_files=failed, uncaptioned=uncaptioned)
    index["seconds"] = time.perf_counter() - t0
    return index


def run(args) -> int:
    from vidscale.scaling.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    part = parse_part(args.part)
    index = prepare(args.src, args.out, cfg, progress=not args.no_progress, device=args.device,
                    workers=args.workers, part=part)
    skipped = f"; skipped {index['failed']} unreadable video(s)" if index["failed"] else ""
    print(f"vidscale prepare: {index['samples']} samples from {index['videos'] - index['failed']} of "
          f"{index['videos']} videos in {len(index['shards'])} shard(s) at {args.out} "
          f"({index['seconds']:.1f} s){skipped}")
    if part is not None:
        from vidscale.data.shards import merge_parts
        merged = merge_parts(args.out, part[1])
        print(f"vidscale prepare: part {part[0]}/{part[1]} done; " +
              (f"all parts present: {merged['samples']} samples in {len(merged['shards'])} shard(s), "
               f"{args.out}/index.json written" if merged else "index.json follows when the last part ends"))
    return 0
