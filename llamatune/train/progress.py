"""Training progress for humans: a rich bar on a terminal, plain periodic lines in logs and CI."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Shows step, loss, learning rate, tokens/s and ETA.

    Args:
        total_steps: Optimizer steps in the run.
        console: Where to draw; when it is not a terminal, one plain line is printed per
            `every` steps instead of a live bar (a bar would flood log files with redraws).
        every: Plain-line interval in steps.
        enabled: False on non-main processes, so each line is printed once.
    """

    def __init__(self, total_steps: int, console: Console, every: int = 1, enabled: bool = True):
        self.total, self.console, self.every, self.enabled = total_steps, console, every, enabled
        self.start = time.perf_counter()
        self.live = enabled and console.is_terminal
        self._bar = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
                TimeRemainingColumn(), console=console,
            )
            self._task = self._bar.add_task("train", total=total_steps, loss=float("nan"), lr=0.0, tps=0.0)

    def __enter__(self) -> "TrainProgress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Records that optimizer step `step` (1-based) finished."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, lr=lr, tps=tokens_per_s)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.total - step)
            self.console.print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                f"elapsed {elapsed:.0f}s  eta {eta:.0f}s", highlight=False,
            )
