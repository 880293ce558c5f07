"""Progress of the long phases outside the training steps (data build, model load, held-out passes, merge, export,
eval, bench): a rich bar with an ETA on a terminal; in a log file, plain timestamped lines: the first after
FIRST_S seconds (a phase quicker than that prints nothing: what it produced is printed next), then at least every
`quiet_s()` seconds, even while one opaque call (a model load) runs, and a last one when it is done.

    with Phase(console, "held-out pass at step 0", total=12, unit="batches") as phase:
        for batch in batches:
            ...
            phase.advance()
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Union

from rich.console import Console

# Seconds a log may go without a line; a test (or a user who wants a terser or chattier log) sets the variable.
QUIET_ENV = "LLAMATUNE_PROGRESS_S"
Sink = Union[Console, Callable[[str], None]]
FIRST_S = 2.0


def quiet_s() -> float:
    """The longest a log goes silent: LLAMATUNE_PROGRESS_S, default 30 seconds."""
    try:
        value = float(os.environ.get(QUIET_ENV, "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


def stamp() -> str:
    """The wall-clock time a plain progress line starts with."""
    return time.strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    """12s, 4m05s, 2h03m: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Heartbeat:
    """Calls `beat()` from a background thread whenever `quiet_s` seconds passed since the last `touch()`, so a log
    shows that a long call is still running. Used by Phase and by the training progress."""

    def __init__(self, beat: Callable[[], None], quiet: float | None = None, first: float | None = None):
        self.beat, self.quiet = beat, quiet or quiet_s()
        # the first beat comes `first` seconds after the start: `last` is set as if a line had been printed earlier
        self.last = time.perf_counter() - (self.quiet - first if first is not None and first < self.quiet else 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamatune-progress", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def touch(self) -> None:
        """A line was just printed: the next beat is due `quiet` seconds from now."""
        with self._lock:
            self.last = time.perf_counter()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.quiet / 4)):
            with self._lock:
                due = time.perf_counter() - self.last >= self.quiet
            if due:
                try:
                    self.beat()
                except Exception:  # a failed progress line must never stop the work it reports on
                    pass
                self.touch()


class Phase:
    """One long phase, shown while it runs; see the module docstring.

    Args:
        sink: A rich Console (a bar when it is a terminal) or a function that prints one line (plain lines).
        label: What runs, e.g. "held-out pass at step 0" or "merge: loading the base model".
        total: Units of work, when known (else only elapsed time is shown).
        unit: What a unit is ("batches", "tensors", "examples").
        enabled: False on non-main processes of a distributed run, so each line is printed once.
    """

    def __init__(self, sink: Sink, label: str, total: int | None = None, unit: str = "", enabled: bool = True):
        self.sink, self.label, self.total, self.unit, self.enabled = sink, label, total, unit, enabled
        self.done, self.start, self.note, self.printed = 0, time.perf_counter(), "", False
        self._bar = self._task = self._beat = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "Phase":
        self.start = time.perf_counter()
        if not self.enabled:
            return self
        if isinstance(self.sink, Console) and self.sink.is_terminal:
            self._start_bar()
        if self._bar is None:
            self._beat = Heartbeat(lambda: self._line(self._status()), first=FIRST_S).start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        if not self.enabled:
            return
        if self._beat is not None:
            self._beat.stop()
        if self._bar is not None:
            self._bar.stop()
        elapsed = duration(time.perf_counter() - self.start)
        if not self.printed and (self._bar is None or time.perf_counter() - self.start < FIRST_S):
            return  # quick: what the phase made is printed next, its own lines would only be noise
        if kind is None:
            counted = f"{self.done:,} {self.unit} " if self.total and self.unit else ""
            self._line(f"{self.label}: done, {counted}in {elapsed}" + (f" ({self.note})" if self.note else ""))
        elif not issubclass(kind, (KeyboardInterrupt, SystemExit)):
            self._line(f"{self.label}: stopped after {elapsed}")

    def advance(self, n: int = 1, note: str = "") -> None:
        """`n` more units done; `note` (e.g. the tensor being written) is shown with the next line."""
        self.done += n
        self.note = note or self.note
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, note=self.note)
        elif self._beat is not None and time.perf_counter() - self._beat.last >= self._beat.quiet:
            self._line(self._status())

    # ---- output -------------------------------------------------------------------------------------
    def _status(self) -> str:
        elapsed = time.perf_counter() - self.start
        text = f"{self.label}: "
        if self.total:
            text += f"{self.done:,}/{self.total:,} {self.unit}, {duration(elapsed)} elapsed"
            if self.done:
                text += f", eta {duration(elapsed / self.done * (self.total - self.done))}"
        else:
            text += f"still running, {duration(elapsed)} elapsed"
        return text + (f" ({self.note})" if self.note else "")

    def _line(self, text: str) -> None:
        self.printed = True
        if self._beat is not None:
            self._beat.touch()
        if isinstance(self.sink, Console):
            line = text if self.sink.is_terminal else f"{stamp()} {text}"
            self.sink.print(line, highlight=False, markup=False)
        else:
            self.sink(f"{stamp()} {text}")

    def _start_bar(self) -> None:
        from rich.errors import LiveError
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        columns = ([TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
                   if self.total else [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()])
        bar = Progress(*columns, TextColumn("{task.fields[note]}"), console=self.sink, transient=True)
        try:
            bar.start()
        except LiveError:  # inside another live display (the training bar): plain lines instead
            return
        self._bar, self._task = bar, bar.add_task(self.label, total=self.total, note="")
