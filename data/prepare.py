"""Videos and images -> webdataset shards of latents + text tokens (what `vidscale prepare` runs).

Decodes every video under SRC with PyAV at native resolution (optionally scaled down to
`data.max_area`, rounded to what the latent encoder x patch needs), resamples to
`data.fps` when set, cuts clips of `data.clip_frames` frames (at most `data.max_clips` per
video), encodes them with `data.encoder` and their captions with `data.text_encoder`, and
writes rolling tar shards plus OUT/index.json. Images (jpg, png, webp) are one-frame clips
(data/video.py `decode_image`; with a temporal patch pt > 1, a still clip of pt latent frames)
in the same shards and index, their metadata marked "image": true. Captions come from
`data.captions` (jsonl or csv with 'file' and 'caption') or a .txt beside each file. Unreadable videos are
logged, counted and skipped; a decode worker that dies (killed) costs its video, not the
run; a run where no video gave a sample is an error.

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
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from vidscale.data.args import PrepareArgs
from vidscale.data.shards import ShardWriter
from vidscale.data.video import IMAGE_EXTS, VIDEO_EXTS, clip_lengths, decode_clips, decode_image, is_image
from vidscale.models.latent import build_latent_encoder
from vidscale.models.text import TextEncoder


def find_videos(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise ValueError(f"{src}: no such file or folder")
    return sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS and p.is_file())


def load_captions(path: str, src: Path) -> dict[str, str]:
    """Sidecar captions keyed by file path relative to SRC (and by bare file name)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data.captions = {path!r}: file not found")
    rows: list[dict] = []
    try:
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ValueError(f"{p}:{n}: not valid JSON") from None
        elif p.suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise ValueError(f"data.captions = {path!r}: expected a .jsonl or .csv file")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    out = {}
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or r.get("file") is None or r.get("caption") is None:
            raise ValueError(f"{p}: row {n} lacks 'file' or 'caption'")
        file, caption = str(r["file"]), str(r["caption"])
        if not _encodable(file) or not _encodable(caption):
            raise ValueError(f"{p}: row {n} holds a character that is not valid Unicode (a lone surrogate)")
        out[file] = caption
        out.setdefault(Path(file).name, caption)
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def caption_for(video: Path, src: Path, sidecar: dict[str, str]) -> str | None:
    """The video's caption (`data.captions`, else a .txt beside it), or None; raises ValueError
    naming a caption file that is not UTF-8 text."""
    rel = str(video.relative_to(src)) if src.is_dir() else video.name
    if rel in sidecar or video.name in sidecar:
        return sidecar.get(rel, sidecar.get(video.name))
    txt = video.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return txt.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {txt} is not UTF-8 text (byte {e.start}: {e.reason})") from None


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


def decode_media(path: Path, **kw):
    """The clips of a video (`decode_clips(path, **kw)`), or an image's one clip (`decode_image`).
    Lazy either way: a file that cannot be read raises when its clips are read, where the
    caller skips and counts it."""
    if is_image(path):
        return _image_clip(path, kw)
    return decode_clips(path, **kw)


def _image_clip(path: Path, kw: dict):
    yield decode_image(path, kw["multiple"], kw["max_area"], kw["temporal"], kw["pt"])


# -- decode workers ---------------------------------------------------------------------------
def _worker_init() -> None:
    torch.set_num_threads(1)


def _decode(v: Path, **kw):
    """(clips, '') or (None, error message) for one video: runs in a decode worker, which
    hands back one video's clips (at most `data.max_clips`)."""
    try:
        return list(decode_media(v, **kw)), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure: log, count, skip the file
        return None, _why(e)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


WORKER_DIED = "the decode worker died (killed, e.g. out of memory)"


