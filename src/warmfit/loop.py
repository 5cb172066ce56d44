"""The fit loop: from the cursor to the call's end, one optimizer step at a time.

:func:`run_epochs` reads top to bottom: for each epoch, its permutation of the data
(a pure function of the seed and the epoch); for each batch from the cursor on, the
learning rate of the step, the backend's training step, the counters, a periodic
checkpoint, a stop signal; at the epoch's end the epoch's loss, validation, the
history and the callbacks. The backend's ``train_step`` is the frame that calls the
model: ``Trainer.fit`` -> :func:`run_epochs` -> ``train_step``.

Owns: the loop and what it computes (the epoch's loss, validation logs). Does not own:
the state it moves (:class:`~warmfit.training_state.TrainingState`), saving
(:class:`~warmfit.checkpointer.Checkpointer`), the fit call's plan (``Trainer.fit``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import NonFiniteLoss
from .callbacks import Callback, StepLogs
from .data import epoch_permutation
from .errors import NonFiniteLossError
from .progress import Progress
from .schedules import TorchScheduler
from .training_state import TrainingState

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass(frozen=True)
class FitCall:
    """What the fit call in progress runs: to global epoch ``target`` (None: no epoch
    target) or global step ``step_target`` (None: none), as segment ``segment`` of the
    run, in ``mode``."""

    target: int | None
    step_target: int | None
    segment: int
    mode: str
    shuffle: bool
    verbose: int


def run_epochs(
    trainer: Trainer, data: Any, val_data: Any, call: FitCall, progress: Progress
) -> str | None:
    """The fit loop: from the cursor to epoch ``call.target`` (or global step
    ``call.step_target``); returns why it stopped early (a callback's name, a stop
    request), None otherwise (the end, ``steps=``, a stop signal: the caller asks)."""
    backend, state, saver = trainer.backend, trainer.state, trainer.checkpointer
    c = state.counters
    distributed = trainer.world_size > 1  # a stop must be agreed by every rank
    target = sys.maxsize if call.target is None else call.target
    step_target = call.step_target
    n, bs = len(data), trainer.batch_size
    per_step_lr = state.schedule is not None and not isinstance(state.schedule, TorchScheduler)
    # Only callbacks that override on_step_end see steps: the others cost nothing.
    stepwise = [cb for cb in trainer.callbacks if type(cb).on_step_end is not Callback.on_step_end]
    read = backend.read_losses  # a StepLogs reads its loss with it, when asked
    if c.offset < n or not per_step_lr:
        # Not at an epoch's end: there the optimizer keeps the rate of the epoch's
        # last step, as in an uninterrupted run; the next step sets its own.
        state.apply_lr()
    while c.epoch < target:
        order = epoch_permutation(trainer.seed, c.epoch, n, shuffle=call.shuffle)
        progress.start_epoch(
            c.epoch + 1, None if target == sys.maxsize else target, -(-n // bs), c.offset // bs
        )
        losses: list[Any] = []
        sizes: list[int] = []
        save_at_epoch_end = False
        try:
            for batch in backend.batches(data, order, c.offset, bs, c.epoch):
                if per_step_lr:
                    backend.set_learning_rate(state.lr_at(c.global_step))
                lr = backend.learning_rate() if stepwise else 0.0  # the rate this step uses
                try:
                    losses.append(backend.train_step(batch))
                except NonFiniteLoss as err:
                    raise NonFiniteLossError(c.global_step + 1, c.epoch, err.value) from None
                size = min(bs, n - c.offset)
                sizes.append(size)
                c.global_step += 1
                c.offset += size
                c.samples_seen += size
                last = losses[-1]  # a float only where reading it was free (CPU)
                progress.advance(c.global_step, last if type(last) is float else None)
                if stepwise:
                    norm = backend.last_grad_norm
                    taken = StepLogs(c.global_step, c.epoch, c.offset, lr, last, read, norm)
                    for cb in stepwise:
                        cb.on_step_end(trainer, taken)
                if (
                    trainer.checkpoint_every
                    and c.global_step % trainer.checkpoint_every == 0
                    and c.global_step != step_target  # the closing save follows
                ):
                    if c.offset < n:
                        fold_losses(state, losses, sizes)
                        trainer.save_checkpoint(wait=False)
                    else:  # the epoch's last step: save after its validation, with its metric
                        save_at_epoch_end = True
                if trainer.signals.any(backend, trainer.world_size):
                    fold_losses(state, losses, sizes)
                    return None  # fit() saves and raises TrainingInterrupted
                if c.global_step == step_target:
                    break
        except BaseException:
            # The steps already taken count in the epoch's loss, as they would in
            # the state a later continue goes on from. Not under DDP: reading the
            # losses is a collective, which the other ranks would not join.
            if not distributed:
                with contextlib.suppress(Exception):
                    fold_losses(state, losses, sizes)
            raise
        fold_losses(state, losses, sizes)
        if c.offset < n:  # stopped by steps= in the middle of the epoch
            return None
        loss_sum, count = state.epoch_partial
        c.epoch, c.offset, state.epoch_partial = c.epoch + 1, 0, (0.0, 0)
        backend.end_epoch()
        logs: dict[str, Any] = {
            "epoch": c.epoch,
            "segment": call.segment,
            "mode": call.mode,
            "step": c.global_step,
            "loss": loss_sum / count if count and loss_sum is not None else None,
            **backend.epoch_logs(),
        }
        if val_data is not None:
            logs.update(validate(trainer, val_data))
        # The rate the epoch's last step used (a resume at the epoch's end has already
        # set the next step's rate on the optimizer).
        logs["lr"] = (
            state.lr_at(max(c.global_step - 1, c.schedule_origin))
            if per_step_lr
            else backend.learning_rate()
        )
        progress.end_epoch(logs)
        state.history.append(logs)
        saver.append(f"history-run{c.run}.jsonl", logs)
        if call.verbose and trainer.rank == 0:
            print(_epoch_line(logs, target), flush=True)
        saver.check_monitor_logged(logs)
        stop = [type(cb).__name__ for cb in trainer.callbacks if cb.on_epoch_end(trainer, logs)]
        requested = trainer.control.take_stop_request()
        stop += [requested] if requested else []
        # Not after the call's last epoch or a stop: the call's closing save follows.
        last = stop or c.epoch >= target or c.global_step == step_target
        if save_at_epoch_end and not last:
            trainer.save_checkpoint(wait=False)
        if stop:
            return stop[0]
        if c.global_step == step_target:
            break
    return None


def fold_losses(state: TrainingState, losses: list[Any], sizes: list[int]) -> None:
    """Add the pending step losses to the epoch's running sum, in step order.

    A plain left-to-right float64 sum, so an epoch split by a resume adds up to the
    same bits as an uninterrupted one.
    """
    if not losses:
        return
    total, count = state.epoch_partial
    values = state.backend.read_losses(losses)
    if values is not None and not np.isfinite(values).all():
        # Where the loss stays on the device (a GPU, DDP) this is where a NaN shows:
        # at a readout, before anything is saved. Every rank holds the same values.
        i = int(np.flatnonzero(~np.isfinite(values))[0])
        c = state.counters
        step = c.global_step - len(values) + i + 1
        raise NonFiniteLossError(step, c.epoch, float(values[i]), seen_at=c.global_step)
    if values is None or total is None:
        state.epoch_partial = (None, count + sum(sizes))
    else:
        for v, s in zip(values.tolist(), sizes, strict=True):
            total += v * s
        state.epoch_partial = (total, count + sum(sizes))
    losses.clear()
    sizes.clear()


def validate(trainer: Trainer, val_data: Any) -> dict[str, float]:
    """Validation metrics, with the training streams restored afterwards (E5)."""
    backend = trainer.backend
    try:
        with trainer.state.streams.untouched():
            metrics = backend.evaluate(val_data, trainer.batch_size)
    finally:
        backend.train_mode(True)
    return {f"val_{k}": v for k, v in metrics.items()}


def _epoch_line(logs: Mapping[str, Any], target: int) -> str:
    parts = [f"epoch {logs['epoch']}" + (f"/{target}" if target != sys.maxsize else "")]
    for k, v in logs.items():
        if isinstance(v, float) and k != "lr":
            parts.append(f"{k}={v:.4f}")
    parts.append(f"lr={logs['lr']:.3g}")
    return "  ".join(parts)
