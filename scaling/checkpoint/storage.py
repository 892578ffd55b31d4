"""Checkpoint storage: atomic directories, manifests, the `latest` pointer, retention.

    RUN_DIR/checkpoints/
        step_00000040/         committed: manifest.json lists every other file (size, checksum)
        step_00000020/
        latest                 "step_00000040", replaced atomically after each commit
        .tmp-step_00000060/    a save in progress (or one that was killed): never read

Commit protocol, for any number of ranks on a shared filesystem:
 1. rank 0 creates `.tmp-TAG` (removing stale temporaries); all ranks wait for it.
 2. every rank writes its own files into it, each hashed as its bytes go out (no second
    read), then flushed and fsynced. DeepSpeed writes its shards through the same writer
    (`scaling/checkpoint/zero.py` plugs it in as DeepSpeed's checkpoint engine).
 3. every rank writes `.part-RANK.json`: size and checksum of each file it wrote.
 4. rank 0 waits for all parts, hashes any file no rank recorded (a library's own copy),
    writes `manifest.json` (fsync), renames `.tmp-TAG` to `TAG`, fsyncs the parent
    directory, then replaces `latest`, then applies retention (old checkpoints are renamed
    away at once and deleted in the background).
    Re-saving a step that is already committed swaps the two directories in one step
    (renameat2 RENAME_EXCHANGE), so `TAG` is never absent; where the filesystem cannot (NFS),
    the old one is renamed to `.old-TAG` first and put back by the next save or resume if the
    process died before the new one took its place.
A `step_*` directory therefore only ever exists complete; verifying it against its
manifest catches later damage (a truncated, altered or missing file) and names the file.
Nothing here unpickles: manifests and pointers are JSON/text.

Checksums: xxh3-128 by default (~20 GB/s on one core, so hashing costs a few percent of a
save; it detects truncation, bit flips and torn writes, not deliberate tampering), or
sha256 with `checkpoint.checksum=sha256` (~1.6 GB/s with SHA extensions). A manifest
names its algorithm per file, so either verifies regardless of the current setting.
"""
from __future__ import annotations

import copy as copy_
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vidscale.data.shards import fsync_path
from vidscale.scaling.config import CHECKSUMS, CheckpointArgs

MANIFEST = "manifest.json"
UNIVERSAL = ".universal"
LATEST = "latest"
_TAG_RE = re.compile(r"step_(\d{8,})")
OLD = ".old-"  # a committed save being replaced, for the moment between two renames
FAULT_ENV = "VIDSCALE_CKPT_FAULT"
"""Fault injection for the fault tests: 'enospc@STEP' makes the first file write of the save
at STEP fail with ENOSPC; 'hang@STEP' sleeps forever after that save's first file (so a test
can kill -9 the process mid-save); 'mkdir@STEP' makes creating that save's temporary
directory fail (ENOSPC); 'commit@STEP' makes rank 0's commit of that save fail (ENOSPC, a
failure no other rank sees). Unset in normal runs."""


_algo = {"name": CheckpointArgs.checksum}  # until set_checksum: checkpoint.checksum's default


def set_checksum(name: str) -> None:
    """The algorithm for files written from now on (`checkpoint.checksum`)."""
    if name not in CHECKSUMS:
        raise ValueError(f"checkpoint.checksum: unknown algorithm {name!r}, expected one of {sorted(CHECKSUMS)}")
    _algo["name"] = name


def checksum_name() -> str:
    return _algo["name"]


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the path."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    m = _TAG_RE.fullmatch(name)
    return int(m.group(1)) if m else None


# -- writing ---------------------------------------------------------------------------
_fault_armed: dict = {"step": None}


def arm_faults(step: int) -> None:
    """Called once per save; enables the injected fault (if any) for this save's step."""
    _fault_armed["step"] = step


_FAULT_STAGE = {"enospc": "write", "hang": "after", "mkdir": "mkdir", "commit": "commit"}


