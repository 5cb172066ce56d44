"""The overfitting monitor: is validation still improving while training goes on?

Owns: :class:`OverfittingMonitor`, a callback that tracks the best validation value
and its epoch and the train/validation gap across fit calls, warns with
:class:`OverfittingWarning` when validation has not improved for ``patience`` epochs
while the training loss keeps falling, and prints one summary line at the end of every
fit call; and :func:`summary_line`, the same line computed from history records alone.

Does not own: stopping (:class:`~warmfit.callbacks.EarlyStopping`) or plotting
(:mod:`warmfit.plots`). Like every callback its state (``state_dict()``) is saved in
checkpoints, kept on ``continue`` and reset on ``warm`` and ``restart``.

The gap is ``val_<key> - <key>`` for a monitor ``val_<key>`` whose training
counterpart ``<key>`` is in the logs (``val_loss - loss``). Its trend over the last
``window`` epochs is ``widening`` or ``narrowing`` (its size, ``|gap|``, grows or
shrinks: a least-squares change of at least 2% of the mean monitored value) or
``flat``. A positive gap that widens is the classic picture of overfitting; with
dropout the training loss is often above the validation loss (a negative gap).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .callbacks import Callback, check_monitor_mode
from .errors import invalid_param

if TYPE_CHECKING:
    from .trainer import Trainer

#: A gap that moved by less than this fraction of the monitored value is "flat".
FLAT_TOLERANCE = 0.02


class OverfittingWarning(UserWarning):
    """Validation stopped improving while the training loss keeps falling."""


class OverfittingMonitor(Callback):
    """Watch ``monitor`` (a validation key) for overfitting, across fit calls.

    Parameters
    ----------
    monitor:
        The validation value to watch, e.g. ``"val_loss"`` or ``"val_accuracy"``.
    patience:
        Warn when ``monitor`` has not improved for this many epochs while the training
        loss (``"loss"``) fell over the same epochs. One warning per plateau.
    mode:
        ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
    window:
        The number of recent epochs the gap trend is computed over.
    verbose:
        Print the summary line at the end of every fit call (also needs the Trainer's
        ``verbose``).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        mode: str = "min",
        window: int = 5,
        verbose: bool = True,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise invalid_param("patience", "OverfittingMonitor", "an int >= 1", patience)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise invalid_param("window", "OverfittingMonitor", "an int >= 2", window)
        self.monitor, self.patience, self.window = monitor, patience, window
        self.mode = check_monitor_mode(mode, "OverfittingMonitor")
        self.verbose = verbose
        self.train_key = monitor[len("val_") :] if monitor.startswith("val_") else None
        self.reset()

    # -- state ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.loss_at_best: float | None = None
        self.wait = 0  # epochs since the best one
        self.warned = False  # warned during the current plateau
        self.last_epoch: int | None = None
        #: [epoch, training loss, monitored value, gap] for the most recent epochs
        self.recent: list[list[Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "loss_at_best": self.loss_at_best,
            "wait": self.wait,
            "warned": self.warned,
            "last_epoch": self.last_epoch,
            "recent": [list(r) for r in self.recent],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.loss_at_best, self.wait = state["loss_at_best"], state["wait"]
        self.warned, self.last_epoch = state["warned"], state["last_epoch"]
        self.recent = [list(r) for r in state["recent"]]

    # -- hooks ----------------------------------------------------------------------------
    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> bool:
        message = self.observe(logs)
        if message is not None:
            warnings.warn(OverfittingWarning(message), stacklevel=3)
        return False

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.verbose and trainer.fit_verbose and trainer.rank == 0:
            print(self.summary(), flush=True)

    # -- the work -------------------------------------------------------------------------
    def observe(self, logs: Mapping[str, Any]) -> str | None:
        """Take one epoch's record; return the warning's message when one is due."""
        value = _finite(logs.get(self.monitor))
        if value is None:
            return None
        epoch = logs["epoch"]
        loss = _finite(logs.get("loss"))
        train = _finite(logs.get(self.train_key)) if self.train_key else None
        gap = None
        if train is not None:
            gap = value - train
        self.last_epoch = epoch
        self.recent.append([epoch, loss, value, gap])
        del self.recent[: -max(self.window, self.patience + 1)]
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_epoch, self.loss_at_best = value, epoch, loss
            self.wait, self.warned = 0, False
            return None
        self.wait += 1
        if self.wait < self.patience or self.warned:
            return None
        before = self.recent[-(self.patience + 1)] if len(self.recent) > self.patience else None
        loss_before = before[1] if before is not None else self.loss_at_best
        if loss is None or loss_before is None or not loss < loss_before:
            return None
        self.warned = True
        return (
            f"{self.monitor} has not improved for {self.wait} epochs (best {self.best:.4g} at "
            f"epoch {self.best_epoch}, {value:.4g} at epoch {epoch}) while the training loss "
            f"fell from {loss_before:.4g} to {loss:.4g}: the model is overfitting. Consider "
            "EarlyStopping, trainer.rewind('best'), more data or more regularisation."
        )

    def gap_trend(self) -> tuple[str, float | None, float | None, int]:
        """(``"widening"`` | ``"narrowing"`` | ``"flat"`` | ``"n/a"``, first gap, last gap,
        number of epochs) over the last ``window`` epochs that have a gap."""
        rows = [r for r in self.recent[-self.window :] if r[3] is not None]
        if len(rows) < 2:
            return "n/a", None, None, len(rows)
        xs = [float(r[0]) for r in rows]
        gaps = [abs(float(r[3])) for r in rows]
        mx, mg = sum(xs) / len(xs), sum(gaps) / len(gaps)
        slope = sum((x - mx) * (g - mg) for x, g in zip(xs, gaps, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        change = slope * (xs[-1] - xs[0])
        scale = sum(abs(r[2]) for r in rows) / len(rows)
        if abs(change) <= FLAT_TOLERANCE * scale:
            trend = "flat"
        else:
            trend = "widening" if change > 0 else "narrowing"
        return trend, rows[0][3], rows[-1][3], len(rows)

    def summary(self) -> str:
        """One line: the best value and its epoch, epochs past it, the gap's trend."""
        if self.best is None or self.last_epoch is None:
            return (
                f"overfitting monitor: no {self.monitor!r} in the history yet; pass "
                "validation_data or validation_split to fit"
            )
        past = self.last_epoch - self.best_epoch  # type: ignore[operator]
        where = "the last epoch" if past == 0 else f"{past} epoch{'s' * (past != 1)} past it"
        line = (
            f"overfitting monitor: best {self.monitor}={self.best:.4g} at epoch "
            f"{self.best_epoch} ({where})"
        )
        trend, first, last, n = self.gap_trend()
        if trend == "n/a":
            if self.train_key is None:
                return line + f"; no train/validation gap for {self.monitor!r}"
            if all(r[3] is None for r in self.recent):  # e.g. accuracy: only the loss is
                return line + (  # logged for the training data
                    f"; no train/validation gap: the history has no {self.train_key!r}"
                )
            return line + "; train/validation gap: too few epochs for a trend"
        return line + (
            f"; train/validation gap ({self.monitor} - {self.train_key}) {trend} over the "
            f"last {n} epochs ({first:+.4g} -> {last:+.4g})"
        )


def summary_line(
    history_records: Iterable[Mapping[str, Any]], monitor: str = "val_loss", mode: str = "min"
) -> str:
    """The monitor's summary line for history records (e.g. ``trainer.history.records``),
    without a callback: as if an :class:`OverfittingMonitor` had seen every epoch."""
    m = OverfittingMonitor(monitor, patience=1, mode=mode)
    for record in history_records:
        m.observe(record)
    return m.summary()


def _finite(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None
