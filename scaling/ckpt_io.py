"""Checkpoint storage: atomic directories, manifests, the `latest` pointer, retention.

    RUN_DIR/checkpoints/
        step_00000040/         committed: manifest.json lists every other file (size, sha256)
        step_00000020/
        latest                 "step_00000040", replaced atomically after each commit
        .tmp-step_00000060/    a save in progress (or one that was killed): never read

Commit protocol, for any number of ranks on a shared filesystem:
 1. rank 0 creates `.tmp-TAG` (removing stale temporaries); all ranks wait for it.
 2. every rank writes its own files into it, each flushed and fsynced (DeepSpeed writes
    its shards there too).
 3. every rank hashes a stripe of all the files and writes `.part-RANK.json`.
 4. rank 0 waits for all parts, writes `manifest.json` (fsync), renames `.tmp-TAG` to
    `TAG`, fsyncs the parent directory, then replaces `latest`, then applies retention.
A `step_*` directory therefore only ever exists complete; verifying it against its
manifest catches later damage (a truncated, altered or missing file) and names the file.
Nothing here unpickles: manifests and pointers are JSON/text.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
FAULT_ENV = "VIDSCALE_CKPT_FAULT"
"""Fault injection for the fault tests: 'enospc@STEP' makes the first file write of the save
at STEP fail with ENOSPC; 'hang@STEP' sleeps forever after that save's first file (so a test
can kill -9 the process mid-save). Unset in normal runs."""


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the path."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    m = _TAG_RE.match(name)
    return int(m.group(1)) if m else None


# -- writing ---------------------------------------------------------------------------
_fault_armed: dict = {"step": None}


def arm_faults(step: int) -> None:
    """Called once per save; enables the injected fault (if any) for this save's step."""
    _fault_armed["step"] = step


def _maybe_fault(path: Path, after: bool = False) -> None:
    """The injected fault, if armed for this save: ENOSPC before the first write, or a hang
    after it (so the temporary directory holds a partial checkpoint when the test kills us)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or _fault_armed["step"] is None:
        return
    kind, _, at = spec.partition("@")
    if (at and int(at) != _fault_armed["step"]) or after != (kind == "hang"):
        return
    _fault_armed["step"] = None  # fire once
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if kind == "hang":
        time.sleep(1e9)


def _fail(path: Path, e: BaseException) -> CheckpointError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return CheckpointError(f"checkpoint: cannot write {path}: {why}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    try:
        _maybe_fault(path)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _maybe_fault(path, after=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise _fail(path, e) from e


def write_json(path: Path, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def write_with(path: Path, writer) -> None:
    """`writer(path)` writes the file its own way (safetensors, DeepSpeed); then fsync."""
    try:
        _maybe_fault(path)
        writer(path)
        fsync_path(path)
        _maybe_fault(path, after=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise _fail(path, e) from e


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _files(d: Path) -> list[str]:
    """Every regular file under d, relative, sorted; the manifest and markers excluded."""
    out = []
    for p in d.rglob("*"):
        rel = p.relative_to(d)
        # dotfiles are the protocol's own markers (.done-, .part-, .failed-)
        if p.is_file() and rel.as_posix() != MANIFEST and not any(c.startswith(".") for c in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


# -- the commit protocol -------------------------------------------------------------------
def tmp_dir(root: Path, tag: str) -> Path:
    return root / f".tmp-{tag}"


def prepare(root: Path, tag: str) -> Path:
    """Rank 0: a fresh temporary directory for `tag`; stale temporaries are removed."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".del-*"):
            shutil.rmtree(p, ignore_errors=True)
        t = tmp_dir(root, tag)
        t.mkdir()
        return t
    except OSError as e:
        raise _fail(tmp_dir(root, tag), e) from e


def hash_part(tmp: Path, rank: int, world: int) -> None:
    """Every rank: hash files[rank::world] of the temporary directory into .part-RANK.json."""
    files = _files(tmp)
    mine = files[rank::world]
    # hashlib releases the GIL on large buffers: hash files in parallel threads
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
        digests = list(ex.map(lambda rel: sha256_file(tmp / rel), mine))
    part = {rel: {"size": (tmp / rel).stat().st_size, "sha256": h} for rel, h in zip(mine, digests)}
    write_json(tmp / f".part-{rank:05d}.json", {"files": files, "entries": part})


