"""Process memory on CPU: the peak a run reports (summary.json, `llamatune bench`), and the allocator.

glibc's malloc serves training badly: every step frees and reallocates activations of new shapes, large
blocks move between mmap (page faults on every first touch) and a heap that fragments and is rarely given
back. tcmalloc keeps size-classed free lists instead. Measured on the quickstart recipe (2-core AVX2 EPYC,
fp32, `llamatune bench`): glibc 85-93 tokens/s at 4.5 GiB peak RSS, tcmalloc 102-104 tokens/s at 2.7 GiB
(jemalloc 83 / 2.7, mimalloc 74 / 2.9); after the fused LoRA layers (fused.py), glibc 100 / 3.2, tcmalloc
138 / 2.3. The allocator cannot change inside a running process, so the
heavy commands re-execute themselves once with tcmalloc preloaded when the system has it
(`apt install libtcmalloc-minimal4`, `dnf install gperftools-libs`); LLAMATUNE_ALLOCATOR=system opts out.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

ALLOCATOR_ENV = "LLAMATUNE_ALLOCATOR"  # auto (default: tcmalloc when installed) | system
PRELOADED = "LLAMATUNE_PRELOADED"  # set on the re-executed process: never re-execute twice
HEAVY_COMMANDS = frozenset({"train", "bench", "eval", "merge", "export", "chat"})
_TCMALLOC = ("tcmalloc_minimal", "tcmalloc")  # gperftools' libraries, the minimal one first
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes; 0 where the platform does not report it.

    On Linux the high-water mark of the process's own memory map (VmHWM): getrusage's ru_maxrss survives exec, so
    a process started by a big one (or re-executed with tcmalloc) would report the earlier image's peak.
    """
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_rss_gib() -> float:
    """peak_rss_bytes in GiB."""
    return peak_rss_bytes() / 2**30


def find_tcmalloc() -> str | None:
    """The soname of an installed tcmalloc (searched like the dynamic linker does), or None."""
    import ctypes.util

    for name in _TCMALLOC:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_environment(args: list[str], environ: Mapping[str, str], platform: str = sys.platform,
                        library: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute `llamatune ARGS` in with tcmalloc preloaded, or None to run as is.

    Args:
        args: The command line after the program name.
        environ: The current environment.
        platform: sys.platform (LD_PRELOAD is a Linux dynamic-linker feature).
        library: tcmalloc's soname; looked up when None.

    Raises:
        ValueError: If LLAMATUNE_ALLOCATOR holds something other than auto or system.
    """
    choice = environ.get(ALLOCATOR_ENV, "auto")
    if choice not in ("auto", "system"):
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}: use auto (tcmalloc when installed) or system")
    command = next((a for a in args if not a.startswith("-")), None)
    preloaded = environ.get("LD_PRELOAD", "")
    if (choice == "system" or not platform.startswith("linux") or command not in HEAVY_COMMANDS
            or environ.get(PRELOADED) or any(name in preloaded for name in _KNOWN)):
        return None
    library = library or find_tcmalloc()
    if library is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library}:{preloaded}" if preloaded else library
    env[PRELOADED] = library
    # tcmalloc reports every allocation over 1 GiB on stderr by default: noise for a 4 GiB model.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def active_allocator() -> str:
    """Which malloc this process runs on, from its mapped libraries (recorded in summary.json and by bench)."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "system"
    return next((name for name in _KNOWN if f"lib{name}" in text), "glibc" if "libc.so" in text else "system")


def training_uses_tcmalloc() -> bool:
    """Whether `llamatune train` started from this environment would run on tcmalloc."""
    import os

    if active_allocator() == "tcmalloc":
        return True
    try:
        return preload_environment(["train"], os.environ) is not None
    except ValueError:  # a wrong LLAMATUNE_ALLOCATOR: train itself will say so
        return False
