"""Training progress for humans: a rich bar on a terminal, plain periodic lines in logs and CI."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Shows step, loss, learning rate, tokens/s and ETA.

    Args:
        total_steps: Optimizer steps in the run.
        console: Where to draw; when it is not a terminal, plain lines instead of a live bar (a bar would flood
            log files with redraws): after the first step, every `every` steps, at the last step, and whenever
            `quiet_s` seconds passed without one, so a log never goes silent for long.
        every: Plain-line interval in steps.
        quiet_s: The longest a log goes without a line while steps finish.
        enabled: False on non-main processes, so each line is printed once.
    """

    def __init__(self, total_steps: int, console: Console, every: int = 1, enabled: bool = True, quiet_s: float = 30.0):
        self.total, self.console, self.every, self.enabled, self.quiet_s = total_steps, console, every, enabled, quiet_s
        self.start = self.last_line = time.perf_counter()
        self.tokens, self.first = 0, None
        self.live = enabled and console.is_terminal
        self._bar = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s avg"),
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

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, tokens: int = 0) -> None:
        """Records that optimizer step `step` (1-based) finished, `tokens` real tokens in it at `tokens_per_s`."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self.first = step if self.first is None else self.first  # a resumed run starts past step 1
        self.tokens += tokens
        average = self.tokens / max(now - self.start, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, lr=lr, tps=average if tokens else tokens_per_s)
        elif step == self.first or step % self.every == 0 or step == self.total or now - self.last_line >= self.quiet_s:
            self.last_line = now
            elapsed = now - self.start
            eta = elapsed / (step - self.first + 1) * (self.total - step)
            rates = f"{tokens_per_s:,.0f} tok/s (this step)" + (f", {average:,.0f} average" if tokens else "")
            self.console.print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rates}  "
                               f"elapsed {elapsed:.0f}s  eta {eta:.0f}s", highlight=False)
