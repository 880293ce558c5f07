"""One writer per output: an exclusive lock on a hidden file beside the folder or file being written.

`fcntl.flock` locks belong to the open file, so the operating system releases them when the holder
dies: a run killed with SIGKILL never leaves a stale lock behind. The lock file sits beside its
target (`runs/.NAME.lock` for `runs/NAME`), so taking it writes nothing into the target itself, and a
recipe that fails its checks leaves no run directory. The holder writes its pid, host and command
into the file, so whoever is refused can be told who holds it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from llamatune.errors import LlamatuneError


class Busy(LlamatuneError):
    """Another llamatune process is writing the same output."""


def lock_path(target: Path) -> Path:
    """The lock file of a folder or file: a hidden sibling, `.NAME.lock`."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def hold(target: Path, what: str, wait: bool = False, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Holds the exclusive lock of `target` for the body of the `with`.

    Args:
        target: The folder or file about to be written (it need not exist; its parent is created).
        what: What the caller is doing, for the message another process gets ("training", "merging").
        wait: Wait for the holder to finish (caches: the second process then reuses the first one's work)
            instead of refusing.
        say: Where to say that we are waiting.

    Raises:
        Busy: If another process holds the lock and wait is False; the message names its pid and host.
    """
    import fcntl

    path = lock_path(target)
    # Folders made only to hold the lock are removed with it when nothing else went into them, so a run
    # refused by its checks leaves no empty runs/ behind.
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # another holder removed the folder it had made between our two calls
        except OSError as exc:
            raise LlamatuneError(f"cannot create the lock {path} for {target}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            if not wait:
                os.close(fd)
                raise Busy(f"{target} is being written by another llamatune process ({holder}); "
                           f"wait for it to finish, or write elsewhere") from None
            from llamatune.progress import Phase

            with Phase(say or (lambda _: None), f"waiting for another llamatune process ({holder}) that is {what} "
                       f"{target}", enabled=say is not None):
                fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder before us unlinks the file on release: if ours is no longer the file at `path`,
        # a third process may lock a new one, so start over on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "doing": what,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv[:6])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it: see the inode check above
        except OSError:
            pass
        os.close(fd)
        for folder in created:  # deepest first; one that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "it has not said who it is yet"
    return f"pid {info.get('pid')} on host {info.get('host')}, {info.get('doing')} since {info.get('since')}: {info.get('command')}"