def _pooled(videos: list[Path], decode: dict, workers: int) -> Iterator[tuple[Iterator, str]]:
    """(clips, error) per video, in order, decoded by `workers` processes with at most
    2 x workers videos in flight. A worker killed mid-video (the OOM killer) breaks the
    pool: a fresh pool decodes the first video that did not come back on its own; if that
    breaks the pool again the video is reported, and either way the rest go on. Never hangs."""
    fn = functools.partial(_decode, **decode)
    i, alone = 0, False
    while i < len(videos):
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_init)
        futures: dict[int, Future] = {}
        try:
            while i < len(videos):
                ahead = 1 if alone else 2 * workers
                try:
                    for j in range(i, min(i + ahead, len(videos))):
                        if j not in futures:
                            futures[j] = pool.submit(fn, videos[j])
                    clips, msg = futures.pop(i).result()
                except BrokenProcessPool:
                    if alone:  # it broke the pool by itself: this video is the cause
                        yield iter(()), WORKER_DIED
                        i, alone = i + 1, False
                    else:  # one of the videos in flight killed its worker: retry this one alone
                        alone = True
                    break
                yield iter(clips or ()), msg
                i, alone = i + 1, False
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# -- the pipeline -----------------------------------------------------------------------------
def prepare(src: str | Path, out: str | Path, data: PrepareArgs, *, channels: int, patch, progress: bool = True,
            device: str = "cpu", workers: int = 0, part: tuple[int, int] | None = None) -> dict:
    """Prepare SRC into shards under OUT; returns the index (plus a summary).

    `data` is a recipe's data section (its `PrepareArgs` part, data/args.py: encoder, text_encoder,
    clip_frames, fps, max_area, max_clips, shard_max_bytes, captions); `channels` and
    `patch` are the model's latent channels and (pt, ph, pw) patch, which the clips' sizes
    and the latent encoder must fit. `part=(i, n)` prepares every n-th video from i.

    Clips are encoded to latents as they arrive, so at most one clip's pixels per video is
    held here (in-process decoding) and only latents wait for their caption batch. Shards are
    written under temporary names and renamed, with the index last, only when every video is
    done: an interrupted prepare leaves an earlier set in OUT as it was. Raises ValueError
    when no video gave a sample (for a `part`, when the merged parts hold none).
    """
    src, out, d = Path(src), Path(out), data
    videos = find_videos(src)
    if not videos:
        raise ValueError(f"{src}: no video or image files (looked for mp4, webm, mkv, mov, avi, gif, m4v, "
                         f"jpg, jpeg, png, webp)")
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
    pending: list = []  # (video, [(latent, meta)], caption): captions are encoded in batches

    def encode(c) -> tuple[torch.Tensor, dict]:
        x = torch.from_numpy(np.ascontiguousarray(c.frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        T, H, W = c.frames.shape[:3]
        meta = {"fps": c.fps, "orig_size": list(c.orig_size), "size": [H, W], "frame_range": [c.start, c.start + T]}
        return enc.encode(x)[0].cpu(), {**meta, "image": True} if c.image else meta  # latent C T' H' W'

    def flush() -> None:
        texts = text.encode([cap for _, _, cap in pending])
        for (v, latents, caption), text_LD in zip(pending, texts):
            rel = str(v.relative_to(src)) if src.is_dir() else v.name
            for latent, meta in latents:
                writer.write(latent, text_LD, {"caption": caption, "source": rel, **meta})
        pending.clear()

    decode = dict(clip_frames=d.clip_frames, multiple=multiple, fps=d.fps, max_area=d.max_area,
                  max_clips=d.max_clips, temporal=enc.temporal, pt=pt)
    if workers > 1:  # decoding is the CPU-heavy part; results come in order, so shards do not depend on it
        results = _pooled(videos, decode, workers)
    else:
        results = ((decode_media(v, **decode), "") for v in videos)  # streamed: errors surface as clips are read
    bar = tqdm(zip(videos, results), total=len(videos), desc="prepare", unit="video", disable=not progress,
               file=sys.stderr)
    try:
        for v, (clips, msg) in bar:
            latents: list = []
            try:  # one clip's pixels at a time (map keeps no reference to the clip before)
                latents.extend(map(encode, clips))
            except Exception as e:  # noqa: BLE001 - a decoder failure (in this process): log, count, skip
                msg, latents = _why(e), []
            if msg:
                failed.append({"file": str(v), "error": msg})
                print(f"vidscale prepare: skipped unreadable video {v}: {msg}", file=sys.stderr)
                continue
            if not latents:
                failed.append({"file": str(v), "error": "shorter than one frame group"})
                continue
            try:
                caption = caption_for(v, src, sidecar)
            except ValueError as e:  # an unreadable caption: the video is skipped and counted like one
                failed.append({"file": str(v), "error": str(e)})
                print(f"vidscale prepare: skipped {v}: {e}", file=sys.stderr)
                continue
            if caption is None:
                uncaptioned += 1
                caption = ""
            pending.append((v, latents, caption))
            if len(pending) >= text.batch_size:
                flush()
            bar.set_postfix(samples=writer.count, failed=len(failed))
        flush()
    except BaseException:
        writer.abort()  # the temporary shards go; an earlier set in OUT stays as it was
        raise
    finally:
        bar.close()
    if writer.count == 0 and part is None:  # a part may be empty; `merge_parts` checks the whole
        writer.abort()
        why = "; ".join(f"{Path(f['file']).name}: {f['error']}" for f in failed[:3])
        raise ValueError(f"{src}: nothing prepared, none of {len(videos)} video(s) gave a sample ({why}"
                         f"{'; ...' if len(failed) > 3 else ''})")
    images = sum(map(is_image, videos))
    index = writer.close(videos=len(videos) - images, images=images, failed=len(failed), failed_files=failed,
                         uncaptioned=uncaptioned)
    index["seconds"] = time.perf_counter() - t0
    return index
