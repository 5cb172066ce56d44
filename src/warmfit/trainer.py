"""The Trainer: one explicit, exact and resumable meaning of "call fit() again".

Owns the contract (``docs/design.md``, "The three modes"): the modes of a fit call,
the cursor, the data order, the fit loop, the learning rate per step, callbacks,
history, ledger, checkpoints and signals. A backend (:mod:`warmfit.backends`) owns the
framework. The fit loop is :meth:`Trainer._run_epochs` and reads top to bottom.

Modes, in one sentence each (the table is in the docs):

- ``continue`` (default): everything goes on exactly as if the previous call had
  asked for more epochs; ``fit(epochs=a); fit(epochs=b)`` equals ``fit(epochs=a+b)``
  bit for bit.
- ``warm``: keep the weights and counters, start a fresh optimizer, schedule and
  callbacks; the data order and random streams go on.
- ``restart``: a new run, indistinguishable from a freshly constructed Trainer; the
  old run stays on disk and in the ledger.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import __version__, modes, plan
from . import checkpoint as ckpt
from .backends import NonFiniteLoss, select
from .background import AsyncWriter, SaveFailedError, SnapshotBuffers
from .callbacks import Callback
from .data import Cursor, check_offset, epoch_permutation, validation_split
from .errors import (
    CheckpointError,
    NonFiniteLossError,
    StateMismatchError,
    TrainingInterrupted,
    WarmfitError,
    check_int,
    invalid_param,
)
from .history import History, Ledger, epoch_table
from .progress import Progress
from .rundir import RunDir
from .runtime import StopSignals, Streams
from .schedules import Schedule, TorchScheduler, as_schedule, describe, from_config, lr_at
from .state import Counters, HostStreams

MODES = modes.MODES
#: Settings whose change breaks exactness of a ``continue`` after a resume.
EXACTNESS_SETTINGS = ("batch_size", "seed", "memory_format", "numerics")


class Trainer:
    """Train a model with an explicit meaning for every ``fit`` call.

    Parameters
    ----------
    model:
        A ``torch.nn.Module`` or a zero-argument factory returning one (a factory lets
        ``restart`` rebuild the weights from ``seed`` without keeping a copy). Keras
        models and scikit-learn estimators are accepted too (their backends).
    optimizer:
        A factory ``params -> torch.optim.Optimizer``; ``warm`` and ``restart`` call it
        again for a fresh optimizer.
    loss:
        A callable ``(prediction, target) -> scalar tensor`` or one of
        ``"cross_entropy"``, ``"mse"``, ``"l1"``, ``"bce_with_logits"``, ``"nll"``.
    schedule:
        ``global step -> learning rate`` (see :mod:`warmfit.schedules`), a factory for a
        torch LR scheduler, or None to keep the optimizer's learning rate.
    batch_size, seed:
        The global batch size and the seed of every random stream and the data order.
    callbacks:
        :class:`~warmfit.callbacks.Callback` objects; kept on ``continue``, reset on
        ``warm`` and ``restart``.
    metrics:
        Names (``"accuracy"``) or callables ``(prediction, target) -> scalar``, reported
        on validation data.
    device:
        Where the model and in-memory data live.
    run_dir:
        A directory for checkpoints, history and ledger. If it holds a checkpoint, the
        Trainer resumes from the newest intact one and says so.
    checkpoint_every:
        Also write a checkpoint every N optimizer steps (covers ``kill -9``).
    keep_last, monitor, monitor_mode:
        Retention, per run: keep the last ``keep_last`` checkpoints and the best by
        ``monitor``; a finished run (before a ``restart``) keeps its own for good.
    deterministic:
        Turn on ``torch.use_deterministic_algorithms`` during fit (needed for bit-exact
        results on a GPU; for Keras on the torch backend too, refused on Keras' other
        backends; nothing to switch for scikit-learn); the caller's setting is put back
        after each call, and the flag is recorded in the ledger. On CUDA, torch also
        needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before the process starts.
    framework:
        ``"torch"``, ``"keras"`` or ``"sklearn"``; None infers it from the model (a
        factory of a Keras model must say ``"keras"``).
    backend_options:
        Options for the backend only, e.g. ``{"estimators_per_round": 10}`` for a
        scikit-learn ensemble.
    override:
        Settings you changed on purpose since the checkpoint in ``run_dir`` was written
        (e.g. ``("batch_size",)``); without it such a change is an error on ``continue``.
    """

    def __init__(
        self,
        model: Any,
        *,
        optimizer: Callable[..., Any] | None = None,
        loss: Callable[..., Any] | str | None = None,
        schedule: Any = None,
        batch_size: int = 32,
        seed: int = 0,
        callbacks: Iterable[Callback] = (),
        metrics: Iterable[Any] | Mapping[str, Any] = (),
        device: str = "cpu",
        run_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        keep_last: int = 3,
        monitor: str = "val_loss",
        monitor_mode: str = "min",
        deterministic: bool = False,
        num_workers: int = 0,
        override: Iterable[str] = (),
        verbose: int = 1,
        backend_options: Mapping[str, Any] | None = None,
        framework: str | None = None,
    ) -> None:
        p = plan.validate("Trainer", plan.TRAINER, plan.arguments(locals()))
        batch_size, seed, checkpoint_every = p["batch_size"], p["seed"], p["checkpoint_every"]
        verbose, override = p["verbose"], p["override"]
        kwargs: dict[str, Any] = {"device": device}
        if optimizer is not None:
            kwargs["optimizer"] = optimizer
        if loss is not None:
            kwargs["loss"] = loss
        if metrics:
            kwargs["metrics"] = metrics
        if num_workers:
            kwargs["num_workers"] = num_workers
        kwargs.update(backend_options or {})
        self._backend = select(model, framework=framework, **kwargs)
        if deterministic:
            self._backend.check_deterministic()  # a backend that cannot honour it says so
        self.world_size: int = self._backend.world_size
        self.rank: int = self._backend.rank
        self.batch_size = batch_size
        self.seed = seed
        self.schedule = as_schedule(schedule)
        if self.schedule is not None:
            self._backend.check_schedule(self.schedule)  # one the backend cannot drive
        self.callbacks = _check_callbacks(callbacks)
        self.deterministic = deterministic
        self.checkpoint_every = checkpoint_every
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.override = set(override)
        self.verbose = verbose
        self.fit_verbose = verbose  # the verbosity of the fit call in progress (or the last)
        self.ledger = Ledger()
        self._signals = StopSignals()
        self._pending_diffs: list[str] = []
        self._writer: AsyncWriter | None = None
        self._buffers: SnapshotBuffers | None = None
        self._restored_metric: tuple[int, int, float | None] | None = None
        self._monitor_checked = False  # see _check_monitor_logged
        # The fit call in progress, or one that was interrupted: what it asked for and
        # where it ends. Part of the state, so that the same call run again finishes it.
        self._open_call: dict[str, Any] | None = None
        self._stop_requested: str | None = None  # Control.stop, acted on at the epoch's end
        self.control = Control(self)
        self._new_run(first=True)
        self._check_plateau(self.schedule)
        self.run_dir: RunDir | None = None
        if run_dir is not None:
            self.run_dir = RunDir(run_dir, keep_last=keep_last, monitor_mode=monitor_mode)
            self._writer, self._buffers = AsyncWriter(), SnapshotBuffers()
            if self.rank == 0:  # one writer: rank 0 writes the replicated state
                self.run_dir.lock()
                self.run_dir.clean_temporary()
            self._resume_from_run_dir()

    # -- public state ------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The model being trained (the same object across ``restart``)."""
        return self._backend.model

    @property
    def optimizer(self) -> Any:
        """The framework's optimizer (None for a scikit-learn estimator)."""
        return self._backend.optimizer

    @property
    def epoch(self) -> int:
        """Epochs completed in this run."""
        return self.counters.epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps taken in this run."""
        return self.counters.global_step

    @property
    def cursor(self) -> Cursor:
        """The data position: (epoch, offset in samples into that epoch's order)."""
        return Cursor(self.counters.epoch, self.counters.offset)

    @property
    def learning_rate(self) -> float:
        return self._backend.learning_rate()

    # -- fit ---------------------------------------------------------------------------
    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        epochs: int | None = None,
        until_epoch: int | None = None,
        mode: str = "continue",
        validation_data: tuple[Any, Any] | None = None,
        validation_split: float | None = None,
        shuffle: bool = True,
        schedule: Any = None,
        verbose: int | None = None,
        rounds: int | None = None,
        steps: int | None = None,
        new_data: bool = False,
    ) -> History:
        """Train for ``epochs`` *additional* epochs (or until global epoch ``until_epoch``).

        ``mode`` is ``"continue"`` (default), ``"warm"`` or ``"restart"`` — see the class
        docstring and the modes table in ``docs/design.md``. ``schedule=`` replaces the
        schedule from this call on (recorded in the ledger). An interrupted epoch counts
        as one of the ``epochs``: training always ends on an epoch boundary.

        ``steps=N`` trains exactly N more optimizer steps instead, and may stop in the
        middle of an epoch (the cursor keeps the offset; the next call finishes that
        epoch first). ``new_data=True`` declares a new chunk of a stream (as scikit-learn's
        ``partial_fit``): the same-data check of ``continue`` is skipped; the cursor must
        be on an epoch boundary. ``rounds`` is the spelling of ``epochs`` for estimators
        that grow by rounds (scikit-learn ensembles with ``warm_start``): one round is one
        epoch of the loop.

        Returns the run's :class:`~warmfit.history.History` (all epochs of the run).
        Raises ``ValueError`` before anything changes when the arguments or the data are
        wrong, :class:`~warmfit.errors.NonFiniteLossError` on a NaN/inf loss and
        :class:`~warmfit.errors.TrainingInterrupted` after SIGINT/SIGTERM.
        """
        p = plan.validate("Trainer.fit", plan.FIT, plan.arguments(locals()))
        epochs, until_epoch, steps, rounds = p["epochs"], p["until_epoch"], p["steps"], p["rounds"]
        shuffle, new_data, verbose = p["shuffle"], p["new_data"], p["verbose"]
        validation_split = p["validation_split"]
        self._backend.check_mode(mode)  # a backend that cannot honour a mode says so first
        if rounds is not None:
            if epochs is not None:
                raise ValueError("Pass either 'rounds' or 'epochs' (they mean the same), not both.")
            epochs = rounds
        if (epochs is None) + (until_epoch is None) + (steps is None) != 2:
            raise ValueError(
                "Trainer.fit needs exactly one of 'epochs' (additional epochs), 'until_epoch' "
                f"(the absolute target) and 'steps' (optimizer steps). Got epochs={epochs!r}, "
                f"until_epoch={until_epoch!r}, steps={steps!r}."
            )
        if validation_data is not None and validation_split is not None:
            raise ValueError("Pass either validation_data or validation_split, not both.")
        verbose = self.verbose if verbose is None else verbose
        self.fit_verbose = verbose  # what callbacks print by (the call's, not the Trainer's)
        new_schedule = as_schedule(schedule) if schedule is not None else None
        if new_schedule is not None:
            self._backend.check_schedule(new_schedule)  # before the data: a cheap refusal
            self._check_plateau(new_schedule)
        data = self._backend.prepare(x, y)
        fp, shape = self._backend.fingerprint(data)
        request = {
            "mode": mode,
            "epochs": epochs,
            "until_epoch": until_epoch,
            "steps": steps,
            "new_data": new_data,
            "shuffle": shuffle,
            "validation_split": validation_split,
            "fingerprint": fp,
        }
        # The same call again after an interruption (a requeued script or command) finishes
        # the interrupted call: it ends where that call would have ended (E8).
        open_call = self._open_call
        resumes = open_call is not None and open_call["request"] == request
        if resumes:
            target, step_target = open_call["target"], open_call["step_target"]
            mode_applied = "continue"  # the call's mode was applied when it started
        else:
            start_epoch = 0 if mode == "restart" else self.counters.epoch
            step_start = 0 if mode == "restart" else self.counters.global_step
            target = None if steps is not None else (
                start_epoch + epochs if epochs is not None else until_epoch
            )  # fmt: skip
            step_target = None if steps is None else step_start + steps
            mode_applied = mode
            if target is not None and target <= start_epoch:
                raise ValueError(
                    f"until_epoch={until_epoch} is at or below the current epoch {start_epoch}: "
                    "no training would occur. Pass a larger until_epoch, epochs=N for N more "
                    "epochs, or mode='restart' to train from scratch."
                )
        n_total = len(data)
        val_rows = None
        if validation_split is not None:
            train_rows, val_rows = validation_split_rows(n_total, validation_split, self.seed)
            kept = self._kept_val_rows(mode_applied, shape, validation_split)
            if kept is not None and not np.array_equal(kept, val_rows):
                # The split is fixed for the run: rows that validated never become training
                # rows because the seed changed (override=("seed",), or mode='warm').
                val_rows = kept
                train_rows = np.setdiff1d(np.arange(n_total, dtype=np.int64), kept)
        if new_data and self.counters.offset:
            raise ValueError(
                "new_data=True needs the cursor on an epoch boundary; finish the epoch first "
                "(fit the previous data with until_epoch=trainer.epoch + 1) or use mode='warm'."
            )
        data_changed = (
            None if new_data else self._check_data(mode_applied, fp, shape, validation_split)
        )
        if self._pending_diffs and mode == "continue":
            breaking = [d for d in self._pending_diffs if _setting(d) in EXACTNESS_SETTINGS]
            if breaking:
                raise StateMismatchError(
                    "this Trainer's settings differ from the checkpoint it resumed: "
                    + "; ".join(breaking)
                    + ". A 'continue' would not be exact. Use the checkpoint's settings, fit "
                    "with mode='warm', or pass override=(...) naming the settings you changed."
                )
        if val_rows is not None:
            val_data = self._backend.subset(data, val_rows)
            data = self._backend.subset(data, train_rows)
        elif validation_data is not None:
            val_data = self._backend.prepare(*_pair(validation_data))
        else:
            val_data = None
        if self.counters.offset and mode_applied == "continue":
            check_offset(self.counters.offset, self.batch_size, len(data))
        # Every refusal that needs the data (the model and the loss take it; a schedule
        # or learning rate the backend can drive): warm and restart rebuild the optimizer.
        self._backend.preflight(
            mode_applied,
            data,
            val_data,
            batch_size=self.batch_size,
            schedule=new_schedule,
            sets_lr=self._sets_lr(new_schedule),
        )

        # Everything checked: apply the mode.
        self._restored_metric = None  # scores weights restored in an earlier call
        if data_changed:  # warned only now, so a call refused above does not warn first
            warnings.warn(data_changed, stacklevel=2)
        changes: dict[str, Any] = {}
        if open_call is not None and not resumes:
            changes["abandoned_call"] = open_call["call"]
            warnings.warn(
                f"fit call {open_call['call']} ({_describe_request(open_call['request'])}) "
                f"stopped before its end ({_call_end(open_call)}): this call "
                f"({_describe_request(request)}) differs from it, so it starts anew from the "
                f"cursor (global step {self.counters.global_step}) and the interrupted call "
                "stays unfinished. To finish that call where it would have ended, repeat it "
                "with the same arguments and data.",
                stacklevel=2,
            )
        modes.apply(mode_applied, _ModeOperations(self))
        if mode_applied == "warm":
            self._partial = (0.0, 0)  # the epoch's loss: of the new regime only (design.md)
            if self._warm_restarts_epoch(shape, validation_split, len(data)):
                c = self.counters
                changes["cursor"] = {"epoch": c.epoch, "offset": c.offset, "now": 0}
                c.offset = 0
        if new_schedule is not None:
            changes["schedule"] = {"from": describe(self.schedule), "to": describe(new_schedule)}
            self.schedule = new_schedule
            self._backend.set_schedule(new_schedule)
        if self._pending_diffs:
            changes["settings"] = list(self._pending_diffs)
            self._pending_diffs = []
        self._data_info = {
            "fingerprint": fp,
            "shape": shape,
            "validation_split": validation_split,
        }
        self._val_rows = val_rows

        if resumes:  # the same segment: its epochs are the interrupted call's
            segment = open_call["segment"]
        else:
            segment = self.counters.fit_calls
            self.counters.fit_calls += 1
        record: dict[str, Any] = {
            "call": len(self.ledger),
            **({"resumes_call": open_call["call"]} if resumes else {}),
            "run": self.counters.run,
            "segment": segment,
            "mode": mode,
            "epochs_asked": epochs,
            "until_epoch": until_epoch,
            "steps_asked": steps,
            "epoch_start": self.counters.epoch,
            "step_start": self.counters.global_step,
            "fingerprint": fp,
            "data_shape": shape,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "schedule": describe(self.schedule),
            "deterministic": self.deterministic,
            "world_size": self.world_size,
            "changes": changes,
        }
        started = time.perf_counter()
        stopped_by = interrupted = None
        with self._signals.installed():  # until the closing save is written
            try:
                shown = bool(verbose) and self.rank == 0
                with self._swapped_in(train=True), Progress(shown) as progress:
                    self._progress = progress
                    self._open_call = {
                        "call": open_call["call"] if resumes else record["call"],
                        "segment": segment,
                        "request": request,
                        "target": target,
                        "step_target": step_target,
                    }
                    for cb in self.callbacks:
                        cb.on_fit_start(self, mode)
                    stopped_by = self._run_epochs(
                        data, val_data, target, step_target, segment, mode, shuffle, verbose
                    )
                    # A signal at a step boundary, or one that came during the last epoch's
                    # validation or after the last step: either way it is acted on here.
                    interrupted = self._signals.agreed(self._backend, self.world_size)
                    stopped_by = interrupted or stopped_by
            except BaseException:
                if self._writer is not None:  # the saves this call started are on disk
                    self._writer.drain()  # before its error reaches the caller
                raise
            finally:
                record.update(
                    epochs_done=self.counters.epoch - record["epoch_start"],
                    step_end=self.counters.global_step,
                    wall_s=round(time.perf_counter() - started, 4),
                    final=_final_metrics(self.history, segment),
                    stopped_by=stopped_by,
                )
                self.ledger.append(record)
                self._append_jsonl("ledger.jsonl", record)
            if interrupted is not None:
                self._interrupt(interrupted)  # saves (the ledger row included) and raises
            self._open_call = None  # finished: the same call again trains more
            for cb in self.callbacks:
                cb.on_fit_end(self)
            path = self._checkpoint(wait=True) if self.run_dir is not None else None
            late = self._signals.agreed(self._backend, self.world_size)  # in the closing save
            if late is not None:
                self._interrupt(late, saved=path)
        if verbose and self.rank == 0:
            self._summary(segment)
        return self.history

    def _run_epochs(
        self,
        data: Any,
        val_data: Any,
        target: int | None,
        step_target: int | None,
        segment: int,
        mode: str,
        shuffle: bool,
        verbose: int,
    ) -> str | None:
        """The fit loop: from the cursor to epoch ``target`` (or global step ``step_target``);
        returns why it stopped early."""
        backend, c = self._backend, self.counters
        distributed = self.world_size > 1  # a stop must be agreed by every rank
        if target is None:
            target = sys.maxsize
        n, bs = len(data), self.batch_size
        per_step_lr = self.schedule is not None and not isinstance(self.schedule, TorchScheduler)
        if c.offset < n or not per_step_lr:
            # Not at an epoch's end: there the optimizer keeps the rate of the epoch's
            # last step, as in an uninterrupted run; the next step sets its own.
            self._apply_lr()
        progress = self._progress
        while c.epoch < target:
            order = epoch_permutation(self.seed, c.epoch, n, shuffle=shuffle)
            progress.start_epoch(
                c.epoch + 1, None if target == sys.maxsize else target, -(-n // bs), c.offset // bs
            )
            losses, sizes = [], []
            save_at_epoch_end = False
            try:
                for batch in backend.batches(data, order, c.offset, bs, c.epoch):
                    if per_step_lr:
                        backend.set_learning_rate(self._lr_at(c.global_step))
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
                    if (
                        self.checkpoint_every
                        and c.global_step % self.checkpoint_every == 0
                        and c.global_step != step_target  # the closing save follows
                    ):
                        if c.offset < n:
                            self._fold_losses(losses, sizes)
                            self._checkpoint(wait=False)
                        else:  # the epoch's last step: save after its validation, with its metric
                            save_at_epoch_end = True
                    if self._signals.any(backend, self.world_size):
                        self._fold_losses(losses, sizes)
                        return None  # fit() saves and raises TrainingInterrupted
                    if c.global_step == step_target:
                        break
            except BaseException:
                # The steps already taken count in the epoch's loss, as they would in
                # the state a later continue goes on from. Not under DDP: reading the
                # losses is a collective, which the other ranks would not join.
                if not distributed:
                    with contextlib.suppress(Exception):
                        self._fold_losses(losses, sizes)
                raise
            self._fold_losses(losses, sizes)
            if c.offset < n:  # stopped by steps= in the middle of the epoch
                return None
            loss_sum, count = self._partial
            c.epoch, c.offset, self._partial = c.epoch + 1, 0, (0.0, 0)
            backend.end_epoch()
            logs: dict[str, Any] = {
                "epoch": c.epoch,
                "segment": segment,
                "mode": mode,
                "step": c.global_step,
                "loss": loss_sum / count if count and loss_sum is not None else None,
            }
            if val_data is not None:
                logs.update(self._validate(val_data))
            # The rate the epoch's last step used (a resume at the epoch's end has already
            # set the next step's rate on the optimizer).
            logs["lr"] = (
                self._lr_at(max(c.global_step - 1, c.schedule_origin))
                if per_step_lr
                else backend.learning_rate()
            )
            progress.end_epoch(logs)
            self.history.append(logs)
            self._append_jsonl(f"history-run{c.run}.jsonl", logs)
            if verbose and self.rank == 0:
                print(_epoch_line(logs, target), flush=True)
            self._check_monitor_logged(logs)
            stop = [type(cb).__name__ for cb in self.callbacks if cb.on_epoch_end(self, logs)]
            stop += [self._stop_requested] if self._stop_requested else []
            self._stop_requested = None
            # Not after the call's last epoch or a stop: the call's closing save follows.
            last = stop or c.epoch >= target or c.global_step == step_target
            if save_at_epoch_end and not last:
                self._checkpoint(wait=False)
            if stop:
                return stop[0]
            if c.global_step == step_target:
                break
        return None

    def _check_monitor_logged(self, logs: Mapping[str, Any]) -> None:
        """Once per Trainer: warn if a ``monitor`` the user chose (not the default
        ``val_loss``, which a run without validation data simply lacks) is not among the
        first epoch's logs: a misspelt key would leave "best" nothing to rank."""
        if self._monitor_checked:
            return
        self._monitor_checked = True
        if self.run_dir is None or self.monitor == "val_loss" or self.monitor in logs:
            return
        if self.rank == 0:
            keys = sorted(k for k, v in logs.items() if isinstance(v, float))
            warnings.warn(
                f"Trainer(monitor={self.monitor!r}) is not in the epoch's logs {keys}: "
                "checkpoints carry no metric, so 'best' retention and rewind('best') have "
                "nothing to rank. Monitor one of those keys (and pass validation data for "
                "a val_ key).",
                stacklevel=4,
            )

    def _fold_losses(self, losses: list[Any], sizes: list[int]) -> None:
        """Add the pending step losses to the epoch's running sum, in step order.

        A plain left-to-right float64 sum, so an epoch split by a resume adds up to the
        same bits as an uninterrupted one.
        """
        if not losses:
            return
        total, count = self._partial
        values = self._backend.read_losses(losses)
        if values is not None and not np.isfinite(values).all():
            # Where the loss stays on the device (a GPU, DDP) this is where a NaN shows:
            # at a readout, before anything is saved. Every rank holds the same values.
            i = int(np.flatnonzero(~np.isfinite(values))[0])
            c = self.counters
            step = c.global_step - len(values) + i + 1
            raise NonFiniteLossError(step, c.epoch, float(values[i]), seen_at=c.global_step)
        if values is None or total is None:
            self._partial = (None, count + sum(sizes))  # type: ignore[assignment]
        else:
            for v, s in zip(values.tolist(), sizes, strict=True):
                total += v * s
            self._partial = (total, count + sum(sizes))
        losses.clear()
        sizes.clear()

    # -- evaluate / predict ------------------------------------------------------------
    def evaluate(self, x: Any, y: Any = None, *, batch_size: int | None = None) -> dict[str, float]:
        """Loss and metrics on (x, y); never changes the training state or its streams."""
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size, "Trainer.evaluate", minimum=1)
        data = self._backend.prepare(x, y)
        self._backend.check_data(data, with_target=True, what="evaluate:")
        with self._swapped_in(train=False):
            return self._backend.evaluate(data, batch_size or self.batch_size)

    def predict(self, x: Any, *, batch_size: int | None = None) -> Any:
        """The model's outputs for ``x`` in inference mode, in the framework's array type."""
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size, "Trainer.predict", minimum=1)
        with self._swapped_in(train=False):
            return self._backend.predict(x, batch_size or self.batch_size)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole training state as plain data: ``{"tensors": {name: ndarray}, "state":
        {...JSON...}}`` — copies, safe to keep while training goes on."""
        tensors, state = self._collect_state()
        return {"tensors": {k: np.array(v, copy=True) for k, v in tensors.items()}, "state": state}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (or a checkpoint's contents); then ``continue`` is exact.

        The arrays are copied: ``state_dict`` stays the caller's, and later changes to it
        do not reach this trainer."""
        tensors = {name: np.array(a) for name, a in state_dict["tensors"].items()}
        self._load_compared(tensors, state_dict["state"], stacklevel=3)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint folder at ``path`` (atomically; see :mod:`warmfit.checkpoint`).

        Under torchrun every rank must call it (the ranks' random streams are gathered);
        rank 0 writes.
        """
        tensors, state = self._collect_state()
        if self.rank != 0:
            self._backend.barrier()
            return Path(path)
        written = ckpt.write_checkpoint(path, tensors, state)
        if self.world_size > 1:
            self._backend.barrier()
        return written

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any, **kwargs: Any) -> Trainer:
        """Build a Trainer with ``kwargs`` and restore the checkpoint at ``path`` into it."""
        tensors, state = ckpt.read_checkpoint(path)
        trainer = cls(model, **kwargs)
        trainer._load_compared(tensors, state, stacklevel=3)
        return trainer

    def rewind(
        self,
        to: str | os.PathLike[str] = "best",
        *,
        epoch: int | None = None,
        step: int | None = None,
    ) -> Path:
        """Restore the whole state — weights, optimizer, counters, random streams,
        callbacks, history — from a checkpoint of the run directory, so that a following
        ``continue`` is exact from there. Recorded in the ledger, and saved: the rewound
        state becomes the run directory's newest checkpoint, so a new process resumes
        from it too.

        ``to="best"`` (by ``monitor``), ``"latest"``, a checkpoint path; or ``epoch=K``
        (the checkpoint at the end of global epoch K) or ``step=S``.
        """
        if self.run_dir is None:
            raise ValueError(
                "rewind needs checkpoints: construct the Trainer with run_dir=... (or use "
                "load_state_dict with a state_dict() you kept)."
            )
        if self._writer is not None:
            self._writer.wait()
        path = self._find_checkpoint(to, epoch, step)
        tensors, state = ckpt.read_checkpoint(path)
        ledger = self.ledger
        self._load_state(tensors, state)
        self.ledger = ledger  # the ledger records everything, the rewind included
        record = {
            "call": len(self.ledger),
            "run": self.counters.run,
            "mode": "rewind",
            "to": Path(path).name,
            "epoch_start": self.counters.epoch,
            "step_start": self.counters.global_step,
            "step_end": self.counters.global_step,
            "epochs_done": 0,
            "wall_s": 0.0,
            "final": _final_metrics(self.history, self.history[-1]["segment"])
            if len(self.history)
            else {},
        }
        self.ledger.append(record)
        self._append_jsonl("ledger.jsonl", record)
        # The history file is append-only: mark the epochs after this one as gone.
        self._append_jsonl(
            f"history-run{self.counters.run}.jsonl", {"rewound_to_epoch": self.counters.epoch}
        )
        # The rewound state, its ledger row included, is the run dir's newest checkpoint:
        # a new process on the run dir resumes from here, not from before the rewind.
        self._checkpoint(wait=True)
        if self.verbose and self.rank == 0:
            print(
                f"warmfit: rewound to {path} (epoch {self.counters.epoch}, "
                f"step {self.counters.global_step})",
                flush=True,
            )
        return Path(path)

    def _find_checkpoint(self, to: Any, epoch: int | None, step: int | None) -> Path:
        assert self.run_dir is not None
        if epoch is not None or step is not None:
            for path in reversed(self.run_dir.checkpoints()):
                c = ckpt.read_state(path)["counters"]
                if c["run"] != self.counters.run:
                    continue
                if (epoch is not None and c["epoch"] == epoch and c["offset"] == 0) or (
                    step is not None and c["global_step"] == step
                ):
                    return path
            kept = [p.name for p in self.run_dir.checkpoints()]
            raise ValueError(
                f"No checkpoint of run {self.counters.run} at "
                f"{'epoch ' + str(epoch) if epoch is not None else 'step ' + str(step)}. "
                f"Checkpoints kept: {kept}. Raise keep_last, or rewind to one of them."
            )
        if to == "best":
            found = self.run_dir.best(run=self.counters.run)  # the best of this run
        elif to == "latest":
            found = self.run_dir.latest()
        else:
            found = Path(to)
        if found is None:
            raise ValueError(f"There is no {to!r} checkpoint in {self.run_dir.root} yet.")
        return found

    def plot_history(self, path: str | os.PathLike[str]) -> Path:
        """Learning curves of the current run: train and validation loss over global
        epochs, fit-call boundaries labelled with their mode, the best epoch marked, the
        learning rate on a second axis. Writes a PNG."""
        from .plots import plot_history

        return plot_history(
            self.history.records,
            self.ledger.records,
            path,
            monitor=self.monitor,
            mode=self.monitor_mode,
        )

    def close(self) -> None:
        """Wait for a save in flight, release the run directory's lock and, under
        torchrun, the DDP wrapper (the trainer cannot train after this). A failure of
        that last save is raised (:class:`~warmfit.background.SaveFailedError`) after
        the lock is released."""
        try:
            if self._writer is not None:
                self._writer.wait()
        finally:
            if self.run_dir is not None:
                self.run_dir.unlock()
            self._backend.close()

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` copy; refused with a ``run_dir``, which
        one Trainer at a time owns (the copy could not save there)."""
        if self.run_dir is not None:
            raise TypeError(
                f"A Trainer with a run_dir ({self.run_dir.root}) cannot be copied or "
                "pickled: one Trainer at a time owns a run directory, so the copy could not "
                "save there. Copy a Trainer built without run_dir, or build a new Trainer "
                "and load_state_dict(trainer.state_dict()) into it."
            )
        return self.__dict__.copy()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        # Leaving on an error: that error is the one the caller sees. A failed last
        # save is reported beside it, not raised over it.
        try:
            self.close()
        except SaveFailedError as failed:
            warnings.warn(f"{failed} (while leaving on {type(exc).__name__})", stacklevel=2)

    # -- internals: runs, modes, streams -------------------------------------------------
    def _new_run(self, *, first: bool) -> None:
        """Build or rebuild everything a run starts with, from the seed alone."""
        run = 0 if first else self.counters.run + 1
        self._backend.init_model(self.seed, first=first)
        self._backend.init_optimizer(self.schedule)
        self._base_lr = self._backend.learning_rate()
        self.counters = Counters(run=run)
        seeded = Streams.seeded(self._backend, self.seed, self.rank)
        if first:
            self._streams = seeded
        else:
            self._streams.replace(seeded.state)
        self.history = History()
        self._partial: tuple[float, int] = (0.0, 0)
        self._data_info: dict[str, Any] | None = None
        self._val_rows: np.ndarray | None = None
        self._reset_callbacks()

    def _reset_callbacks(self) -> None:
        for cb in self.callbacks:
            cb.reset()

    def _check_plateau(self, schedule: Any) -> None:
        """A callback that adjusts the rate warmfit sets each step (``adjusts_lr``, e.g.
        ReduceLROnPlateau): refuse it where something else sets the rate (a torch
        LRScheduler, a Keras schedule)."""
        adjusting = [type(cb).__name__ for cb in self.callbacks if cb.adjusts_lr]
        if not adjusting:
            return
        name = adjusting[0]
        if isinstance(schedule, TorchScheduler):
            raise TypeError(
                f"{name} scales the learning rate warmfit sets at each step, but a torch "
                "LRScheduler sets the rate itself, so the reductions would have no effect. "
                f"Pass a warmfit schedule (warmfit.schedules) or none, or drop {name}."
            )
        self._backend.check_lr_settable(name, f"Drop {name}")

    def _lr_at(self, step: int) -> float:
        base = (
            lr_at(self.schedule, step - self.counters.schedule_origin)
            if self.schedule
            else self._base_lr
        )
        for cb in self.callbacks:
            base = cb.adjust_lr(base)
        return base

    def _sets_lr(self, schedule: Any = None) -> bool:
        """Whether warmfit sets the learning rate at each step under ``schedule`` (the
        current one if None): a warmfit schedule or a callback that adjusts the rate
        (``ReduceLROnPlateau``) does; a torch ``LRScheduler`` sets it itself."""
        schedule = self.schedule if schedule is None else schedule
        if isinstance(schedule, TorchScheduler):
            return False
        return schedule is not None or any(cb.adjusts_lr for cb in self.callbacks)

    def _apply_lr(self) -> None:
        """Set the learning rate for the next step (schedule x plateau reductions)."""
        if self._sets_lr():
            self._backend.set_learning_rate(self._lr_at(self.counters.global_step))

    def _swapped_in(self, *, train: bool) -> contextlib.AbstractContextManager[None]:
        """The trainer's random streams swapped in for a call (and, for a fit call,
        deterministic algorithms switched on and the model in training mode)."""
        switch = (
            (lambda: self._backend.set_deterministic()) if train and self.deterministic else None
        )
        if not self._streams.installed:  # a nested call leaves the mode as it is
            self._backend.train_mode(train)
        return self._streams.swapped_in(keep=train, switch=switch)

    def _interrupt(self, name: str, *, saved: Path | bool | None = False) -> NoReturn:
        """Save at the current step boundary (unless ``saved``: the path of the save just
        made, None on ranks other than 0) and raise :class:`TrainingInterrupted`."""
        self._signals.received = None
        if saved is False:
            path = self._checkpoint(wait=True) if self.run_dir is not None else None
        else:
            path = saved  # type: ignore[assignment]
        call = self._open_call
        err = TrainingInterrupted(
            name, path, self.counters.global_step, None if call is None else _call_end(call)
        )
        if self.rank == 0:
            print(f"warmfit: {err}", file=sys.stderr, flush=True)
        raise err

    def _validate(self, val_data: Any) -> dict[str, float]:
        """Validation metrics, with the training streams restored afterwards (E5)."""
        try:
            with self._streams.untouched():
                metrics = self._backend.evaluate(val_data, self.batch_size)
        finally:
            self._backend.train_mode(True)
        return {f"val_{k}": v for k, v in metrics.items()}

    def _warm_restarts_epoch(self, shape: list[int], split: float | None, n: int) -> bool:
        """Whether a warm call starts the epoch in progress over: the cursor's offset
        refers to the previous call's rows (another shape or split), or is neither a batch
        boundary nor the end of this data. Finishing the epoch would then train nothing,
        or batches cut at other places."""
        offset = self.counters.offset
        if not offset:
            return False
        same_rows = self._same_rows(shape, split)
        return not same_rows or offset > n or (offset % self.batch_size != 0 and offset != n)

    def _kept_val_rows(self, mode: str, shape: list[int], split: float) -> np.ndarray | None:
        """The validation rows of the previous call, where this call keeps them: not a
        restart, the same data shape and the same ``validation_split``."""
        if mode == "restart" or self._val_rows is None or not self._same_rows(shape, split):
            return None
        return self._val_rows

    def _same_rows(self, shape: list[int], split: float | None) -> bool:
        """Whether the previous fit call had data of this shape and this
        ``validation_split``: its cursor and validation rows then refer to these rows."""
        prev = self._data_info
        return prev is not None and (list(prev["shape"]), prev.get("validation_split")) == (
            list(shape),
            split,
        )

    def _check_data(self, mode: str, fp: str, shape: list[int], split: float | None) -> str | None:
        """Refuse data a 'continue' cannot continue on; return the warning to give if the
        data changed but keeps its shape (None if it did not)."""
        prev = self._data_info
        if mode != "continue" or prev is None:
            return None
        if list(prev["shape"]) != list(shape):
            raise ValueError(
                f"The data of this 'continue' call has shape {tuple(shape)}, the previous "
                f"call's had shape {tuple(prev['shape'])}. The cursor and the data order refer "
                "to the previous data. Fit the same data, or use mode='warm' (keep the weights, "
                "fresh optimizer) or mode='restart'."
            )
        if prev.get("validation_split") != split:
            raise ValueError(
                f"validation_split={split} differs from the previous call's "
                f"{prev.get('validation_split')}; the fixed validation split would change. "
                "Pass the same validation_split, or use mode='warm'."
            )
        if prev["fingerprint"] == fp:
            return None
        return (
            f"The training data changed since the previous fit call (fingerprint {fp}, "
            f"was {prev['fingerprint']}) but has the same shape; continuing with the new "
            "data. The ledger records both fingerprints."
        )

    def _archive_history(self) -> None:
        """Before a restart: the finished run's history stays on disk (history-run<N>.jsonl
        is never rewritten) and its last checkpoints stay in the run directory."""
        if self._writer is not None:
            self._writer.wait()

    # -- internals: state ------------------------------------------------------------------
    def _collect_state(
        self, *, snapshot: bool = False
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The state's arrays (views of the live state) and its JSON part. With
        ``snapshot``, the arrays are private copies in reused buffers instead, for the
        background writer: the backend's ``snapshot_tensors`` (the torch backend's pinned
        host buffers; by default reused NumPy buffers), and :class:`SnapshotBuffers` for
        the rest."""
        rng = self._streams.current()
        backend = self._backend
        backend_tensors = backend.snapshot_tensors() if snapshot else backend.state_tensors()
        tensors: dict[str, np.ndarray] = {}  # everything but the backend's arrays
        for name, arr in rng["framework"].items():
            tensors[f"rng/{name}"] = arr
        host_ranks = {}
        if self.world_size > 1:  # every rank's own streams; rank 0's are the ones above
            for r, (host, framework) in enumerate(self._gather_rank_streams(rng)):
                if r:
                    host_ranks[str(r)] = host
                    for name, arr in framework.items():
                        tensors[f"rng/rank{r}/{name}"] = arr
        if self._val_rows is not None:
            tensors["data/val_rows"] = self._val_rows
        for i, cb in enumerate(self.callbacks):
            for name, arr in cb.state_arrays().items():
                tensors[f"callbacks/{i}/{name}"] = arr
        if not snapshot:
            tensors = {**backend_tensors, **tensors}
        else:  # the backend's arrays are its own copies already
            assert self._buffers is not None
            tensors = {**backend_tensors, **self._buffers.copy(tensors)}
        loss_sum, count = self._partial
        state = {
            "version": {"warmfit": __version__, "framework": self._backend.framework},
            "settings": {
                "batch_size": self.batch_size,
                "seed": self.seed,
                "deterministic": self.deterministic,
                "model": self._backend.describe(),
            },
            "counters": self.counters.to_dict(),
            "epoch_partial": {"loss_sum": loss_sum, "samples": count},
            "rng": {"host": rng["host"], **({"host_ranks": host_ranks} if host_ranks else {})},
            "schedule": {
                "config": self.schedule.config() if isinstance(self.schedule, Schedule) else None,
                "described": describe(self.schedule),
                "base_lr": self._base_lr,
            },
            "backend": self._backend.state_meta(),
            "data": self._data_info,
            "call": self._open_call,
            "callbacks": [
                {"class": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks
            ],
            "history": self.history.state_dict(),
            "ledger": self.ledger.state_dict(),
        }
        return tensors, state

    def _load_compared(
        self, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any], *, stacklevel: int
    ) -> None:
        """:meth:`_load_state`, then warn of settings that differ from the state's; a
        'continue' refuses those that break exactness (see :meth:`fit`)."""
        diffs = self._setting_diffs(state)
        self._load_state(tensors, state)
        self._pending_diffs = diffs
        if diffs:
            warnings.warn(_settings_warning(diffs), stacklevel=stacklevel)

    def _load_state(self, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """Restore a state: every entry is read and checked first, then applied, so a
        malformed or mismatched state raises :class:`StateMismatchError` (naming the entry)
        and leaves the trainer as it was."""
        try:
            staged = self._stage_state(tensors, state)
        except StateMismatchError:
            raise
        except Exception as err:  # malformed data of any kind: never a raw traceback
            raise StateMismatchError(
                f"the state is incomplete or malformed: {type(err).__name__}: {err}"
            ) from None
        # Apply. The backend checks everything before it changes anything.
        try:
            self._backend.load_state(tensors, state["backend"])
        except StateMismatchError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            raise StateMismatchError(
                f"the backend state is incomplete or malformed: {type(err).__name__}: {err}"
            ) from None
        self.counters = staged["counters"]
        self._streams.replace(staged["rng"])
        self._partial = staged["partial"]
        if staged["schedule"] is not None:
            self.schedule = staged["schedule"]
        self._base_lr = staged["base_lr"]
        self._data_info = staged["data"]
        self._val_rows = staged["val_rows"]
        for cb, cb_state, cb_arrays in zip(
            self.callbacks, staged["callbacks"], staged["callback_arrays"], strict=True
        ):
            cb.load_state_dict(cb_state)
            cb.load_state_arrays(cb_arrays)
        self.history = staged["history"]
        self.ledger = staged["ledger"]
        self._open_call = staged["call"]
        self._restored_metric = None  # the loaded weights are the loaded step's own

    def _stage_state(self, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> dict:
        """Read and check every entry of a state without changing the trainer."""
        counters = Counters.from_dict(dict(state["counters"]))
        for key, needs in (("history", ("epoch", "segment")), ("ledger", ()), ("callbacks", ())):
            rows = state[key]
            if not isinstance(rows, list) or not all(
                isinstance(r, dict) and all(isinstance(r.get(k), int) for k in needs)
                for r in rows
            ):
                need = f" with int {' and '.join(needs)}" if needs else ""
                raise StateMismatchError(
                    f"{key} is malformed: it must be a list of records (dicts{need}); got "
                    f"{str(rows)[:80]}."
                )
        saved_cbs = state["callbacks"]
        if [c["class"] for c in saved_cbs] != [type(cb).__name__ for cb in self.callbacks]:
            raise StateMismatchError(
                "the checkpoint's callbacks are "
                f"{[c['class'] for c in saved_cbs]}, this Trainer's are "
                f"{[type(cb).__name__ for cb in self.callbacks]}. Pass the same callbacks "
                "in the same order."
            )
        cb_arrays: list[dict[str, np.ndarray]] = [{} for _ in self.callbacks]
        for name, arr in tensors.items():
            if name.startswith("callbacks/"):
                index, _, key = name[len("callbacks/") :].partition("/")
                if not index.isdigit() or int(index) >= len(self.callbacks) or not key:
                    raise StateMismatchError(
                        f"{name} names no callback of this Trainer "
                        f"({len(self.callbacks)} callbacks)."
                    )
                cb_arrays[int(index)][key] = arr
        for cb, saved, arrays in zip(self.callbacks, saved_cbs, cb_arrays, strict=True):
            trial = copy.deepcopy(cb)  # a trial on a copy (its warnings come with the load)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial.load_state_dict(saved["state"])
                trial.load_state_arrays(arrays)
        previous = self.counters
        self.counters = counters  # _rank_streams reads the step of the staged state
        try:
            rng = self._rank_streams(tensors, state["rng"])
        finally:
            self.counters = previous
        self._backend.check_rng(rng["framework"])
        try:
            HostStreams.check(rng["host"])
        except Exception as err:
            raise StateMismatchError(
                f"rng.host is malformed ({type(err).__name__}: {err}); it must hold the "
                "Python and NumPy generator states written by warmfit."
            ) from None
        p = state["epoch_partial"]
        loss_sum, samples = p["loss_sum"], p["samples"]
        if not (loss_sum is None or isinstance(loss_sum, (int, float))) or not isinstance(
            samples, int
        ):
            raise StateMismatchError(f"epoch_partial is malformed: {p!r}")
        sched = state["schedule"]
        schedule = None
        if sched.get("config") is not None:
            saved = from_config(sched["config"])
            if not isinstance(self.schedule, Schedule) or saved.config() != self.schedule.config():
                schedule = saved
        base_lr = sched.get("base_lr", self._base_lr)
        data = state["data"]
        if data is not None and not (
            isinstance(data, dict) and isinstance(data.get("shape"), list) and "fingerprint" in data
        ):
            raise StateMismatchError(f"data is malformed: {data!r}")
        val_rows = None
        if "data/val_rows" in tensors:
            val_rows = np.asarray(tensors["data/val_rows"])
            if val_rows.dtype.kind not in "iu" or val_rows.ndim != 1:
                raise StateMismatchError("data/val_rows must be a 1-D integer array.")
            n = data["shape"][0] if data is not None and data["shape"] else None
            if not (
                len(val_rows)
                and (np.diff(val_rows) > 0).all()
                and val_rows[0] >= 0
                and (n is None or (val_rows[-1] < n and len(val_rows) < n))
            ):
                raise StateMismatchError(
                    "data/val_rows must be the rows a validation split gives: increasing, "
                    f"at least one, within the {n} rows of the data and not all of them; got "
                    f"{val_rows[:8].tolist()}{' ...' if len(val_rows) > 8 else ''}."
                )
        return {
            "counters": counters,
            "rng": rng,
            "partial": (loss_sum, samples),
            "schedule": schedule,
            "base_lr": float(base_lr),
            "data": data,
            "val_rows": val_rows,
            "callbacks": [saved["state"] for saved in saved_cbs],
            "callback_arrays": cb_arrays,
            "history": History([dict(r) for r in state["history"]]),
            "ledger": Ledger([dict(r) for r in state["ledger"]]),
            "call": _check_open_call(state.get("call")),  # None in older checkpoints
        }

    def _gather_rank_streams(
        self, rng: Mapping[str, Any]
    ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every rank's random streams, gathered as JSON bytes (no pickle)."""
        payload = json.dumps(
            {
                "host": rng["host"],
                "framework": {k: v.tobytes().hex() for k, v in rng["framework"].items()},
            }
        ).encode()
        out = []
        for blob in self._backend.gather_bytes(payload):
            doc = json.loads(blob)
            fw = {
                k: np.frombuffer(bytes.fromhex(v), dtype=np.uint8).copy()
                for k, v in doc["framework"].items()
            }
            out.append((doc["host"], fw))
        return out

    def _rank_streams(
        self, tensors: Mapping[str, np.ndarray], saved: Mapping[str, Any]
    ) -> dict[str, Any]:
        """This rank's streams from a checkpoint. A rank the checkpoint has no streams for
        (resuming at a larger world size) starts fresh streams derived from the seed, its
        rank and the step: the data order stays exact, in-model randomness cannot."""
        if self.rank == 0:
            fw = {
                k[len("rng/") :]: v
                for k, v in tensors.items()
                if k.startswith("rng/") and not k.startswith("rng/rank")
            }
            return {"host": saved["host"], "framework": fw}
        prefix = f"rng/rank{self.rank}/"
        fw = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        host = saved.get("host_ranks", {}).get(str(self.rank))
        if fw and host is not None:
            return {"host": host, "framework": fw}
        seed = self.seed + 1_000_003 * self.rank + self.counters.global_step
        return {"host": HostStreams.seeded(seed), "framework": self._backend.seeded_rng(seed)}

    def _setting_diffs(self, state: Mapping[str, Any]) -> list[str]:
        """Differences between this Trainer's settings and a checkpoint's, one line each."""
        saved = state.get("settings", {})
        if not isinstance(saved, dict) or not isinstance(saved.get("model") or {}, dict):
            raise StateMismatchError(
                f"the checkpoint's settings are malformed: {saved!r}. Expected a dict with "
                "batch_size, seed and the model's description."
            )
        diffs = []
        for key in ("batch_size", "seed", "deterministic"):
            if key in saved and saved[key] != getattr(self, key) and key not in self.override:
                diffs.append(f"{key}: checkpoint {saved[key]!r}, now {getattr(self, key)!r}")
        mine = self._backend.describe()
        for key, value in (saved.get("model") or {}).items():
            if key != "model" and mine.get(key) != value and key not in self.override:
                diffs += _leaf_diffs(key, value, mine.get(key))
        return diffs

    def _resume_from_run_dir(self) -> None:
        assert self.run_dir is not None
        found = self.run_dir.load_latest()
        if self.world_size > 1:
            self._check_ranks_agree(None if found is None else found[0])
        if found is None:
            return
        path, tensors, state = found
        self._load_compared(tensors, state, stacklevel=4)
        c = self.counters
        if self.rank == 0:
            print(
                f"warmfit: resumed from {path} (run {c.run}, epoch {c.epoch}, "
                f"offset {c.offset}, step {c.global_step})",
                flush=True,
            )

    def _check_ranks_agree(self, path: Path | None) -> None:
        """Under DDP every rank reads the run directory itself: refuse to start when they
        found different newest checkpoints (a run_dir on each node's own disk, a stale
        view of a network filesystem), which would train from different states."""
        assert self.run_dir is not None
        name = "" if path is None else path.name
        found = [b.decode() for b in self._backend.gather_bytes(name.encode())]
        if len(set(found)) > 1:
            seen = ", ".join(f"rank {r}: {n or 'none'}" for r, n in enumerate(found))
            raise CheckpointError(
                self.run_dir.checkpoints_dir,
                f"the ranks found different newest checkpoints ({seen}). Every rank must "
                "see the same run directory: put run_dir on storage that all nodes share "
                "(not a node's own disk), then start the job again.",
            )

    def _checkpoint(self, *, wait: bool) -> Path | None:
        """Snapshot the state into reused buffers and write it in the background (or wait)."""
        if self.run_dir is None or self._writer is None or self._buffers is None:
            return None
        self._writer.wait()  # one save in flight; the buffers are free again
        # A collective under DDP: every rank calls it; rank 0 copies the state into
        # reused buffers, the only work training waits for.
        snapshot, state = self._collect_state(snapshot=self.rank == 0)
        if self.rank != 0:
            return None
        state = ckpt.snapshot_state(state)
        step, run = self.counters.global_step, self.counters.run
        metric = _monitored(self.history, self.monitor, step)
        if self._restored_metric is not None and self._restored_metric[:2] == (run, step):
            metric = self._restored_metric[2]  # the weights are an earlier epoch's
        run_dir = self.run_dir
        result: dict[str, Path] = {}

        def write() -> None:
            result["path"] = run_dir.save(snapshot, state, step=step, metric=metric, run=run)

        self._writer.submit(write)
        if wait:
            self._writer.wait()
            return result.get("path")
        return None

    def _append_jsonl(self, name: str, record: Mapping[str, Any]) -> None:
        if self.run_dir is None or self.rank != 0:
            return
        with open(self.run_dir.root / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def _summary(self, segment: int) -> None:
        rec = self.ledger[-1]
        print(
            f"fit call {rec['call']} ({rec['mode']}): {rec['epochs_done']} epochs, steps "
            f"{rec['step_start']}-{rec['step_end']}, {rec['wall_s']:.2f}s",
            flush=True,
        )

    def __repr__(self) -> str:
        return (
            f"Trainer({self._backend.framework}, epoch={self.epoch}, step={self.global_step}, "
            f"run={self.counters.run}, fit_calls={self.counters.fit_calls})"
        )


class _ModeOperations:
    """The Trainer's side of :func:`warmfit.modes.apply`."""

    def __init__(self, trainer: Trainer) -> None:
        self._t = trainer

    def new_run(self) -> None:
        self._t._archive_history()
        self._t._new_run(first=False)

    def fresh_optimizer(self) -> None:
        t = self._t
        t._backend.init_optimizer(t.schedule)
        t._base_lr = t._backend.learning_rate()

    def restart_schedule(self) -> None:
        self._t.counters.schedule_origin = self._t.counters.global_step

    def reset_callbacks(self) -> None:
        self._t._reset_callbacks()


class Control:
    """What a callback may do to training: the public interface that built-in and user
    callbacks use alike (``trainer.control``). Every action keeps the run exact: it is
    taken at an epoch's end, and what it changes is in the checkpoint (the weights; the
    learning rate through the callback's own saved state and :meth:`Callback.adjust_lr`).
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def snapshot_weights(self) -> dict[str, np.ndarray]:
        """A copy of the model's weights, as plain arrays (``model/<name>``), for
        :meth:`restore_weights` (and for a callback's ``state_arrays``, which saves them)."""
        return {
            k: np.array(v, copy=True)
            for k, v in self._trainer._backend.state_tensors().items()
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
        t._backend.load_weights(weights)
        value = scored[1] if scored is not None and scored[0] == t.monitor else None
        t._restored_metric = (t.counters.run, t.counters.global_step, value)

    def apply_learning_rate(self) -> None:
        """Set the learning rate of the next step now — the schedule's, through every
        callback's :meth:`Callback.adjust_lr` — after a callback changed its factor."""
        self._trainer._apply_lr()

    def stop(self, reason: str = "a callback") -> None:
        """End the fit call after this epoch (as ``on_epoch_end`` returning True does);
        ``reason`` is recorded as the ledger's ``stopped_by``."""
        self._trainer._stop_requested = reason


def validation_split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(fraction, bool) or not isinstance(fraction, float):
        raise invalid_param("validation_split", "Trainer.fit", "a float in (0, 1)", fraction)
    return validation_split(n, fraction, seed)


def _check_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
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


def _pair(validation_data: Any) -> tuple[Any, Any]:
    if isinstance(validation_data, (tuple, list)) and len(validation_data) == 2:
        return validation_data[0], validation_data[1]
    if isinstance(validation_data, (tuple, list)) and len(validation_data) == 1:
        return validation_data[0], None
    raise ValueError(
        "validation_data must be a pair (x_val, y_val). Got "
        f"{type(validation_data).__name__} of length {_length(validation_data)}."
    )


def _length(obj: Any) -> str:
    return str(len(obj)) if hasattr(obj, "__len__") else "?"


def _describe_request(request: Mapping[str, Any]) -> str:
    """A fit call's arguments as the user wrote them: ``mode='continue', epochs=4``."""
    shown = {k: request[k] for k in ("mode", "epochs", "until_epoch", "steps")}
    shown.update({k: request[k] for k in ("new_data", "validation_split") if request[k]})
    if not request["shuffle"]:
        shown["shuffle"] = False
    return ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None)


def _call_end(call: Mapping[str, Any]) -> str:
    """Where an open fit call ends: ``epoch 4`` or ``global step 120``."""
    if call["target"] is not None:
        return f"epoch {call['target']}"
    return f"global step {call['step_target']}"


_REQUEST_KEYS = (
    "mode", "epochs", "until_epoch", "steps", "new_data", "shuffle", "validation_split",
    "fingerprint",
)  # fmt: skip


def _check_open_call(call: Any) -> dict[str, Any] | None:
    """A checkpoint's open fit call (``state["call"]``), checked."""
    if call is None:
        return None
    ok = (
        isinstance(call, dict)
        and all(isinstance(call.get(k), int) for k in ("call", "segment"))
        and isinstance(call.get("request"), dict)
        and set(call["request"]) == set(_REQUEST_KEYS)
        and all(isinstance(call.get(k), (int, type(None))) for k in ("target", "step_target"))
        and (call.get("target") is None) != (call.get("step_target") is None)
    )
    if not ok:
        raise StateMismatchError(f"call is malformed: {call!r}")
    return dict(call)


def _final_metrics(history: History, segment: int) -> dict[str, float]:
    rows = history.segment(segment)
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if isinstance(v, float) and k != "lr"}


def _setting(diff: str) -> str:
    """The top-level setting a line of :func:`_leaf_diffs` is about."""
    return diff.split(":")[0].split(".")[0].split("[")[0]


def _leaf_diffs(where: str, saved: Any, now: Any) -> list[str]:
    """``where.key: checkpoint A, now B`` for each differing leaf of two JSON values (the
    whole values where their structure differs)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [  # a key the checkpoint lacks was not recorded then (an older warmfit)
            d
            for k in sorted(set(saved) | set(now), key=str)
            if k in saved and saved.get(k) != now.get(k)
            for d in _leaf_diffs(f"{where}.{k}", saved.get(k), now.get(k))
        ]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [
            d
            for i, (a, b) in enumerate(zip(saved, now, strict=True))
            if a != b
            for d in _leaf_diffs(f"{where}[{i}]", a, b)
        ]
    return [f"{where}: checkpoint {saved!r}, now {now!r}"]


def _settings_warning(diffs: list[str]) -> str:
    text = "resuming with different settings: " + "; ".join(diffs) + "."
    if any(d.startswith("optimizer") for d in diffs):
        text += (
            " On 'continue' the optimizer keeps the checkpoint's hyper-parameters (its "
            "state is restored, as torch's load_state_dict does); fit with mode='warm' to "
            "build a fresh optimizer from the factory's."
        )
    if any(d.startswith("params.") for d in diffs):
        text += (
            " The estimator is restored whole from the checkpoint, its parameters "
            "included, so the checkpoint's values are kept; to train with a new value, "
            "call trainer.model.set_params(...) before fit (mode='warm' to record it as a "
            "change of course)."
        )
    breaking = sorted({_setting(d) for d in diffs} & set(EXACTNESS_SETTINGS))
    if breaking:
        text += (
            f" A 'continue' call will refuse {'/'.join(breaking)} changes unless they are "
            "named in override=(...) or the call uses mode='warm'."
        )
    if any(_setting(d) == "threads" for d in diffs):
        text += (
            " On the CPU torch's results can depend on the number of threads (the split of "
            "a large matrix product): set torch.set_num_threads (or OMP_NUM_THREADS) as the "
            "run that wrote the checkpoint had it for a bit-exact resume."
        )
    return text


def _monitored(history: History, monitor: str, step: int) -> float | None:
    """The monitored value of the weights at ``step``: the last epoch's, if that epoch
    ended at ``step`` (a save inside an epoch has no metric of its own)."""
    if not len(history) or history[-1].get("step") != step:
        return None
    v = history[-1].get(monitor)
    return v if isinstance(v, float) and math.isfinite(v) else None


def _epoch_line(logs: Mapping[str, Any], target: int) -> str:
    parts = [f"epoch {logs['epoch']}" + (f"/{target}" if target != sys.maxsize else "")]
    for k, v in logs.items():
        if isinstance(v, float) and k != "lr":
            parts.append(f"{k}={v:.4f}")
    parts.append(f"lr={logs['lr']:.3g}")
    return "  ".join(parts)


__all__ = ["MODES", "Trainer", "WarmfitError", "epoch_table"]