def _maybe_fault(path: Path, stage: str = "write") -> None:
    """The injected fault, if armed for this save and meant for this stage: ENOSPC before the
    first write ('write') or when creating the temporary directory ('mkdir'), or a hang after
    the first write ('after': the directory holds a partial checkpoint when the test kills us)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or _fault_armed["step"] is None:
        return
    kind, _, at = spec.partition("@")
    if (at and int(at) != _fault_armed["step"]) or _FAULT_STAGE.get(kind) != stage:
        return
    _fault_armed["step"] = None  # fire once
    if kind == "hang":
        time.sleep(1e9)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail(path: Path, e: BaseException) -> CheckpointError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return CheckpointError(f"checkpoint: cannot write {path}: {why}")


def replace_durably(tmp: Path, path: Path) -> None:
    """Publish a finished file: its bytes on disk, then the rename, then the rename on disk, so
    that a node that loses power right after never shows `path` empty or half written."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


# Size and checksum of every file this process wrote, recorded as the bytes went out:
# absolute path -> {"size": n, ALGORITHM: hex}. A save's `write_part` takes its directory's.
_written: dict[str, dict] = {}
_written_lock = threading.Lock()


def _record(path: Path, size: int, h) -> None:
    with _written_lock:
        _written[str(path.absolute())] = {"size": size, checksum_name(): h.hexdigest()}


def forget(under: Path) -> dict[str, dict]:
    """Take (and drop) the records of files under `under`: {relative path: entry}."""
    root = str(under.absolute()) + os.sep
    with _written_lock:
        mine = {k: v for k, v in _written.items() if k.startswith(root)}
        for k in mine:
            del _written[k]
    return {k[len(root):].replace(os.sep, "/"): v for k, v in mine.items()}


def recorded(path: Path) -> bool:
    with _written_lock:
        return str(path.absolute()) in _written


class _HashingWriter:
    """A binary file that hashes what passes through it (what torch.save writes to)."""

    def __init__(self, f):
        self.f, self.h, self.size = f, CHECKSUMS[checksum_name()](), 0
        self.error: OSError | None = None  # torch's C++ writer reports ours as a position mismatch

    def write(self, b) -> int:
        self.h.update(b)
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()


def write_stream(path: Path, fill) -> None:
    """`fill(f)` writes the file through `f` (e.g. `torch.save(obj, f)`); hashed on the way,
    then flushed and fsynced. Errors name the path."""
    try:
        _maybe_fault(path)
        with open(path, "wb") as raw:
            w = _HashingWriter(raw)
            try:
                fill(w)
                raw.flush()
            except Exception as e:
                raise (w.error or e) from None  # the OS's own words (e.g. no space left), not torch's
            os.fsync(raw.fileno())
        _record(path, w.size, w.h)
        _maybe_fault(path, stage="after")
    except CheckpointError:
        raise
    except Exception as e:
        raise _fail(path, e) from e


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    write_stream(path, lambda f: f.write(data))


