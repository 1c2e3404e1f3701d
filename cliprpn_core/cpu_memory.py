"""Keeping freed memory for reuse in processes of our own (the CLI's derain, train and eval commands).

glibc hands out every allocation above its mmap threshold (which rises with use to at most 32 MiB) as freshly
mapped pages and unmaps them on free, so each large tensor is page-faulted in again at every allocation. A
restoration allocates full-resolution activations of 25-200 MB dozens of times per image: on a 1-MP image that
is most of the time (3.1 s/MP whole, 1.1 s/MP with the thresholds raised, main thread, 2 threads; training
1.73 -> 1.95 steps/s). Raising glibc's mmap and trim thresholds makes freed blocks stay in the heap for the next
allocation.

This changes the whole process, so only entry points that own their process call it (never the ComfyUI nodes,
which share ComfyUI's process; there the Derainer's CPU tiling keeps activations under the ceiling instead). It
does nothing off glibc (macOS, Windows, musl) and when the user has set MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ or CLIPRPN_KEEP_MALLOC=1.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # 1 GiB: every activation of a tiled or 1-MP restoration, and of a training batch, stays in the heap

_applied: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def applied() -> bool:
    """Whether :func:`reuse_freed_memory` raised the thresholds in this process."""
    return bool(_applied)


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). -> whether they are raised."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CLIPRPN_KEEP_MALLOC") == "1" or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return _applied  # the user chose the allocator's settings
    libc = _glibc()
    if libc is not None:
        _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _applied
