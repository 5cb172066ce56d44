"""The Trainer: one explicit, exact and resumable meaning of "call fit() again".

Owns the contract (``docs/design.md``, "The three modes") and the order of a fit call:
**plan** (every argument, the data and the backend's refusals checked, nothing changed:
:func:`warmfit.calls.plan_call`), **apply** (the modes table: :func:`warmfit.calls.start_call`),
**run** (:func:`warmfit.loop.run_epochs`, from the cursor to the call's end) and
**record** (the ledger row, the closing checkpoint). Its collaborators, each in a
module of its own: the backend (:mod:`warmfit.backends`), the training state
(:class:`~warmfit.training_state.TrainingState`), persistence
(:class:`~warmfit.checkpointer.Checkpointer`), random streams and stop signals
(:mod:`warmfit.runtime`), the callbacks' control (:class:`~warmfit.control.Control`).

Modes: ``continue`` (default) goes on as if the previous call had asked for more epochs
(``fit(epochs=a); fit(epochs=b)`` equals ``fit(epochs=a+b)`` bit for bit); ``warm`` keeps
the weights, counters, data order and streams with a fresh optimizer, schedule and
callbacks; ``restart`` begins a new run, as a freshly built Trainer would.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import calls, modes, plan
from . import checkpoint as ckpt
from .backends import Backend, select
from .background import SaveFailedError
from .callbacks import Callback
from .checkpointer import Checkpointer
from .control import Control, check_callbacks, check_plateau
from .data import Cursor
from .errors import WarmfitError, check_int
from .fork import fork_from, fork_trainer
from .history import History, Ledger, epoch_table
from .loop import run_epochs
from .progress import Progress
from .runtime import StopSignals
from .schedules import as_schedule
from .state import Counters
from .training_state import TrainingState, final_metrics, setting_diffs, settings_warning

MODES = modes.MODES


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
        again for a fresh optimizer. A first parameter named ``model`` gets the module,
        ``named_parameters`` its ``(name, parameter)`` pairs (groups by name).
    loss:
        A callable ``(prediction, target) -> scalar tensor``, one of ``"cross_entropy"``,
        ``"mse"``, ``"l1"``, ``"bce_with_logits"``, ``"nll"``, or None (torch): the
        model's output's ``.loss`` or ``["loss"]`` (the Hugging Face convention).
    step:
        ``fn(model, batch) -> loss`` (torch): your forward and loss (a scalar tensor) on
        the batch as the data yields it, on the device; warmfit does the rest.
    precision, accumulate, clip_grad_norm, ema, ema_warmup, use_ema:
        The torch step: autocast in ``"bf16"`` or ``"fp16"`` (with a gradient scaler),
        ``accumulate`` micro-batches per global batch, clipping of the gradients' norm,
        an EMA of the weights (its decay; ``ema_warmup`` ramps it up) that validation,
        evaluate and predict use unless ``use_ema=False``; all in the checkpoint.
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
        ``"torch"``, ``"keras"``, ``"sklearn"``, or a subclass of
        :class:`warmfit.backends.Backend` (a backend of one's own, built as
        ``framework(model, **kwargs)``; :mod:`warmfit.testing` checks it); None infers it
        from the model (a factory of a Keras model must say ``"keras"``).
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
        step: Callable[[Any, Any], Any] | None = None,
        precision: str = "32",
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
        ema: float | None = None,
        ema_warmup: bool = False,
        use_ema: bool | None = None,
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
        framework: str | type[Backend] | None = None,
    ) -> None:
        self._arguments = plan.arguments(locals())  # as given: what fork() builds again
        p = plan.validate("Trainer", plan.TRAINER, self._arguments)
        given = {"optimizer": optimizer, "loss": loss, "step": step, "metrics": metrics or None,
                 "num_workers": num_workers or None}  # fmt: skip
        kwargs = {"device": device, **{k: v for k, v in given.items() if v is not None}}
        kwargs.update({k: p[k] for k, v in plan.STEP_DEFAULTS.items() if p[k] != v})
        kwargs.update(backend_options or {})
        self._backend: Backend = select(model, framework=framework, **kwargs)
        if deterministic:
            self._backend.check_deterministic()  # a backend that cannot honour it says so
        self.world_size: int = self._backend.world_size
        self.rank: int = self._backend.rank
        self.batch_size: int = p["batch_size"]
        self.seed: int = p["seed"]
        schedule = as_schedule(schedule)
        if schedule is not None:
            self._backend.check_schedule(schedule)  # one the backend cannot drive
        self.callbacks = check_callbacks(callbacks)
        self.deterministic = deterministic
        self.checkpoint_every: int | None = p["checkpoint_every"]
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.override = set(p["override"])
        self.verbose: int = p["verbose"]
        self.fit_verbose = self.verbose  # the verbosity of the fit call in progress (or last)
        self.signals = StopSignals()
        self.control = Control(self)
        self._backend.init_model(self.seed, first=True)
        self._backend.init_optimizer(schedule)
        self.state = TrainingState(self._backend, self.callbacks, schedule, seed=self.seed,
                                   rank=self.rank, world_size=self.world_size)  # fmt: skip
        check_plateau(self.callbacks, schedule, self._backend)
        self.checkpointer = Checkpointer(run_dir, self._backend, keep_last=keep_last,
                                         monitor=monitor, monitor_mode=monitor_mode)  # fmt: skip
        found = self.checkpointer.latest()
        if found is not None:
            path, tensors, state = found
            self._load_compared(tensors, state, stacklevel=3)
            c = self.counters
            if self.rank == 0:
                print(f"warmfit: resumed from {path} (run {c.run}, epoch {c.epoch}, offset "
                      f"{c.offset}, step {c.global_step})", flush=True)  # fmt: skip

    # -- public state ------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The framework adapter (:class:`~warmfit.backends.base.Backend`)."""
        return self._backend

    @property
    def model(self) -> Any:
        """The model being trained (the same object across ``restart``)."""
        return self._backend.model

    @property
    def optimizer(self) -> Any:
        """The framework's optimizer (None for a scikit-learn estimator)."""
        return self._backend.optimizer

    @property
    def counters(self) -> Counters:
        """Where training stands (:class:`~warmfit.state.Counters`)."""
        return self.state.counters

    @property
    def history(self) -> History:
        """The epochs of the current run (:class:`~warmfit.history.History`)."""
        return self.state.history

    @property
    def ledger(self) -> Ledger:
        """Every fit call of every run (:class:`~warmfit.history.Ledger`)."""
        return self.state.ledger

    @property
    def schedule(self) -> Any:
        """The learning-rate schedule in effect (None: the optimizer's own rate)."""
        return self.state.schedule

    @property
    def run_dir(self) -> Any:
        """The run directory (:class:`~warmfit.rundir.RunDir`), or None."""
        return self.checkpointer.run_dir

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
        past_horizon: str | None = None,
        cooldown: bool = False,
    ) -> History:
        """Train for ``epochs`` *additional* epochs (or until global epoch ``until_epoch``).

        ``mode``: ``"continue"`` (default), ``"warm"`` or ``"restart"`` (the modes table in
        ``docs/design.md``). ``schedule=`` replaces the schedule from this call on (in the
        ledger). An interrupted epoch counts as one of the ``epochs``.

        ``steps=N`` trains exactly N more optimizer steps instead, and may stop in the
        middle of an epoch (the cursor keeps the offset; the next call finishes that
        epoch first). ``new_data=True`` declares a new chunk of a stream (as scikit-learn's
        ``partial_fit``): the same-data check of ``continue`` is skipped; the cursor must
        be on an epoch boundary. ``rounds`` is ``epochs`` for estimators that grow by
        rounds. A ``horizon="plan"`` schedule ends where the call ends (re-planned by a
        call that ends elsewhere); ``past_horizon``, ``cooldown``: :mod:`warmfit.horizons`.

        Returns the run's :class:`~warmfit.history.History`. Raises ``ValueError`` before
        anything changes when the arguments or the data are wrong, ``NonFiniteLossError``
        on a NaN/inf loss and ``TrainingInterrupted`` after SIGINT/SIGTERM."""
        p = plan.validate("Trainer.fit", plan.FIT, plan.arguments(locals()))
        self._backend.check_mode(mode)  # a backend that cannot honour a mode says so first
        # Plan: every check, nothing changes. Apply: the modes table, the ledger row.
        planned = calls.plan_call(self, p, x, y, validation_data, schedule)
        record, call = calls.start_call(self, planned)
        # Run, from the cursor to the call's end; record it in the ledger and save.
        started = time.perf_counter()
        stopped_by = interrupted = None
        with self.signals.installed():  # until the closing save is written
            try:
                shown = bool(call.verbose) and self.rank == 0
                with self._swapped_in(train=True), Progress(shown) as progress:
                    for cb in self.callbacks:
                        cb.on_fit_start(self, mode)
                    stopped_by = run_epochs(self, planned.data, planned.val_data, call, progress)
                    # A signal at a step boundary, or one that came during the last epoch's
                    # validation or after the last step: either way it is acted on here.
                    interrupted = self.signals.agreed(self._backend, self.world_size)
                    stopped_by = interrupted or stopped_by
            except BaseException:
                self.checkpointer.drain()  # this call's saves are on disk before its error
                raise
            finally:
                record.update(
                    epochs_done=self.counters.epoch - record["epoch_start"],
                    step_end=self.counters.global_step,
                    wall_s=round(time.perf_counter() - started, 4),
                    final=final_metrics(self.history, call.segment),
                    stopped_by=stopped_by,
                )
                self.ledger.append(record)
                self.checkpointer.append("ledger.jsonl", record)
            if interrupted is not None:
                calls.interrupt(self, interrupted)  # saves (the ledger row included), raises
            self.state.call = None  # finished: the same call again trains more
            for cb in self.callbacks:
                cb.on_fit_end(self)
            path = self.save_checkpoint(wait=True)
            late = self.signals.agreed(self._backend, self.world_size)  # in the closing save
            if late is not None:
                calls.interrupt(self, late, saved=path)
        if call.verbose and self.rank == 0:
            print(f"fit call {record['call']} ({mode}): {record['epochs_done']} epochs, steps "
                  f"{record['step_start']}-{record['step_end']}, {record['wall_s']:.2f}s",
                  flush=True)  # fmt: skip
        return self.history

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
        tensors, state = self.state.state_dict(self._settings())
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
        return self.checkpointer.write_to(path, self.state, self._settings())

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any, **kwargs: Any) -> Trainer:
        """Build a Trainer with ``kwargs`` and restore the checkpoint at ``path`` into it."""
        tensors, state = ckpt.read_checkpoint(path)
        trainer = cls(model, **kwargs)
        trainer._load_compared(tensors, state, stacklevel=3)
        return trainer

    def rewind(self, to: str | os.PathLike[str] = "best", *, epoch: int | None = None,
               step: int | None = None) -> Path:  # fmt: skip
        """Restore the whole state — weights, optimizer, counters, random streams,
        callbacks, history — from a checkpoint of the run directory, so that a following
        ``continue`` is exact from there. Recorded in the ledger, and saved: the rewound
        state becomes the run directory's newest checkpoint, so a new process resumes
        from it too.

        ``to="best"`` (by ``monitor``), ``"latest"``, a checkpoint path; or ``epoch=K``
        (the checkpoint at the end of global epoch K) or ``step=S``.
        """
        path = self.checkpointer.rewind(self.state, self._settings(), to, epoch=epoch, step=step)
        c = self.counters
        if self.verbose and self.rank == 0:
            print(f"warmfit: rewound to {path} (epoch {c.epoch}, step {c.global_step})", flush=True)
        return path

    def fork(self, run_dir: str | os.PathLike[str], **overrides: Any) -> Trainer:
        """A Trainer on the new run directory ``run_dir`` from this trainer's current
        state, built with its arguments (copies; ``overrides`` replace any), the lineage
        recorded; this trainer and its run dir are not changed (``docs/fork.md``)."""
        return fork_trainer(self, run_dir, self._arguments, overrides)

    @classmethod
    def fork_from(cls, checkpoint: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                  model: Any, **kwargs: Any) -> Trainer:  # fmt: skip
        """``Trainer(model, run_dir=run_dir, **kwargs)`` on a new run directory, a fork of
        ``checkpoint`` (a checkpoint folder, or a run directory's newest intact one)."""
        return fork_from(cls, checkpoint, run_dir, model, **kwargs)

    def save_checkpoint(self, *, wait: bool) -> Path | None:
        """Save the state to the run directory, in the background unless ``wait`` (then
        the path on rank 0). Under DDP every rank calls it. Without a run dir, nothing."""
        return self.checkpointer.save(self.state, self._settings(), wait=wait)

    def plot_history(self, path: str | os.PathLike[str]) -> Path:
        """Learning curves of the current run: train and validation loss over global
        epochs, fit-call boundaries labelled with their mode, the best epoch marked, the
        learning rate on a second axis. Writes a PNG."""
        from .plots import plot_history

        history, ledger = self.history.records, self.ledger.records
        return plot_history(history, ledger, path, monitor=self.monitor, mode=self.monitor_mode)

    def close(self) -> None:
        """Wait for a save in flight, release the run directory's lock and, under
        torchrun, the DDP wrapper (the trainer cannot train after this). A failure of
        that last save is raised (:class:`~warmfit.background.SaveFailedError`) after
        the lock is released."""
        try:
            self.checkpointer.close()
        finally:
            self._backend.close()

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` copy; refused with a ``run_dir``."""
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
        try:
            self.close()
        except SaveFailedError as failed:
            if exc is None:
                raise
            # Leaving on an error: that error is the one the caller sees; a failed last
            # save is reported beside it, not raised over it.
            warnings.warn(f"{failed} (while leaving on {type(exc).__name__})", stacklevel=2)

    def __repr__(self) -> str:
        c, name = self.counters, self._backend.framework
        return f"Trainer({name}, epoch={c.epoch}, step={c.global_step}, run={c.run}, " \
            f"fit_calls={c.fit_calls})"  # fmt: skip

    # -- internals -----------------------------------------------------------------------
    def start_run(self, *, first: bool) -> None:
        """Build everything a new run starts with, from the seed alone (the modes
        table's ``restart``); the ledger and the old run's files are kept."""
        run = 0 if first else self.counters.run + 1
        self._backend.init_model(self.seed, first=first)
        self._backend.init_optimizer(self.state.schedule)
        self.state.start_run(run)

    def _settings(self) -> dict[str, Any]:
        """The settings a checkpoint records and a resume compares."""
        return dict(batch_size=self.batch_size, seed=self.seed, deterministic=self.deterministic)

    def _load_compared(
        self, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any], *, stacklevel: int
    ) -> None:
        """Load a state, then warn of settings that differ from the state's; a 'continue'
        refuses those that break exactness (see :meth:`fit`)."""
        diffs = setting_diffs(state, self._settings(), self._backend.describe(), self.override)
        self.state.load_state_dict(tensors, state)
        self.checkpointer.restored_metric = None  # the loaded weights are the loaded step's
        self.state.pending_diffs = diffs
        if diffs:
            warnings.warn(settings_warning(diffs), stacklevel=stacklevel)

    def _swapped_in(self, *, train: bool) -> contextlib.AbstractContextManager[None]:
        """The trainer's random streams swapped in for a call (and, for a fit call,
        deterministic algorithms switched on and the model in training mode)."""
        switch = self._backend.set_deterministic if train and self.deterministic else None
        streams = self.state.streams
        if not streams.installed:  # a nested call leaves the mode as it is
            self._backend.train_mode(train)
        return streams.swapped_in(keep=train, switch=switch)

__all__ = ["MODES", "Trainer", "WarmfitError", "epoch_table"]
