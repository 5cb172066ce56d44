"""Callbacks whose state lives across fit calls and processes.

Owns: the :class:`Callback` interface and the built-in callbacks. Each has
``state_dict()`` / ``load_state_dict()`` over plain data and, for arrays (the best
weights of ``EarlyStopping(restore_best=True)``), ``state_arrays()`` /
``load_state_arrays()``; both are saved in every checkpoint. And ``reset()``:
following the modes table, the Trainer keeps callback state on ``continue`` and calls
``reset()`` on ``warm`` and ``restart``.

A callback acts on training through the public :class:`~warmfit.control.Control`
(``trainer.control``): snapshot and restore the weights, set the learning rate for the
next step after changing its own factor, ask to stop. Built-in and user callbacks use
it alike; the Trainer special-cases no callback class. A callback that changes the
learning rate warmfit sets declares it: ``adjusts_lr = True`` and :meth:`adjust_lr`.
Returning ``True`` from ``on_epoch_end`` asks to stop, as ``trainer.control.stop()``.
``on_step_end`` sees every optimizer step (:class:`StepLogs`); only callbacks that
override it are called, and the loss is read only when one asks for it.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import check_int, check_real, invalid_param

if TYPE_CHECKING:
    from .trainer import Trainer


class StepLogs:
    """The optimizer step just taken, as ``on_step_end`` sees it: ``step`` (global
    step, counted from 1), ``epoch`` (the epoch it belongs to, from 0), ``offset``
    (samples of that epoch trained on after it), ``lr`` (the step's learning rate),
    :attr:`loss` and :attr:`grad_norm`, read when asked: on a GPU that is a host sync,
    so a callback that never asks adds none. Under torchrun reading :attr:`loss` is a
    collective (the global batch's mean is summed over the ranks): ask on every rank or
    on none."""

    __slots__ = ("_handle", "_norm", "_read", "epoch", "lr", "offset", "step")

    def __init__(
        self,
        step: int,
        epoch: int,
        offset: int,
        lr: float,
        handle: Any,
        read: Any,
        norm: Any = None,
    ) -> None:
        self.step, self.epoch, self.offset, self.lr = step, epoch, offset, lr
        self._handle, self._read, self._norm = handle, read, norm

    @property
    def grad_norm(self) -> float | None:
        """The step's gradient norm before clipping (``clip_grad_norm=``), else None."""
        return None if self._norm is None else float(self._norm)

    @property
    def loss(self) -> float:
        """The step's training loss (the mean over its global batch)."""
        if type(self._handle) is float:
            return self._handle
        return float(self._read([self._handle])[0])

    def __repr__(self) -> str:
        return f"StepLogs(step={self.step}, epoch={self.epoch}, lr={self.lr:.6g})"


class Callback:
    """Base class. Hooks receive the trainer; ``logs`` is the epoch's history record."""

    #: Whether :meth:`adjust_lr` changes the learning rate warmfit sets at each step
    #: (then a schedule that sets the rate itself, a torch LR scheduler or a Keras
    #: schedule, is refused with this callback).
    adjusts_lr: bool = False

    def adjust_lr(self, lr: float) -> float:
        """The learning rate of a step, given the schedule's ``lr`` for it (called every
        step, so a pure function of this callback's state)."""
        return lr

    def on_fit_start(self, trainer: Trainer, mode: str) -> None:
        """Called at the start of every fit call, after the mode took effect."""

    def on_step_end(self, trainer: Trainer, step: StepLogs) -> None:
        """Called after every optimizer step (only for callbacks that override it). A
        change it makes to training must be in its :meth:`state_dict` to stay exact."""

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> bool | None:
        """Called after every epoch; return True to stop training after this epoch."""
        return None

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called at the end of every fit call (also after an early stop)."""

    def reset(self) -> None:
        """Forget everything (``warm`` and ``restart``)."""

    def state_dict(self) -> dict[str, Any]:
        """The callback's state as JSON data (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the callback's state, saved in the checkpoint's tensor file
        (names are the callback's own; the Trainer prefixes them)."""
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_arrays`; called after :meth:`load_state_dict`, with an
        empty dict for a checkpoint that has none."""


def _check_monitor(monitor: object, owner: str) -> None:
    if not isinstance(monitor, str) or not monitor:
        raise invalid_param("monitor", owner, "a logged value's name, e.g. 'val_loss'", monitor)


def check_monitor_mode(mode: str, owner: str) -> str:
    if mode not in ("min", "max"):
        raise invalid_param("mode", owner, ("min", "max"), mode)
    return mode


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    Its patience count and best value carry across ``continue`` calls and process
    restarts. After it fired, a ``continue`` call trains until the next epoch that does
    not improve on the best value (the wait stays at its limit).
    ``restore_best=True`` restores the best epoch's weights when it fires.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "min",
        restore_best: bool = False,
    ) -> None:
        _check_monitor(monitor, "EarlyStopping")
        patience = check_int("patience", patience, "EarlyStopping", minimum=0)
        min_delta = check_real("min_delta", min_delta, "EarlyStopping")
        if not isinstance(restore_best, bool):
            raise invalid_param("restore_best", "EarlyStopping", "a bool", restore_best)
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = check_monitor_mode(mode, "EarlyStopping")
        self.restore_best = restore_best
        self.reset()

    def reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_weights: Any = None

    def on_fit_start(self, trainer: Trainer, mode: str) -> None:
        if self.stopped_epoch is not None and trainer.rank == 0:
            best = (
                f"no finite {self.monitor} yet"  # every epoch's value was NaN or inf
                if self.best is None
                else f"best {self.monitor}={self.best:.6g} at epoch {self.best_epoch}"
            )
            print(
                f"EarlyStopping: stopped at epoch {self.stopped_epoch} ({best}); continuing "
                "until the next epoch that does not improve."
            )

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> bool:
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"EarlyStopping monitors {self.monitor!r}, which is not in the epoch's logs "
                f"{sorted(logs)}. Pass validation data or monitor another key.",
                stacklevel=2,
            )
            return False
        if math.isfinite(value) and _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = float(value), logs["epoch"], 0
            if self.restore_best:
                self._best_weights = trainer.control.snapshot_weights()
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = logs["epoch"]
            if self.restore_best and self._best_weights is not None:
                scored = None if self.best is None else (self.monitor, self.best)
                trainer.control.restore_weights(self._best_weights, scored=scored)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The best epoch's weights, with ``restore_best=True`` (so that a resumed run
        restores the same weights as an uninterrupted one)."""
        return dict(self._best_weights) if self._best_weights is not None else {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the saved best weights (dropped if ``restore_best`` is now off). If it is
        on but the checkpoint has none although a best epoch exists (it was written with
        ``restore_best=False``), warn: those weights cannot be restored."""
        if not self.restore_best:
            self._best_weights = None
            return
        self._best_weights = {k: np.array(v, copy=True) for k, v in arrays.items()} or None
        if self._best_weights is None and self.best_epoch is not None:
            warnings.warn(
                f"EarlyStopping(restore_best=True) resumed from a checkpoint that holds no "
                f"best weights (written with restore_best=False): the weights of its best "
                f"epoch so far ({self.best_epoch}) are lost, so a stop before a new best "
                "keeps the current weights. Resume with restore_best=False to match the "
                "checkpoint, or use trainer.rewind('best') to go back to that epoch.",
                stacklevel=2,
            )


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    Composes with a schedule as a multiplier: the learning rate used is
    ``schedule(step) * scale``, where ``scale`` starts at 1 and is multiplied by
    ``factor`` at each plateau (never below ``min_lr`` in effect). Without a schedule,
    it scales the optimizer's own learning rate. The scale and counters persist across
    ``continue`` calls and process restarts.
    """

    adjusts_lr = True

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        min_delta: float = 1e-4,
        mode: str = "min",
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        _check_monitor(monitor, "ReduceLROnPlateau")
        factor = check_real("factor", factor, "ReduceLROnPlateau")
        if not 0.0 < factor < 1.0:
            raise invalid_param("factor", "ReduceLROnPlateau", "a float in (0, 1)", factor)
        patience = check_int("patience", patience, "ReduceLROnPlateau", minimum=0)
        min_delta = check_real("min_delta", min_delta, "ReduceLROnPlateau")
        cooldown = check_int("cooldown", cooldown, "ReduceLROnPlateau", minimum=0)
        min_lr = check_real("min_lr", min_lr, "ReduceLROnPlateau")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.mode = check_monitor_mode(mode, "ReduceLROnPlateau")
        self.reset()

    def reset(self) -> None:
        self.best: float | None = None
        self.wait = 0
        self.cooldown_left = 0
        self.scale = 1.0
        self.reductions: list[int] = []

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> bool:
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return False
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = float(value), 0
            return False
        self.wait += 1
        if self.wait >= self.patience and self.cooldown_left == 0:
            lr = trainer.learning_rate
            if lr * self.factor >= self.min_lr or lr > self.min_lr:
                self.scale *= self.factor
                self.reductions.append(logs["epoch"])
                trainer.control.apply_learning_rate()
            self.cooldown_left, self.wait = self.cooldown, 0
        return False

    def adjust_lr(self, lr: float) -> float:
        """The learning rate after this callback's reductions."""
        return max(self.min_lr, lr * self.scale) if self.scale != 1.0 else lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "cooldown_left": self.cooldown_left,
            "scale": self.scale,
            "reductions": list(self.reductions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]
        self.cooldown_left, self.scale = state["cooldown_left"], state["scale"]
        self.reductions = list(state["reductions"])