def write_json(path: Path, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def write_with(path: Path, writer) -> None:
    """`writer(path)` writes the file its own way (safetensors); then fsync, then the checksum
    (read back from the page cache the write just filled)."""
    try:
        _maybe_fault(path)
        writer(path)
        fsync_path(path)
        h, size = digest_file(path)
        _record(path, size, h)
        _maybe_fault(path, stage="after")
    except CheckpointError:
        raise
    except Exception as e:
        raise _fail(path, e) from e


def digest_file(path: Path, algorithm: str | None = None, chunk: int = 8 << 20):
    """(hash object, size) of a file's bytes."""
    h = CHECKSUMS[algorithm or checksum_name()]()
    size = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h, size


def entry_for(path: Path, algorithm: str | None = None) -> dict:
    h, size = digest_file(path, algorithm)
    return {"size": size, algorithm or checksum_name(): h.hexdigest()}


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


def universal_dir(root: Path, tag: str) -> Path:
    """Where DeepSpeed's universal conversion of checkpoint `tag` is cached (zero.py)."""
    return root / UNIVERSAL / tag


def drop_universal(root: Path, tag: str) -> None:
    """Forget the cached conversion of `tag`: it was made from a save being replaced."""
    shutil.rmtree(universal_dir(root, tag), ignore_errors=True)


def seal(d: Path, meta: dict) -> dict:
    """A manifest for a directory written in one go by someone else (DeepSpeed's universal
    conversion): every file's size and checksum, so `verify` checks it like a checkpoint."""
    entries = {rel: entry_for(d / rel) for rel in _files(d)}
    for rel in entries:
        fsync_path(d / rel)
    man = {"tag": d.name, "meta": meta, "files": entries}
    write_json(d / MANIFEST, man)
    return man


def source_id(ckpt: Path) -> str:
    """Identifies one save of a checkpoint (its manifest's bytes): a conversion records it."""
    return hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()


def prepare(root: Path, tag: str) -> Path:
    """Rank 0: a fresh temporary directory for `tag`; stale temporaries are removed, and so
    is a cached universal conversion of an earlier save of `tag`."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        drop_universal(root, tag)
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".del-*"):
            shutil.rmtree(p, ignore_errors=True)
        recover(root)
        t = tmp_dir(root, tag)
        _maybe_fault(t, stage="mkdir")
        t.mkdir()
        return t
    except OSError as e:
        raise _fail(tmp_dir(root, tag), e) from e


def write_part(tmp: Path, rank: int) -> None:
    """Every rank: the size and checksum of each file it wrote into tmp, as `.part-RANK.json`.
    Written under another name and renamed: rank 0 reads a part as soon as it exists."""
    final = tmp / f".part-{rank:05d}.json"
    part = final.with_name(final.name + ".tmp")
    try:
        with open(part, "w") as f:
            json.dump({"entries": forget(tmp)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)
    except OSError as e:
        raise _fail(final, e) from e


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
    for rel in set(files) - set(entries):  # written by a library on its own (DeepSpeed's script copies)
        fsync_path(tmp / rel)
        entries[rel] = entry_for(tmp / rel)
    assert sorted(entries) == files, (sorted(entries), files)
    write_json(tmp / MANIFEST, {"tag": tag, "meta": meta, "files": entries})
    forget(tmp)  # the manifest's own record: a later save into this path starts with none
    # every rank has written its part, so none is still waiting on the .done markers
    for p in parts + sorted(tmp.glob(".done-*")):
        p.unlink()
    final = root / tag
    drop_universal(root, tag)  # converted from the save this one replaces
    old = None
    try:
        _maybe_fault(final, stage="commit")
        # every folder's entries on disk before the rename publishes them (the files are already)
        for d in sorted({(tmp / rel).parent for rel in files} - {tmp}, key=lambda p: -len(p.parts)):
            fsync_path(d)
        fsync_path(tmp)
        if final.exists():  # re-saving a step (e.g. the end of a run that just saved): replace
            if exchange(tmp, final):  # one step: `final` is never absent; tmp now holds the old save
                old = tmp
            else:  # two renames; a crash between them is undone by `recover`
                old = root / f"{OLD}{tag}"
                final.rename(old)
                fsync_path(root)
                tmp.rename(final)
        else:
            tmp.rename(final)
        fsync_path(root)
    except OSError as e:
        raise _fail(final, e) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    set_latest(root, tag)
    return final


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing directories atomically (Linux renameat2 with RENAME_EXCHANGE). False,
    changing nothing, where the C library or the filesystem cannot (NFS, older kernels)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover(root: Path) -> list[str]:
    """Rank 0 of a run that owns `root`: put back a committed save that a replacing commit had
    renamed to `.old-TAG` when the process died before the new one took its place (filesystems
    without an atomic exchange); drop `.old-TAG` where `TAG` is in place. Names what it restored."""
    restored = []
    for p in sorted(root.glob(f"{OLD}*")) if root.is_dir() else []:
        tag = p.name[len(OLD):]
        if step_of(tag) is None:
            continue
        if (root / tag).exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.rename(root / tag)
            restored.append(tag)
    if restored:
        fsync_path(root)
    return restored


def set_latest(root: Path, tag: str) -> None:
    tmp = root / ".latest.tmp"
    write_bytes(tmp, (tag + "\n").encode())
    with _written_lock:  # the pointer is in no manifest
        _written.pop(str(tmp.absolute()), None)
    try:
        os.replace(tmp, root / LATEST)
        fsync_path(root)
    except OSError as e:
        raise _fail(root / LATEST, e) from e


def read_latest(root: Path) -> str | None:
    p = root / LATEST
    return p.read_text().strip() if p.exists() else None


def retain(root: Path, keep_last: int, keep_every: int, protect: str, keep_steps=()) -> list[str]:
    """Delete committed checkpoints that are neither among the last `keep_last`, nor at a
    multiple of `keep_every`, nor at one of `keep_steps`; `protect` (the one just committed)
    always stays."""
    ckpts = committed(root)
    keep = {t for _, t in ckpts[-max(keep_last, 1):]} | {protect} | {t for s, t in ckpts if s in set(keep_steps)}
    if keep_every > 0:
        keep |= {t for s, t in ckpts if s % keep_every == 0}
    removed = []
    for _, t in ckpts:
        if t not in keep:
            # rename first: a half-deleted directory must never look like a checkpoint
            trash = root / f".del-{t}"
            (root / t).rename(trash)
            _delete_later(trash, universal_dir(root, t))  # and its cached conversion
            removed.append(t)
    return removed


_deleters: list[threading.Thread] = []


def _delete_later(*paths: Path) -> None:
    """Delete in the background (unlinking GBs takes a while; the save is already committed).
    Left-overs of a process that exits first are `.del-*` directories, removed by the next
    `prepare`; nothing ever reads them."""
    def run():
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
    t = threading.Thread(target=run, name="vidscale-ckpt-delete", daemon=True)
    t.start()
    _deleters.append(t)
    _deleters[:] = [d for d in _deleters if d.is_alive()]


def wait_deletions() -> None:
    for t in list(_deleters):
        t.join()
    _deleters.clear()


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
        def check(rel: str) -> str | None:
            e = man["files"][rel]
            alg = next((a for a in CHECKSUMS if a in e), None)
            if alg is None:
                return f"has no checksum this version knows ({sorted(e)})"
            if digest_file(ckpt / rel, alg)[0].hexdigest() != e[alg]:
                return f"does not match its checksum ({alg}) in the manifest (altered or corrupt)"
            return None
        # reads overlap: the files are read and hashed by parallel threads (the hashes release the GIL)
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
            problems = list(ex.map(check, mine))
        for rel, why in zip(mine, problems):
            if why:
                raise CorruptCheckpoint(f"checkpoint {ckpt}: file {ckpt / rel} {why}")
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


# -- snapshots for background writes ---------------------------------------------------------
class PinnedPool:
    """Reusable pinned host buffers for snapshots of GPU tensors (async save).

    A copy into pinned memory runs without blocking the host and at full PCIe speed; allocating
    pinned memory is slow, so the buffers of one snapshot serve the next. `begin()` (at the
    start of a save, after the previous background write finished) makes the last snapshot's
    buffers free again."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.used: dict[tuple, list[torch.Tensor]] = {}

    def begin(self) -> None:
        for key, bufs in self.used.items():
            self.free.setdefault(key, []).extend(bufs)
        self.used = {}

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype)
        bufs = self.free.get(key)
        buf = bufs.pop() if bufs else torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        self.used.setdefault(key, []).append(buf)
        return buf


