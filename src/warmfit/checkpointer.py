"""Persistence of a run: when and what to save, in the background, and where from to resume.

:class:`Checkpointer` owns the run directory (:class:`~warmfit.rundir.RunDir`: its lock,
retention and ``LATEST``), the background writer and its reused snapshot buffers
(:mod:`warmfit.background`), the JSONL files that grow as training goes (the ledger,
each run's history), finding the checkpoint to resume or rewind to, and the metric a
checkpoint is ranked by. Without a run directory it saves nothing and every method is a
no-op, so the Trainer never asks "is there a run directory?".

Under DDP every rank takes part in a save (the state's random streams are gathered) and
rank 0 writes; every rank reads the run directory itself and they must agree on the
newest checkpoint.

Does not own: the state (:class:`~warmfit.training_state.TrainingState`), the format of
a checkpoint folder (:mod:`warmfit.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .backends.base import Backend
from .background import AsyncWriter, SnapshotBuffers
from .errors import CheckpointError
from .history import History
from .rundir import RunDir
from .training_state import TrainingState, final_metrics


class Checkpointer:
    """Saves and finds the checkpoints of a run directory (``root``; None: none)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        backend: Backend,
        *,
        keep_last: int,
        monitor: str,
        monitor_mode: str,
    ) -> None:
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        self.monitor = monitor
        #: (run, step, value): the weights at that step were restored from an epoch that
        #: scored ``value`` (a callback's restore_weights); a save there carries it.
        self.restored_metric: tuple[int, int, float | None] | None = None
        self._monitor_checked = False  # see check_monitor_logged
        self.run_dir: RunDir | None = None
        self._writer: AsyncWriter | None = None
        self._buffers: SnapshotBuffers | None = None
        if root is None:
            return
        self.run_dir = RunDir(root, keep_last=keep_last, monitor_mode=monitor_mode)
        self._writer, self._buffers = AsyncWriter(), SnapshotBuffers()
        if self.rank == 0:  # one writer: rank 0 writes the replicated state
            self.run_dir.lock()
            self.run_dir.clean_temporary()

    # -- saving --------------------------------------------------------------------------
    def save(self, state: TrainingState, settings: Mapping[str, Any], *, wait: bool) -> Path | None:
        """Snapshot ``state`` into reused buffers and write it in the background (or wait
        for the write: then the path; None on ranks other than 0, or without a run dir).
        Under DDP a collective: every rank calls it."""
        if self.run_dir is None or self._writer is None or self._buffers is None:
            return None
        self._writer.wait()  # one save in flight; the buffers are free again
        # rank 0 copies the state into reused buffers, the only work training waits for.
        snapshot, saved = state.state_dict(
            settings, snapshot=self._buffers if self.rank == 0 else None
        )
        if self.rank != 0:
            return None
        saved = ckpt.snapshot_state(saved)
        step, run = state.counters.global_step, state.counters.run
        metric = self.metric_of(state)
        run_dir = self.run_dir
        result: dict[str, Path] = {}

        def write() -> None:
            result["path"] = run_dir.save(snapshot, saved, step=step, metric=metric, run=run)

        self._writer.submit(write)
        if wait:
            self._writer.wait()
            return result.get("path")
        return None

    def metric_of(self, state: TrainingState) -> float | None:
        """The ``monitor`` value a checkpoint of ``state`` is ranked by ("best"): the last
        epoch's, if it ended at the current step, or that of the epoch whose weights a
        callback restored; None for a state inside an epoch."""
        step, run = state.counters.global_step, state.counters.run
        if self.restored_metric is not None and self.restored_metric[:2] == (run, step):
            return self.restored_metric[2]  # the weights are an earlier epoch's
        return _monitored(state.history, self.monitor, step)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held by the reused host buffers of background saves (besides the
        backend's own, :meth:`~warmfit.backends.base.Backend.snapshot_tensors`)."""
        return 0 if self._buffers is None else self._buffers.nbytes

    def write_to(
        self, path: str | os.PathLike[str], state: TrainingState, settings: Mapping[str, Any]
    ) -> Path:
        """Write ``state`` as a checkpoint folder at ``path`` now (not in the run
        directory). Under DDP every rank calls it; rank 0 writes."""
        tensors, saved = state.state_dict(settings)
        if self.rank != 0:
            self.backend.barrier()
            return Path(path)
        written = ckpt.write_checkpoint(path, tensors, saved)
        if self.world_size > 1:
            self.backend.barrier()
        return written

    def rewind(
        self,
        state: TrainingState,
        settings: Mapping[str, Any],
        to: Any,
        *,
        epoch: int | None,
        step: int | None,
    ) -> Path:
        """:meth:`Trainer.rewind`: load the checkpoint :meth:`find` finds into ``state``
        (its ledger kept: the ledger records everything), record the rewind in the ledger
        and the history file, and save the rewound state as the newest checkpoint."""
        path = self.find(to, epoch=epoch, step=step, run=state.counters.run)
        tensors, saved = ckpt.read_checkpoint(path)
        ledger = state.ledger
        state.load_state_dict(tensors, saved)
        self.restored_metric = None  # the loaded weights are the loaded step's own
        state.ledger = ledger
        c, history = state.counters, state.history
        record = {
            "call": len(ledger),
            "run": c.run,
            "mode": "rewind",
            "to": Path(path).name,
            "epoch_start": c.epoch,
            "step_start": c.global_step,
            "step_end": c.global_step,
            "epochs_done": 0,
            "wall_s": 0.0,
            "final": final_metrics(history, history[-1]["segment"]) if len(history) else {},
        }
        ledger.append(record)
        self.append("ledger.jsonl", record)
        # The history file is append-only: mark the epochs after this one as gone.
        self.append(f"history-run{c.run}.jsonl", {"rewound_to_epoch": c.epoch})
        # The rewound state, its ledger row included, is the run dir's newest checkpoint:
        # a new process on the run dir resumes from here, not from before the rewind.
        self.save(state, settings, wait=True)
        return Path(path)

    def wait(self) -> None:
        """Wait for the save in flight; raise :class:`~warmfit.background.SaveFailedError`
        if it failed."""
        if self._writer is not None:
            self._writer.wait()

    def drain(self) -> None:
        """Wait for the save in flight without raising (an error is on its way already)."""
        if self._writer is not None:
            self._writer.drain()

    def close(self) -> None:
        """Wait for the save in flight (raising its failure) and release the lock."""
        try:
            self.wait()
        finally:
            if self.run_dir is not None:
                self.run_dir.unlock()

    def append(self, name: str, record: Mapping[str, Any]) -> None:
        """Append ``record`` as a JSON line to the run directory's file ``name`` (the
        ledger, a run's history)."""
        if self.run_dir is None or self.rank != 0:
            return
        with open(self.run_dir.root / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def check_monitor_logged(self, logs: Mapping[str, Any]) -> None:
        """Once: warn if a ``monitor`` the user chose (not the default ``val_loss``, which a
        run without validation data simply lacks) is not among the first epoch's logs: a
        misspelt key would leave "best" nothing to rank."""
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

    # -- finding -------------------------------------------------------------------------
    def latest(self) -> tuple[Path, dict[str, np.ndarray], dict[str, Any]] | None:
        """The newest intact checkpoint (read), or None. Under DDP the ranks must agree on
        which it is."""
        if self.run_dir is None:
            return None
        found = self.run_dir.load_latest()
        if self.world_size > 1:
            self._check_ranks_agree(None if found is None else found[0])
        return found

    def find(self, to: Any, *, epoch: int | None, step: int | None, run: int) -> Path:
        """The checkpoint :meth:`Trainer.rewind` goes to: ``to`` ("best" of run ``run``,
        "latest", a checkpoint's name or a path), or run ``run``'s at the end of ``epoch``
        or at ``step`` (:meth:`~warmfit.rundir.RunDir.find`)."""
        if self.run_dir is None:
            raise ValueError(
                "rewind needs checkpoints: construct the Trainer with run_dir=... (or use "
                "load_state_dict with a state_dict() you kept)."
            )
        self.wait()
        return self.run_dir.find(to, epoch=epoch, step=step, run=run)  # "best": of this run

    def _check_ranks_agree(self, path: Path | None) -> None:
        """Under DDP every rank reads the run directory itself: refuse to start when they
        found different newest checkpoints (a run_dir on each node's own disk, a stale
        view of a network filesystem), which would train from different states."""
        assert self.run_dir is not None
        name = "" if path is None else path.name
        found = [b.decode() for b in self.backend.gather_bytes(name.encode())]
        if len(set(found)) > 1:
            seen = ", ".join(f"rank {r}: {n or 'none'}" for r, n in enumerate(found))
            raise CheckpointError(
                self.run_dir.checkpoints_dir,
                f"the ranks found different newest checkpoints ({seen}). Every rank must "
                "see the same run directory: put run_dir on storage that all nodes share "
                "(not a node's own disk), then start the job again.",
            )


def _monitored(history: History, monitor: str, step: int) -> float | None:
    """The monitored value of the weights at ``step``: the last epoch's, if that epoch
    ended at ``step`` (a save inside an epoch has no metric of its own)."""
    if not len(history) or history[-1].get("step") != step:
        return None
    v = history[-1].get(monitor)
    return v if isinstance(v, float) and math.isfinite(v) else None
