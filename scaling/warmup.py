"""One-time set-up after install: build DeepSpeed's small C++ extension once, so parallel
workers never compile it concurrently at start (a cold build takes ~35 s and GBs).

torch guards a build with a `lock` file in the extension's build folder and waits for it to
go away, for ever: a build killed mid-way (kill -9, a closed terminal) leaves it behind and
every later load hangs without a word. A lock older than `STALE_LOCK_S` is such a leftover
(a build takes well under a minute) and is removed, with a line naming it; a younger one is
another build at work, waited for with a line saying so.
"""
from __future__ import annotations

import time
from pathlib import Path

STALE_LOCK_S = 600.0
EXTENSION = "deepspeed_shm_comm"


def build_lock(name: str = EXTENSION) -> Path:
    """The lock file torch's extension loader holds while it builds `name`."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def clear_stale_lock(lock: Path, stale_s: float = STALE_LOCK_S, now: float | None = None) -> str:
    """'' when there is no lock; 'removed' for a leftover older than `stale_s` (deleted);
    'building' for a younger one (another build is at work)."""
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return ""
    if age < stale_s:
        return "building"
    lock.unlink(missing_ok=True)
    return "removed"


def main() -> None:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.ops.op_builder import ShareMemCommBuilder
        lock = build_lock()
        state = clear_stale_lock(lock)
        if state == "removed":
            print(f"warmup: removed {lock}, left by a build of the DeepSpeed shm extension that was killed "
                  f"(older than {STALE_LOCK_S:.0f} s)")
        elif state == "building":
            print(f"warmup: waiting for another build of the DeepSpeed shm extension (lock {lock})", flush=True)
        ShareMemCommBuilder().load(verbose=False)
        print("warmup: deepspeed shm extension ready")
    except Exception as e:  # not fatal: DeepSpeed falls back to plain collectives
        print(f"warmup: deepspeed extension not built ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
