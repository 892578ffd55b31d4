"""Host allocator settings for the training hot loop.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves every block above
its mmap threshold (128 KiB at start, raised only by frees of mmapped blocks) with a fresh
`mmap` and returns it with `munmap` on free; the kernel zero-fills every page on first
touch. A training step allocates and frees activations of several MB hundreds of times,
so each of those blocks is paid again as page faults plus a zeroing pass that nobody
asked for: memory-bound ops (norms, GELU, RoPE, the cat of packed segments) ran ~5% of a
CPU step slower than with the blocks kept (measured with `vidscale bench step`: 0.715 ->
0.750 MFU on the 30M model, 2 threads).

`tune()` keeps freed blocks in the heap for reuse: the mmap threshold at glibc's ceiling
(32 MiB on 64-bit: larger blocks are rare and still mapped), a trim threshold and top pad
that stop the heap from being handed back and re-faulted between steps. It only changes
where the C library keeps freed memory, never what tensors hold; a process that is not on
glibc (or where `mallopt` refuses a value) is left as it is and `tune()` says so.
Set `train.tune_malloc=false` to keep the C library's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30   # hand memory back to the OS only above 1 GiB of free heap top
TOP_PAD = 64 << 20         # grow the heap in 64 MiB steps (fewer brk calls)

_done: bool | None = None


def tune() -> bool:
    """Apply the settings once per process; True when glibc accepted them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                             (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                             (M_TOP_PAD, TOP_PAD)))
    _done = ok
    return ok