PINNED = PinnedPool()
"""The process's pool (the checkpoint manager calls `PINNED.begin()` once per save)."""


def host_copy(tree, _memo: dict | None = None):
    """A snapshot of a state tree: every tensor copied to host memory (one copy per tensor,
    however often it is referenced), containers rebuilt with their own types (OrderedDict
    stays OrderedDict), anything else shared as it is. GPU tensors go to reusable pinned
    buffers (`PINNED`), copied without blocking and synchronised once at the end."""
    top = _memo is None
    memo = {} if top else _memo
    if top:
        out = host_copy(tree, memo)
        if memo.get("cuda"):
            torch.cuda.synchronize()
        return out
    if isinstance(tree, torch.Tensor):
        if id(tree) not in memo:
            if tree.device.type == "cuda":
                c = PINNED.take(tree)
                c.copy_(tree.detach(), non_blocking=True)
                memo["cuda"] = True
            else:
                c = tree.detach().to("cpu", copy=True)
            memo[id(tree)] = torch.nn.Parameter(c, tree.requires_grad) if isinstance(tree, torch.nn.Parameter) else c
        return memo[id(tree)]
    if isinstance(tree, dict):
        out = copy_.copy(tree)
        for k, v in tree.items():
            out[k] = host_copy(v, memo)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(host_copy(v, memo) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v, memo) for v in tree)
    return tree
