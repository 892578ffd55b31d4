"""webdataset shards of video latents, their index, and reading them back.

A sample in a tar shard is three members sharing a key:
    KEY.safetensors  tensors "latent" [C, T, H, W] and "text" [Lt, Dt], bf16 (exact bytes)
    KEY.json         caption, source file, fps, original (H, W), frame range, shapes
    KEY.txt          the caption (for people reading the tar)
Shards roll over once they pass `max_bytes` (so a shard can exceed it by one sample).
`OUT/index.json` lists per shard the sample keys, latent shapes (T, H, W) and token counts
(at the patch used when preparing), so the packer and the loader plan without decoding:

    {"version": 1, "samples": N, "shards": [{"name", "samples", "keys", "shapes", "tokens"}],
     "channels": C, "text_dim": Dt, "patch": [pt, ph, pw], "encoder", "text_encoder", ...}
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Iterator

import torch

from vidscale.data import packing

INDEX = "index.json"
EXTS = ("safetensors", "json")  # members a complete sample must have
# What `ShardWriter` names its shards. Anything else is refused: webdataset opens a name
# like `pipe:cmd` through the shell and `http:`/`gs:` ones through curl/gsutil.
SHARD_NAME = re.compile(r"shard-(\d{5}-)?\d{6}\.tar")


def encode_sample(latent_CTHW: torch.Tensor, text_LD: torch.Tensor, meta: dict) -> dict[str, bytes]:
    from safetensors.torch import save

    st = save({"latent": latent_CTHW.to(torch.bfloat16).contiguous(), "text": text_LD.to(torch.bfloat16).contiguous()})
    return {"safetensors": st, "json": json.dumps(meta).encode(), "txt": meta.get("caption", "").encode()}


def decode_sample(raw: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Raw tar members -> (latent bf16 [C,T,H,W], text bf16 [Lt,Dt], meta). Raises on bad bytes."""
    from safetensors.torch import load

    missing = [e for e in EXTS if e not in raw]
    if missing:
        raise ValueError(f"sample {raw.get('__key__')!r} lacks {missing} (truncated shard?)")
    t = load(raw["safetensors"])
    return t["latent"], t["text"], json.loads(raw["json"])


TMP = ".tmp"
"""Suffix of a shard still being written (`shard-000000.tar.tmp`)."""


