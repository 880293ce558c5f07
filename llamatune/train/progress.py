"""Training progress for humans: a rich bar on a terminal, plain timestamped lines in logs and CI."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from llamatune.progress import Heartbeat, duration, stamp

RECENT_STEPS = 10  # "recent" tokens/s: over this many steps, steadier than one step, quicker than the average


class TrainProgress:
    """Shows step, loss, learning rate, tokens/s (this step and the run's average) and an ETA that counts the
    held-out passes still to come.

    Args:
        total_steps: Optimizer steps in the run.
        console: Where to draw; when it is not a terminal, plain lines instead of a live bar (a bar would flood
            log files with redraws): after the first step, every `every` steps, at the last step, and whenever
            LLAMATUNE_PROGRESS_S (30) seconds passed without one, also in the middle of a slow step, so a log
            never goes silent for long.
        every: Plain-line interval in steps.
        enabled: False on non-main processes, so each line is printed once.
        eval_every: Steps between held-out passes (0: none during training).
        final_eval: Whether a held-out pass follows the last step (its time is part of the ETA).
    """

    def __init__(self, total_steps: int, console: Console, every: int = 1, enabled: bool = True, eval_every: int = 0,
                 final_eval: bool = False):
        self.total, self.console, self.every, self.enabled = total_steps, console, every, enabled
        self.eval_every, self.final_eval = eval_every, final_eval
        self.start = time.perf_counter()
        self.tokens, self.first, self.step, self.eval_s, self.in_evals_s = 0, None, 0, None, 0.0
        self.step_started, self.entered, self.holding = self.start, False, False
        self.recent: list[tuple[int, float]] = []
        self.step_s = 0.0  # the steps' own time: held-out passes and checkpoint saves are not in it
        self.live = enabled and console.is_terminal
        self._bar = self._beat = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s avg  "
                           "eta {task.fields[eta]}"),
                console=console,
            )
            self._task = self._bar.add_task("train", total=total_steps, loss=float("nan"), lr=0.0, tps=0.0, eta="?")
        elif enabled:
            self._beat = Heartbeat(self._still_running)

    def __enter__(self) -> "TrainProgress":
        self.start = self.step_started = time.perf_counter()
        self.entered = True
        if self._bar is not None:
            self._bar.start()
        if self._beat is not None:
            self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._beat is not None:
            self._beat.stop()

    def hold(self, on: bool) -> None:
        """While on (a held-out pass with its own progress lines runs), the heartbeat says nothing."""
        self.holding = on
        if not on and self._beat is not None:
            self._beat.touch()

    def held_out_pass(self, seconds: float) -> None:
        """A held-out pass took `seconds`: the ETA counts that much for each pass still to come."""
        self.eval_s = seconds
        if self.entered:  # a pass between steps: not part of the step time
            self.in_evals_s += seconds
            self.step_started = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """Records that optimizer step `step` (1-based) finished: `tokens` real tokens (all processes) in `seconds`."""
        now = time.perf_counter()
        self.first = step if self.first is None else self.first  # a resumed run starts past step 1
        self.step, self.step_started = step, now
        self.tokens, self.step_s = self.tokens + tokens, self.step_s + seconds
        self.recent = (self.recent + [(tokens, seconds)])[-RECENT_STEPS:]
        if not self.enabled:
            return
        rates = self.rates()
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, lr=lr, tps=rates["tokens_per_s"], eta=duration(self.eta()))
            return
        # a line when the log has been quiet, or after a step slow enough to have had heartbeats of its own
        quiet = self._beat is not None and (now - self._beat.last >= self._beat.quiet or seconds >= self._beat.quiet)
        if step == self.first or step % self.every == 0 or step == self.total or quiet:
            shown = (f"{rates['tokens_per_s_recent']:,.0f} tok/s recent (last {len(self.recent)} steps), "
                     f"{rates['tokens_per_s']:,.0f} average")
            self._print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {shown}  "
                        f"elapsed {duration(now - self.start)}  eta {duration(self.eta())}")

    def rates(self) -> dict:
        """Tokens per second of step time (held-out passes and checkpoint saves excluded): `tokens_per_s`, over all
        of this session's steps; `tokens_per_s_recent`, over the last RECENT_STEPS steps; `tokens_per_s_step`, the
        last step alone."""
        trained_s = max(self.step_s, 1e-9)
        recent_s = sum(s for _, s in self.recent)
        last_tokens, last_s = self.recent[-1] if self.recent else (0, 0.0)
        return {"tokens_per_s": round(self.tokens / trained_s, 1),
                "tokens_per_s_recent": round(sum(t for t, _ in self.recent) / max(recent_s, 1e-9), 1),
                "tokens_per_s_step": round(last_tokens / max(last_s, 1e-9), 1)}

    def eta(self) -> float:
        """Seconds to the end of training: the remaining steps at the average step time so far, plus the held-out
        passes still to come (at the last pass's duration)."""
        if self.first is None:
            return 0.0
        per_step = (self.step_started - self.start - self.in_evals_s) / max(self.step - self.first + 1, 1)
        return max(per_step, 0.0) * (self.total - self.step) + (self.eval_s or 0.0) * self._evals_left()

    def _evals_left(self) -> int:
        during = len([s for s in range(self.step + 1, self.total) if self.eval_every and s % self.eval_every == 0])
        return during + int(self.final_eval)

    def _still_running(self) -> None:
        if self.holding:
            return
        into = duration(time.perf_counter() - self.step_started)
        self._print(f"step {self.step + 1}/{self.total} running, {into} into the step  "
                    f"elapsed {duration(time.perf_counter() - self.start)}")

    def _print(self, text: str) -> None:
        if self._beat is not None:
            self._beat.touch()
        self.console.print(f"{stamp()} {text}", highlight=False, markup=False)