def commit(root: Path, tmp: Path, tag: str, world: int, meta: dict, timeout_s: float = 300) -> Path:
    """Rank 0: merge the parts into the manifest, rename into place, move `latest`."""
    parts = [tmp / f".part-{r:05d}.json" for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in parts):  # a rank that died never writes its part
        if time.monotonic() > deadline:
            missing = [p.name for p in parts if not p.exists()]
            raise CheckpointError(f"checkpoint: {tmp}: ranks did not finish their files within "
                                  f"{timeout_s:.0f} s (missing {missing[:4]})")
        time.sleep(0.01)
    entries: dict = {}
    for p in parts:
        entries.update(json.loads(p.read_text())["entries"])
    files = _files(tmp)
    assert sorted(entries) == files, (sorted(entries), files)
    write_json(tmp / MANIFEST, {"tag": tag, "meta": meta, "files": entries})
    # every rank has written its part, so none is still waiting on the .done markers
    for p in parts + sorted(tmp.glob(".done-*")):
        p.unlink()
    final = root / tag
    try:
        if final.exists():  # re-saving a step (e.g. the end of a run that just saved): replace
            final.rename(root / f".del-{tag}")
        fsync_path(tmp)
        tmp.rename(final)
        fsync_path(root)
    except OSError as e:
        raise _fail(final, e) from e
    shutil.rmtree(root / f".del-{tag}", ignore_errors=True)
    set_latest(root, tag)
    return final


def set_latest(root: Path, tag: str) -> None:
    tmp = root / ".latest.tmp"
    write_bytes(tmp, (tag + "\n").encode())
    try:
        os.replace(tmp, root / LATEST)
        fsync_path(root)
    except OSError as e:
        raise _fail(root / LATEST, e) from e


def read_latest(root: Path) -> str | None:
    p = root / LATEST
    return p.read_text().strip() if p.exists() else None


def retain(root: Path, keep_last: int, keep_every: int, protect: str) -> list[str]:
    """Delete committed checkpoints that are neither among the last `keep_last` nor at a
    multiple of `keep_every`; `protect` (the one just committed) always stays."""
    ckpts = committed(root)
    keep = {t for _, t in ckpts[-max(keep_last, 1):]} | {protect}
    if keep_every > 0:
        keep |= {t for s, t in ckpts if s % keep_every == 0}
    removed = []
    for _, t in ckpts:
        if t not in keep:
            # rename first: a half-deleted directory must never look like a checkpoint
            trash = root / f".del-{t}"
            (root / t).rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(root / ".universal" / t, ignore_errors=True)  # its cached conversion
            removed.append(t)
    return removed


# -- reading ---------------------------------------------------------------------------
def committed(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every step_* directory, oldest first."""
    if not root.is_dir():
        return []
    out = [(step_of(p.name), p.name) for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(out)  # type: ignore[arg-type]


def read_manifest(ckpt: Path) -> dict:
    p = ckpt / MANIFEST
    if not p.is_file():
        raise CorruptCheckpoint(f"checkpoint {ckpt}: incomplete, {MANIFEST} is missing")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint {ckpt}: {p} is unreadable: {e}") from None


def verify(ckpt: Path, hashes: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Check the files (this rank's stripe of them) against the manifest; returns it.
    Raises CorruptCheckpoint naming the first file that is missing, resized or altered."""
    man = read_manifest(ckpt)
    mine = sorted(man["files"])[rank::world]
    for rel in mine:  # cheap checks first
        e = man["files"][rel]
        p = ckpt / rel
        if not p.is_file():
            raise CorruptCheckpoint(f"checkpoint {ckpt}: file {p} is missing")
        size = p.stat().st_size
        if size != e["size"]:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: file {p} has {size} bytes, the manifest "
                                    f"says {e['size']} (truncated or partial)")
    if hashes:
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
            digests = list(ex.map(lambda rel: sha256_file(ckpt / rel), mine))
        for rel, h in zip(mine, digests):
            if h != man["files"][rel]["sha256"]:
                raise CorruptCheckpoint(f"checkpoint {ckpt}: file {ckpt / rel} does not match its sha256 "
                                        "in the manifest (altered or corrupt)")
    return man


def find_latest(root: Path, report=print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported."""
    for _, tag in reversed(committed(root)):
        try:
            verify(root / tag)
            return root / tag
        except CorruptCheckpoint as e:
            report(f"{e}; falling back to the previous checkpoint")
    return None
