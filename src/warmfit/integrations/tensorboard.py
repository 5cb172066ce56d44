"""TensorBoard logging of a run, across fit calls, processes and restarts.

:class:`TensorBoardLogger` writes, through ``torch.utils.tensorboard`` (the
``tensorboard`` extra: ``pip install warmfit[tensorboard]``), with the global step as
the x axis:

- per step (every ``every_n_steps``): ``train/loss_step`` and ``train/lr``;
- per epoch: every number of the epoch's logs as ``epoch/<key>`` (``epoch/loss``,
  ``epoch/val_loss``, metrics, ``epoch/lr``);
- per fit call: a text entry ``fit_calls`` (the call's index, mode and where it starts)
  and the scalar ``fit_call`` (the call's index) at its first step, so the call
  boundaries show on every chart.

Each run (a ``restart`` begins one) writes to its own folder, ``<log_dir>/run<N>``.
A resumed run (a new process on the run directory, after a crash or a stop) opens its
folder with ``purge_step`` at the resumed step: TensorBoard then drops what the process
before it had logged past its last checkpoint, so every step is shown once, with the
values of the training that counts. Only rank 0 writes under torchrun.

Reading a step's loss is a host sync on a GPU: log it every ``every_n_steps`` steps
(the per-epoch logs cost nothing extra). The logger keeps no training state: a
checkpoint holds nothing of it, and it changes nothing the run computes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..callbacks import Callback, StepLogs
from ..errors import check_int

if TYPE_CHECKING:
    from ..trainer import Trainer


class TensorBoardLogger(Callback):
    """Log a run to TensorBoard (see the module docstring for what and where)."""

    def __init__(self, log_dir: str | os.PathLike[str], *, every_n_steps: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's module needs the tensorboard package
            raise ImportError(
                "TensorBoardLogger needs the 'tensorboard' package: "
                "pip install 'warmfit[tensorboard]' (or pip install tensorboard)."
            ) from err
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.every_n_steps = check_int(
            "every_n_steps", every_n_steps, "TensorBoardLogger", minimum=1
        )
        self._writer: Any = None
        self._run: int | None = None

    def _open(self, trainer: Trainer) -> Any:
        """The writer of the trainer's run, opened at the run's current step (anything
        logged past it before, by a process that stopped, is purged)."""
        run = trainer.counters.run
        if self._writer is None or self._run != run:
            self.close()
            self._run = run
            self._writer = self._writer_class(
                str(self.log_dir / f"run{run}"), purge_step=trainer.global_step + 1
            )
        return self._writer

    def on_fit_start(self, trainer: Trainer, mode: str) -> None:
        if trainer.rank != 0:
            return
        w, step, call = self._open(trainer), trainer.global_step, len(trainer.ledger)
        w.add_text("fit_calls", f"fit call {call}: mode={mode}, from step {step}", step + 1)
        w.add_scalar("fit_call", call, step + 1)

    def on_step_end(self, trainer: Trainer, step: StepLogs) -> None:
        if step.step % self.every_n_steps:
            return
        loss = step.loss  # under torchrun a collective: every rank reads it
        if trainer.rank == 0:
            w = self._open(trainer)
            w.add_scalar("train/loss_step", loss, step.step)
            w.add_scalar("train/lr", step.lr, step.step)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if trainer.rank != 0:
            return None
        w = self._open(trainer)
        for key, value in logs.items():
            if isinstance(value, float) and key not in ("epoch", "step"):
                w.add_scalar(f"epoch/{key}", value, logs["step"])
        return None

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the open writer (a later fit call opens it again)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (a checkpoint load tries callbacks on copies) share no open writer."""
        state = self.__dict__.copy()
        state["_writer"], state["_run"] = None, None
        return state
