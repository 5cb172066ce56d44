"""The overfitting monitor: is validation still improving while training goes on?

Owns: :class:`OverfittingMonitor`, a callback that tracks the best validation value
and its epoch and the train/validation gap across fit calls, warns with
:class:`OverfittingWarning` when validation has not improved for ``patience`` epochs
while the training loss keeps falling, and prints one summary line at the end of every
fit call; and :func:`summary_line`, the same line computed from history records alone.
Also owns the "how much more?" facts: :func:`improvement` (a pure function of the
history records: the least-squares slope of the monitored value over the last epochs,
its relative change, the best value and its epoch, epochs since the best) with its
result :class:`Improvement`, and :func:`improvement_line`, its one line of text, which
the monitor prints after its summary line and ``warmfit history`` prints too. They
state facts only, never advice.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .callbacks import Callback, check_monitor_mode
from .errors import invalid_param

if TYPE_CHECKING:
    from .trainer import Trainer

#: A gap that moved by less than this fraction of the monitored value is "flat".
FLAT_TOLERANCE = 0.02

#: The number of most recent epochs with a value that :func:`improvement` fits its slope
#: over (fewer when the history has fewer).
IMPROVEMENT_WINDOW = 5


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
        The number of recent epochs the gap trend and the improvement slope
        (:func:`improvement`) are computed over.
    verbose:
        Print the summary line and the improvement line (:func:`improvement_line`, over
        the run's whole history, ``trainer.history``) at the end of every fit call (also
        needs the fit call's ``verbose``).
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
            line = improvement_line(trainer.history.records, self.monitor, self.mode, self.window)
            if line is not None:
                print(line, flush=True)

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


@dataclass(frozen=True)
class Improvement:
    """The facts behind "should I train more?", from a run's history (:func:`improvement`).

    Attributes
    ----------
    monitor, mode:
        The value asked about and which direction is better (``"min"`` or ``"max"``).
    key:
        The history key the facts are about: ``monitor``; or, when no record has a finite
        ``monitor`` and ``monitor`` is ``"val_<key>"``, its training counterpart ``<key>``
        (``loss`` for ``val_loss``) if that has one (:attr:`from_training`); ``None``
        when neither has a finite value.
    window:
        The number of epochs asked for the slope.
    epochs, values:
        The epochs the slope is fitted over and ``key``'s value at each: the last
        ``window`` records with a finite ``key`` (fewer if fewer exist), oldest first.
    slope:
        The least-squares slope of ``values`` against ``epochs``, per epoch; ``None``
        with fewer than two epochs.
    relative_change:
        The fitted line's change from the window's first epoch to its last, as a fraction
        of the line's value at the first epoch (for a straight line of values,
        ``(last - first) / |first|``); ``None`` without a slope or when that value is 0.
    best, best_epoch:
        The best finite ``key`` in the whole history and its epoch (the earliest on ties).
    last_epoch:
        The epoch of the history's last record, with or without a value of ``key``.
    epochs_since_best:
        ``last_epoch - best_epoch``.
    nonfinite:
        The number of records whose ``key`` is NaN or inf (skipped, like records
        without ``key``).
    """

    monitor: str
    mode: str
    key: str | None
    window: int
    epochs: tuple[int, ...]
    values: tuple[float, ...]
    slope: float | None
    relative_change: float | None
    best: float | None
    best_epoch: int | None
    last_epoch: int | None
    epochs_since_best: int | None
    nonfinite: int

    @property
    def from_training(self) -> bool:
        """The facts are about the training counterpart: ``monitor`` has no finite value."""
        return self.key is not None and self.key != self.monitor

    @property
    def trend(self) -> str | None:
        """``"improving"`` (the slope goes the ``mode``'s way: down for ``"min"``, up for
        ``"max"``), ``"worsening"``, ``"flat"`` (a slope of exactly 0), or ``None``
        without a slope. No tolerance: :attr:`relative_change` says how big it is."""
        if self.slope is None:
            return None
        if self.slope == 0:
            return "flat"
        return "improving" if (self.slope < 0) == (self.mode == "min") else "worsening"

    def describe(self) -> str:
        """One line of the facts, e.g. ``val_loss: slope -0.012/epoch over the last 5
        epochs (-4.1%, improving), best 0.231 at epoch 17, 0 epochs since best``.

        With a window that is not the history's last epochs one after another (epochs
        without a finite value skipped), the window's epochs are named; NaN/inf values
        skipped are counted; a training counterpart is named as one.
        """
        if self.key is None:
            return f"{self.monitor}: no finite value in the history{self._skipped(self.monitor)}"
        prefix = ""
        label = self.key
        if self.from_training:
            prefix = f"no finite {self.monitor} in the history; "
            label = f"{self.key} (training)"
        since = self.epochs_since_best
        best = (
            f"best {self.best:.4g} at epoch {self.best_epoch}, "
            f"{since} epoch{'s' * (since != 1)} since best"
        )
        n = len(self.epochs)
        if self.slope is None:
            head = f"no slope from {n} epoch{'s' * (n != 1)}, "
        else:
            span, facts = "", [str(self.trend)]
            if self.relative_change is not None:
                facts.insert(0, f"{100 * self.relative_change:+.3g}%")
            if self.epochs[-1] - self.epochs[0] + 1 != n or self.epochs[-1] != self.last_epoch:
                span = f" with a finite {self.key}"
                facts.insert(0, f"epochs {self.epochs[0]}-{self.epochs[-1]}")
            head = (
                f"slope {self.slope:+.3g}/epoch over the last {n} epochs{span} "
                f"({', '.join(facts)}), "
            )
        return f"{prefix}{label}: {head}{best}{self._skipped(self.key)}"

    def _skipped(self, key: str) -> str:
        if not self.nonfinite:
            return ""
        n = self.nonfinite
        return f"; {n} epoch{'s' * (n != 1)} with a NaN or inf {key} skipped"


def improvement(
    records: Iterable[Mapping[str, Any]],
    monitor: str = "val_loss",
    mode: str = "min",
    window: int = IMPROVEMENT_WINDOW,
) -> Improvement:
    """Was ``monitor`` still improving at the end of the history? The facts, no advice.

    ``records`` are per-epoch history records (``trainer.history.records``, or the lines
    of a run dir's ``history-run<N>.jsonl``), oldest first, each with an int ``"epoch"``
    (records without one are ignored). Records without a finite ``monitor`` (missing,
    ``None``, NaN, inf) are skipped. When no record has a finite ``monitor`` and it is
    ``"val_<key>"``, the facts are about ``<key>``, the training value, if it has one
    (:attr:`Improvement.from_training`). The slope is the least-squares slope per epoch
    over the last ``window`` epochs with a value (``x`` = the epoch number, so epochs
    skipped leave gaps), computed with ``math.fsum``: exact for a straight line of
    values whose differences are exact in binary. The best value is over the whole
    history, whatever ``window``; see :class:`Improvement` for every field. Raises
    ``ValueError`` for a ``mode`` other than ``"min"``/``"max"`` or a ``window`` < 2.
    """
    mode = check_monitor_mode(mode, "improvement")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise invalid_param("window", "improvement", "an int >= 2", window)
    rows = [r for r in records if isinstance(r.get("epoch"), int)]
    train = monitor[len("val_") :] if monitor.startswith("val_") else None
    key = next(
        (k for k in (monitor, train) if k and any(_finite(r.get(k)) is not None for r in rows)),
        None,
    )
    counted = key if key is not None else monitor
    nonfinite = sum(
        1 for r in rows if isinstance(r.get(counted), (int, float)) and _finite(r[counted]) is None
    )
    last_epoch = int(rows[-1]["epoch"]) if rows else None
    pairs: list[tuple[int, float]] = []
    if key is not None:
        for r in rows:
            v = _finite(r.get(key))
            if v is not None:
                pairs.append((int(r["epoch"]), v))
    best: tuple[int, float] | None = None
    for epoch, v in pairs:
        if best is None or (v < best[1] if mode == "min" else v > best[1]):
            best = (epoch, v)
    recent = pairs[-window:]
    slope, relative = _slope(recent)
    return Improvement(
        monitor=monitor,
        mode=mode,
        key=key,
        window=window,
        epochs=tuple(e for e, _ in recent),
        values=tuple(v for _, v in recent),
        slope=slope,
        relative_change=relative,
        best=None if best is None else best[1],
        best_epoch=None if best is None else best[0],
        last_epoch=last_epoch,
        epochs_since_best=None if best is None or last_epoch is None else last_epoch - best[0],
        nonfinite=nonfinite,
    )


def improvement_line(
    history_records: Iterable[Mapping[str, Any]],
    monitor: str = "val_loss",
    mode: str = "min",
    window: int = IMPROVEMENT_WINDOW,
) -> str | None:
    """:meth:`Improvement.describe` of :func:`improvement` over ``history_records``;
    ``None`` when the history has no epoch (nothing to say)."""
    facts = improvement(history_records, monitor, mode, window)
    if facts.last_epoch is None:
        return None
    return facts.describe()


def _slope(pairs: list[tuple[int, float]]) -> tuple[float | None, float | None]:
    """(least-squares slope, relative change of the fitted line) of ``(x, y)`` pairs."""
    if len(pairs) < 2:
        return None, None
    xs = [float(x) for x, _ in pairs]
    ys = [y for _, y in pairs]
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:  # every value at the same epoch: no slope
        return None, None
    slope = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    start = my + slope * (xs[0] - mx)
    relative = slope * (xs[-1] - xs[0]) / abs(start) if start != 0 else None
    return slope, relative


def _finite(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None
