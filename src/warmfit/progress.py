"""Progress during fit: epoch, step, loss, rate and ETA on one live line (rich).

Owns: :class:`Progress`, which the Trainer drives from its fit loop. It is quiet —
no output and almost no cost — when disabled (``verbose=0``) or when stdout is not a
terminal (logs, CI, pipes: there the Trainer's per-epoch plain lines are enough).

Never forces a host–device synchronisation: ``advance`` takes the loss only when the
caller already has it on the host as a float, and shows the last one it got.
Enabled, it redraws at most ``refresh_per_second`` times a second, from the caller's
thread (no background thread).

Positions: ``start_epoch(epoch, target_epoch, steps_in_epoch, start_step)`` takes the
1-based epoch being trained, the final epoch of the call (or None), the number of
steps in a whole epoch and the steps of this epoch already done (non-zero when a call
resumes mid-epoch); ``advance(step, loss)`` is called after every optimizer step with
the global step.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """A live progress line for fit; a no-op unless ``enabled`` and on a terminal.

    ``console`` (a ``rich.console.Console``) forces output to it, terminal or not (for
    tests and notebooks).
    """

    def __init__(
        self,
        enabled: bool,
        *,
        console: Any = None,
        refresh_per_second: float = 8.0,
        stream: TextIO | None = None,
    ) -> None:
        stream = sys.stdout if stream is None else stream
        is_tty = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = bool(enabled) and (console is not None or is_tty)
        self._interval = 1.0 / refresh_per_second
        self._console = console
        self._progress: Any = None
        self._task: Any = None
        self._epoch = 0
        self._target: int | None = None
        self._total = 0
        self._done = 0
        self._start_done = 0
        self._step = 0
        self._loss: float | None = None
        self._t0 = 0.0
        self._last_draw = 0.0
        if not self.enabled:
            self.advance = self._advance_disabled  # type: ignore[method-assign]

    # -- the interface the Trainer drives ----------------------------------------------------
    def start_epoch(
        self, epoch: int, target_epoch: int | None, steps_in_epoch: int, start_step: int = 0
    ) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._open()
        self._epoch, self._target = epoch, target_epoch
        self._total, self._done, self._start_done = steps_in_epoch, start_step, start_step
        self._t0 = self._last_draw = time.perf_counter()
        self._task = self._progress.add_task(
            "", total=steps_in_epoch, completed=start_step, **self._fields()
        )
        self._progress.refresh()

    def advance(self, step: int, loss: float | None = None) -> None:
        """After an optimizer step (``step`` is the global step). Throttled redraws."""
        self._done += 1
        self._step = step
        if loss is not None:
            self._loss = loss
        now = time.perf_counter()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw(now)

    def end_epoch(self, logs: dict[str, Any] | None = None) -> None:
        """The epoch is complete: its line goes away (the Trainer prints the epoch's
        results itself when verbose)."""
        if not self.enabled or self._task is None:
            return
        self._progress.remove_task(self._task)
        self._task = None
        self._progress.refresh()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _advance_disabled(self, step: int, loss: float | None = None) -> None:
        return None

    def _open(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("step {task.fields[step]}  loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}  ETA {task.fields[eta]}"),
            console=self._console,
            auto_refresh=False,
            transient=True,
        )
        self._progress.start()

    def _fields(self, now: float | None = None) -> dict[str, str]:
        epoch = f"{self._epoch}/{self._target}" if self._target is not None else str(self._epoch)
        elapsed = (now or time.perf_counter()) - self._t0
        done = self._done - self._start_done
        rate = done / elapsed if elapsed > 0 and done else 0.0
        left = self._total - self._done
        if self._target is not None:
            left += max(0, self._target - self._epoch) * self._total
        return {
            "epoch": epoch,
            "step": str(self._step),
            "loss": "-" if self._loss is None else f"{self._loss:.4f}",
            "rate": f"{rate:.1f} steps/s" if rate else "- steps/s",
            "eta": _duration(left / rate) if rate else "-",
        }

    def _draw(self, now: float) -> None:
        if self._task is None:
            return
        self._progress.update(self._task, completed=self._done, **self._fields(now))
        self._progress.refresh()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
