"""Process memory on CPU: the peak we report, and an allocator setting that keeps it down.

glibc's malloc serves large requests from mmap only above a threshold that it raises at run time (up to
32 MiB) after large blocks are freed; training frees and reallocates activations of changing shapes every
step, so they end up in the heap, which fragments and is rarely returned to the system. Fixing the threshold
makes every large tensor its own mapping, unmapped when freed: the peak then follows what is really alive.
"""

from __future__ import annotations

import sys

MMAP_THRESHOLD = 1 << 20  # bytes; tensors from 1 MiB up get their own mapping
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def use_mmap_for_large_tensors() -> bool:
    """Fixes glibc's mmap threshold for this process (Linux with glibc only).

    Returns:
        Whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: keep its defaults
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB); 0 where the platform does not report it."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