class ShardWriter:
    """Writes samples into rolling `shard-NNNNNN.tar` files and `index.json` on close.

    `part=(i, n)` (one of n preparations running in parallel, e.g. a Slurm array) writes
    `shard-IIIII-NNNNNN.tar` and `index-IIIII-of-NNNNN.json`; `merge_parts` joins them.

    Shards are written as `NAME.tar.tmp` and only `close()` gives them their names, the index
    last, so an interrupted prepare into an OUT that holds an earlier set leaves that set
    as it was (`abort()` removes the temporary files; a killed run's are removed by the next
    writer). `close()` removes the old index before renaming the shards over the old ones: a
    kill inside that step leaves no index (the loader refuses OUT) rather than an index
    naming shards it did not write."""

    def __init__(self, out: str | Path, max_bytes: int, patch, info: dict | None = None,
                 part: tuple[int, int] | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.patch, self.info = max_bytes, tuple(patch), dict(info or {})
        self.prefix = "shard-" if part is None else f"shard-{part[0]:05d}-"
        self.index_name = INDEX if part is None else part_index_name(*part)
        self.shards: list[dict] = []
        self._f = self._tar = None
        self.count = 0
        for left in self.out.glob(f"{self.prefix}*.tar{TMP}"):  # a killed run's
            left.unlink()

    def _roll(self) -> None:
        import webdataset as wds

        self._close_tar()
        name = f"{self.prefix}{len(self.shards):06d}.tar"
        self._f = open(self.out / (name + TMP), "wb")
        self._tar = wds.TarWriter(self._f, encoder=False, mtime=0.0)  # byte-reproducible shards
        self.shards.append({"name": name, "samples": 0, "keys": [], "shapes": [], "tokens": []})

    def _close_tar(self) -> None:
        if self._tar is not None:
            path = Path(self._f.name)
            self._tar.close()  # writes the archive's end blocks and closes the file
            self._tar = self._f = None
            fsync_path(path)  # on disk, end blocks too, before the rename that publishes it

    def write(self, latent_CTHW: torch.Tensor, text_LD: torch.Tensor, meta: dict) -> str:
        if self._tar is None or self._f.tell() >= self.max_bytes:
            self._roll()
        key = f"{self.count:09d}"
        _, T, H, W = latent_CTHW.shape
        meta = {**meta, "shape": list(latent_CTHW.shape), "text_len": int(text_LD.shape[0])}
        self._tar.write({"__key__": key, **encode_sample(latent_CTHW, text_LD, meta)})
        s = self.shards[-1]
        s["samples"] += 1
        s["keys"].append(key)
        s["shapes"].append([T, H, W])
        s["tokens"].append(tokens_of((T, H, W), self.patch))
        self.count += 1
        return key

    def abort(self) -> None:
        """Drop what this writer wrote; OUT keeps whatever it held before."""
        if self._tar is not None:
            self._tar.close()
            self._tar = self._f = None
        for s in self.shards:
            (self.out / (s["name"] + TMP)).unlink(missing_ok=True)
        self.shards = []

    def close(self, **extra) -> dict:
        self._close_tar()
        index = {"version": 1, "samples": self.count, "shards": self.shards, "patch": list(self.patch),
                 **self.info, **extra}
        (self.out / self.index_name).unlink(missing_ok=True)  # the old index names the old shards
        for s in self.shards:
            os.replace(self.out / (s["name"] + TMP), self.out / s["name"])
        _write_atomic(self.out / self.index_name, index)
        written = {s["name"] for s in self.shards}
        for stale in self.out.glob(f"{self.prefix}*.tar"):  # left by an earlier, larger prepare into OUT
            if stale.name not in written and len(stale.name) == len(self.prefix) + 10:
                stale.unlink()
        return index


def fsync_path(path: Path) -> None:
    """A file's or folder's contents and entries on disk (what a later rename publishes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, obj: dict) -> None:
    """Publish an index: its bytes on disk, then the rename (a reader never sees half an
    index), then the folder, so a node that loses power right after does not come back
    with an empty one or with shards that the index does not name."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    fsync_path(tmp)
    tmp.replace(path)
    fsync_path(path.parent)


def part_index_name(i: int, n: int) -> str:
    return f"index-{i:05d}-of-{n:05d}.json"


def merge_parts(out: str | Path, n: int) -> dict | None:
    """Join the indexes of n parts into OUT/index.json once all n exist (else None). Every
    part runs this when it ends: the last one merges (concurrent merges write the same)."""
    out = Path(out)
    paths = [out / part_index_name(i, n) for i in range(n)]
    if not all(p.is_file() for p in paths):
        return None
    parts = [json.loads(p.read_text()) for p in paths]
    for k in ("channels", "text_dim", "patch", "encoder", "text_encoder", "clip_frames"):
        if len({json.dumps(p.get(k)) for p in parts}) > 1:
            raise ValueError(f"{out}: parts disagree on {k!r} ({[p.get(k) for p in parts]}): prepare them "
                             f"with the same settings")
    index = {**parts[0], "shards": [s for p in parts for s in p["shards"]], "parts": n}
    for k in ("samples", "videos", "images", "failed", "uncaptioned"):
        index[k] = sum(p.get(k, 0) for p in parts)
    index["failed_files"] = [f for p in parts for f in p.get("failed_files", [])]
    if index["samples"] == 0:
        raise ValueError(f"{out}: nothing prepared, none of the {index.get('videos', 0)} video(s) of the "
                         f"{n} parts gave a sample")
    _write_atomic(out / INDEX, index)
    return index


def tokens_of(shape_THW, patch) -> int:
    T, H, W = shape_THW
    pt, ph, pw = patch
    return (T // pt) * (H // ph) * (W // pw)


def read_index(root: str | Path, key: str = "data.source") -> dict:
    """The index of the shards under `root`; `key` is the recipe key errors name."""
    p = Path(root) / INDEX
    if not Path(root).is_dir():
        raise ValueError(f"{key} = {str(root)!r}: no such directory (expected shards from 'vidscale prepare')")
    if not p.is_file():
        raise ValueError(f"{key} = {str(root)!r}: no {INDEX} there (expected shards from 'vidscale prepare')")
    try:
        index = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if "shards" not in index or "samples" not in index:
        raise ValueError(f"{p}: expected keys 'samples' and 'shards'")
    names: set[str] = set()
    total = 0
    for s in index["shards"]:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise ValueError(f"{p}: shard name {name!r} is not a file name like 'shard-000000.tar' "
                             f"in this folder")
        if name in names:
            raise ValueError(f"{p}: shard {name} is listed twice")
        names.add(name)
        _check_shard_entry(p, s)
        total += s["samples"]
    if index["samples"] != total:
        raise ValueError(f"{p}: 'samples' is {index['samples']!r} but its shards list {total} samples")
    return index


def _check_shard_entry(p: Path, s: dict) -> None:
    """One shard of an index: its `samples` count agrees with its keys and shapes (the loader
    plans from the count and reads by key: a mismatch would repeat or drop samples silently),
    keys are unique and every shape is three positive integers."""
    name, n, keys, shapes = s["name"], s.get("samples"), s.get("keys"), s.get("shapes")
    if not isinstance(keys, list) or not isinstance(shapes, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{p}: shard {name}: expected lists 'keys' (strings) and 'shapes'")
    if not isinstance(n, int) or isinstance(n, bool) or not n == len(keys) == len(shapes):
        raise ValueError(f"{p}: shard {name}: 'samples' is {n!r} but it lists {len(keys)} keys and "
                         f"{len(shapes)} shapes (expected the same number)")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{p}: shard {name}: a sample key is listed twice")
    for k, shp in zip(keys, shapes):
        if not (isinstance(shp, list) and len(shp) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shp)):
            raise ValueError(f"{p}: shard {name}: sample {k!r} has shape {shp!r} (expected [T, H, W], "
                             f"positive integers)")


def check_source(root: str | Path, *, patch, channels: int | None = None, text_dim: int | None = None,
                 tokens_per_batch: int = 0, drop_tokens: float = 0.0, drop_min_tokens: int = 0,
                 key: str = "data.source") -> dict:
    """Pre-flight for the shards under `root` (`data.source`): index present, latents of
    `channels` (`model.in_channels`) and text of width `text_dim` (`model.text_dim`) when
    given, shapes divisible by `patch`, and no sample over `tokens_per_batch` after token
    dropping (0: no budget). Returns the index; raises ValueError with one line naming `key`."""
    index = read_index(root, key)
    src = str(root)
    if index.get("samples", 0) < 1:
        raise ValueError(f"{key} = {src!r}: the index holds no samples")
    C, D = index.get("channels"), index.get("text_dim")
    if channels is not None and C is not None and C != channels:
        raise ValueError(f"{key} = {src!r} holds {C}-channel latents but model.in_channels = "
                         f"{channels}: set model.in_channels={C}")
    if text_dim is not None and D is not None and D != text_dim:
        raise ValueError(f"{key} = {src!r} holds {D}-wide text tokens but model.text_dim = "
                         f"{text_dim}: set model.text_dim={D}")
    pt, ph, pw = patch
    for s in index["shards"]:
        for key, (T, H, W) in zip(s["keys"], s["shapes"]):
            if T % pt or H % ph or W % pw:
                raise ValueError(f"{key} = {src!r}: a latent of shape T,H,W={T},{H},{W} in {s['name']} "
                                 f"is not divisible by model.patch={list(patch)}")
            n = packing.drop_tokens(tokens_of((T, H, W), patch), drop_tokens, drop_min_tokens)
            if tokens_per_batch and n > tokens_per_batch:
                raise packing.too_long(f"{s['name']}:{key}", n, tokens_per_batch)
    return index


class ShardSource:
    """Samples of prepared shards, addressed by global id (position in the index).

    `order(epoch)` is the epoch's global sample order: shards shuffled by (seed, epoch),
    samples in tar order inside a shard, so a contiguous run of the order is a sequential
    read. `stream(ids)` reads those ids in that order and yields (id, sample or None, error).
    """

    def __init__(self, root: str | Path, *, seed: int, patch, channels: int | None = None,
                 text_dim: int | None = None, tokens_per_batch: int = 0, drop_tokens: float = 0.0,
                 drop_min_tokens: int = 0, key: str = "data.source", label: str = ""):
        """seed: `train.seed` (shard order per epoch); patch: the model's (token counts);
        the rest is `check_source`'s pre-flight (None / 0: not checked; `key` names the source);
        `label` prefixes sample names (`LABEL/shard-000000.tar:KEY`: a mixture's source)."""
        self.root = Path(root)
        self.label = f"{label}/" if label else ""
        self.index = check_source(root, patch=patch, channels=channels, text_dim=text_dim,
                                  tokens_per_batch=tokens_per_batch, drop_tokens=drop_tokens,
                                  drop_min_tokens=drop_min_tokens, key=key)
        self.patch = tuple(patch)
        self.seed = seed
        self.shard_of: list[int] = []
        self.key_of: list[str] = []
        self._tokens: list[int] = []
        self.first: list[int] = []  # global id of each shard's first sample
        for si, s in enumerate(self.index["shards"]):
            self.first.append(len(self.key_of))
            for k, shp in zip(s["keys"], s["shapes"]):
                self.shard_of.append(si)
                self.key_of.append(k)
                self._tokens.append(tokens_of(shp, self.patch))
        self.n = len(self.key_of)

    def __len__(self) -> int:
        return self.n

    def tokens(self, i: int) -> int:
        return self._tokens[i]

    def fingerprint(self) -> str:
        """Identifies the shard set (names, keys, shapes): a loader state only fits its own data."""
        desc = [(s["name"], s["keys"], s["shapes"]) for s in self.index["shards"]]
        return "shards:" + hashlib.sha1(json.dumps(desc).encode()).hexdigest()[:16]

    def name(self, i: int) -> str:
        return f"{self.label}{self.index['shards'][self.shard_of[i]]['name']}:{self.key_of[i]}"

    def order(self, epoch: int) -> list[int]:
        shards = list(range(len(self.index["shards"])))
        random.Random(self.seed * 7919 + epoch).shuffle(shards)
        return [self.first[s] + j for s in shards for j in range(self.index["shards"][s]["samples"])]

    def stream(self, ids: list[int]) -> Iterator[tuple[int, tuple | None, str]]:
        """Read `ids` (grouped by shard, tar order inside a shard, as `order` gives them).
        Samples not wanted are dropped before decoding. Missing or undecodable samples come
        out as (id, None, reason), in order, so the caller can count them."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        groups: list[tuple[int, list[int]]] = []
        for i in ids:
            if not groups or groups[-1][0] != self.shard_of[i]:
                groups.append((self.shard_of[i], []))
            groups[-1][1].append(i)
        for si, gids in groups:
            path = self.root / self.index["shards"][si]["name"]
            want = {self.key_of[i]: i for i in gids}
            errors: list[str] = []

            def handler(exn: Exception) -> bool:  # webdataset's own handlers sleep 0.5 s per warning
                errors.append(f"{type(exn).__name__}: {exn}")
                return True
            seen: set[str] = set()
            pending = list(gids)  # in tar order
            def select(fname: str, want=want) -> bool:  # other ranks'/workers' samples: never extracted
                return fname.split(".", 1)[0] in want
            # the file is opened here, never by webdataset's URL opener: that runs a name like
            # `pipe:CMD` through the shell, and the folder is the user's (`data.source`)
            try:
                f = open(path, "rb")
            except OSError as e:
                errors.append(f"{type(e).__name__}: {e}")
                f = None
            try:
                files = tar_file_expander([{"url": str(path), "stream": f}] if f else [], handler=handler,
                                          select_files=select)
                for raw in group_by_keys(files, handler=handler):
                    key = raw.get("__key__")
                    if key not in want or key in seen:
                        continue
                    seen.add(key)
                    i = want[key]
                    while pending and pending[0] != i:  # earlier wanted keys never came: gone
                        gone = pending.pop(0)
                        yield gone, None, f"{self.name(gone)}: missing from the tar"
                    if pending:
                        pending.pop(0)
                    try:
                        yield i, self._checked(i, decode_sample(raw)), ""
                    except Exception as e:  # noqa: BLE001 - any bad bytes: skip or fail by data.on_error
                        yield i, None, f"{self.name(i)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            finally:
                if f is not None:
                    f.close()
            why = errors[0] if errors else "missing from the tar"
            for i in pending:
                yield i, None, f"{self.name(i)}: {why}"

    def _checked(self, i: int, sample: tuple) -> tuple:
        """The decoded sample is what the index promised (the packer planned with the index's
        token counts): a latent [C, T, H, W] of the index's shape and channels, text [L, Dt]."""
        latent, text, _ = sample
        T, H, W = self.shape(i)
        C, D = self.index.get("channels"), self.index.get("text_dim")
        if latent.ndim != 4 or tuple(latent.shape[1:]) != (T, H, W) or (C is not None and latent.shape[0] != C):
            raise ValueError(f"latent of shape {list(latent.shape)}, but the index says "
                             f"[{C if C is not None else 'C'}, {T}, {H}, {W}]")
        if text.ndim != 2 or (D is not None and text.shape[1] != D):
            raise ValueError(f"text of shape {list(text.shape)}, but the index says [L, {D}]")
        return sample

    def shape(self, i: int) -> tuple[int, int, int]:
        """The latent's (T, H, W) of global id `i`, from the index."""
        si = self.shard_of[i]
        return tuple(self.index["shards"][si]["shapes"][i - self.first[si]])

    def load_one(self, i: int):
        """Random access to one sample (reads its shard up to it): for tools, not the loader."""
        for _, s, err in self.stream([i]):
            if s is None:
                raise ValueError(err)
            return s
