"""Videos -> webdataset shards of latents + text tokens (what `vidscale prepare` runs).

Decodes every video under SRC with PyAV at native resolution (optionally scaled down to
`data.max_area`, rounded to what the latent encoder x patch needs), resamples to
`data.fps` when set, cuts clips of `data.clip_frames` frames (at most `data.max_clips` per
video), encodes them with `data.encoder` and their captions with `data.text_encoder`, and
writes rolling tar shards plus OUT/index.json. Captions come from `data.captions` (jsonl
or csv with 'file' and 'caption') or a .txt beside each video. Unreadable videos are
logged, counted and skipped.

    index = prepare("videos/", "shards/", cfg.data, channels=cfg.model.in_channels, patch=cfg.model.patch)
"""
from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidscale.data.args import PrepareArgs
from vidscale.data.shards import ShardWriter
from vidscale.data.video import VIDEO_EXTS, clip_lengths, decode_clips
from vidscale.models.latent import build_latent_encoder
from vidscale.models.text import TextEncoder


def find_videos(src: Path) -> list[Path]:
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


def parse_part(spec: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N): every N-th video starting at I (one of N parallel preparations)."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--part {spec!r}: expected I/N, e.g. 0/8") from None
    if not 0 <= i < n:
        raise ValueError(f"--part {spec!r}: expected 0 <= I < N")
    return i, n


# -- decode workers ---------------------------------------------------------------------------
def _worker_init() -> None:
    torch.set_num_threads(1)


def _decode(v: Path, **kw):
    """(clips, '') or (None, error message) for one video: runs in a decode worker."""
    try:
        return list(decode_clips(v, **kw)), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure: log, count, skip the file
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# -- the pipeline -----------------------------------------------------------------------------
def prepare(src: str | Path, out: str | Path, data: PrepareArgs, *, channels: int, patch, progress: bool = True,
            device: str = "cpu", workers: int = 0, part: tuple[int, int] | None = None) -> dict:
    """Prepare SRC into shards under OUT; returns the index (plus a summary).

    `data` is a recipe's data section (its `PrepareArgs` part, data/args.py: encoder, text_encoder,
    clip_frames, fps, max_area, max_clips, shard_max_bytes, captions); `channels` and
    `patch` are the model's latent channels and (pt, ph, pw) patch, which the clips' sizes
    and the latent encoder must fit. `part=(i, n)` prepares every n-th video from i.
    """
    src, out, d = Path(src), Path(out), data
    videos = find_videos(src)
    if not videos:
        raise ValueError(f"{src}: no video files (looked for mp4, webm, mkv, mov, avi, gif, m4v)")
    if part is not None:
        videos = videos[part[0]::part[1]]
    sidecar = load_captions(d.captions, src)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = build_latent_encoder(d.encoder, channels=channels, device=device)
    pt, ph, pw = patch
    if clip_lengths(d.clip_frames, enc.temporal, pt) != d.clip_frames:
        raise ValueError(f"data.clip_frames = {d.clip_frames}: expected 1 + {enc.temporal}k frames whose "
                         f"{1 + (d.clip_frames - 1) // enc.temporal} latent frames divide by pt={pt}")
    multiple = math.lcm(enc.spatial * ph, enc.spatial * pw)
    text = TextEncoder(d.text_encoder, device=device)
    writer = ShardWriter(out, d.shard_max_bytes, patch,
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
