"""Process memory on CPU: the peak a run reports (summary.json, `llamatune bench`)."""

from __future__ import annotations

import sys


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB); 0 where the platform does not report it."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
