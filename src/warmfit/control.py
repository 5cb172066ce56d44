"""What callbacks and the modes table may do to a trainer, through declared interfaces.

- :class:`Control` (``trainer.control``) — the public interface built-in and user
  callbacks use alike: snapshot and restore the weights, set the learning rate after a
  callback changed its factor, ask to stop.
- :class:`ModeOperations` — the trainer's side of :func:`warmfit.modes.apply`: the four
  operations the modes table is made of.
- :func:`check_callbacks`, :func:`check_plateau` — the callbacks a Trainer accepts.

Does not own: the callbacks (:mod:`warmfit.callbacks`) or the table (:mod:`warmfit.modes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends.base import Backend
from .callbacks import Callback
from .errors import invalid_param
from .horizons import Plan
from .schedules import TorchScheduler

if TYPE_CHECKING:
    from .trainer import Trainer


class Control:
    """What a callback may do to training: the public interface that built-in and user
    callbacks use alike (``trainer.control``). Every action keeps the run exact: it is
    taken at an epoch's end, and what it changes is in the checkpoint (the weights; the
    learning rate through the callback's own saved state and :meth:`Callback.adjust_lr`).
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self._stop_reason: str | None = None

    def snapshot_weights(self) -> dict[str, np.ndarray]:
        """A copy of the model's weights, as plain arrays (``model/<name>``), for
        :meth:`restore_weights` (and for a callback's ``state_arrays``, which saves them)."""
        return {
            k: np.array(v, copy=True)
            for k, v in self._trainer.backend.state_tensors().items()
            if k.startswith("model/")
        }

    def restore_weights(
        self, weights: Mapping[str, np.ndarray], *, scored: tuple[str, float] | None = None
    ) -> None:
        """Load ``weights`` (an earlier epoch's :meth:`snapshot_weights`). ``scored`` is
        the (key, value) they scored, so that a save at this step is tagged with that
        value, not with the last epoch's (none if the key is not the one checkpoints are
        ranked by)."""
        t = self._trainer
        t.backend.load_weights(weights)
        value = scored[1] if scored is not None and scored[0] == t.monitor else None
        c = t.state.counters
        t.checkpointer.restored_metric = (c.run, c.global_step, value)

    def apply_learning_rate(self) -> None:
        """Set the learning rate of the next step now — the schedule's, through every
        callback's :meth:`Callback.adjust_lr` — after a callback changed its factor."""
        self._trainer.state.apply_lr()

    def stop(self, reason: str = "a callback") -> None:
        """End the fit call after this epoch (as ``on_epoch_end`` returning True does);
        ``reason`` is recorded as the ledger's ``stopped_by``."""
        self._stop_reason = reason

    def take_stop_request(self) -> str | None:
        """The reason of a :meth:`stop` asked since the last call (the loop's side)."""
        reason, self._stop_reason = self._stop_reason, None
        return reason


class ModeOperations:
    """The Trainer's side of :func:`warmfit.modes.apply`."""

    def __init__(self, trainer: Trainer) -> None:
        self._t = trainer

    def new_run(self) -> None:
        self._t.checkpointer.wait()  # the finished run's saves are on disk
        self._t.start_run(first=False)

    def fresh_optimizer(self) -> None:
        t = self._t
        t.backend.init_optimizer(t.state.schedule)
        t.state.base_lr = t.backend.learning_rate()

    def restart_schedule(self) -> None:
        c = self._t.state.counters
        c.schedule_origin = c.global_step
        self._t.state.plan = Plan()  # a new schedule position: a new plan

    def reset_callbacks(self) -> None:
        self._t.state.reset_callbacks()


def check_plateau(callbacks: list[Callback], schedule: Any, backend: Backend) -> None:
    """A callback that adjusts the rate warmfit sets each step (``adjusts_lr``, e.g.
    ReduceLROnPlateau): refuse it where something else sets the rate (a torch
    LRScheduler, a Keras schedule)."""
    adjusting = [type(cb).__name__ for cb in callbacks if cb.adjusts_lr]
    if not adjusting:
        return
    name = adjusting[0]
    if isinstance(schedule, TorchScheduler):
        raise TypeError(
            f"{name} scales the learning rate warmfit sets at each step, but a torch "
            "LRScheduler sets the rate itself, so the reductions would have no effect. "
            f"Pass a warmfit schedule (warmfit.schedules) or none, or drop {name}."
        )
    backend.check_lr_settable(name, f"Drop {name}")


def check_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    """The callbacks as a list, each a :class:`~warmfit.callbacks.Callback`."""
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    try:
        out = list(callbacks)
    except TypeError:
        raise invalid_param(
            "callbacks", "Trainer", "a list of warmfit.Callback objects", callbacks
        ) from None
    for i, cb in enumerate(out):
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks[{i}] is {cb!r}, not a warmfit.Callback. Pass warmfit's callbacks "
                "(EarlyStopping, ReduceLROnPlateau, OverfittingMonitor) or subclass "
                "warmfit.Callback: its state must be saved with the run."
            )
    return out
