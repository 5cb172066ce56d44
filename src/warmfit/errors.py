"""warmfit's exceptions: one family, so callers can catch everything warmfit raises.

Every message says what is wrong and what to do about it. Parameter checks use one
template (see :func:`invalid_param`), after scikit-learn's: "The 'mode' parameter of
Trainer.fit must be one of {...}. Got 'resum' instead."
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable

import numpy as np


class WarmfitError(Exception):
    """Base class of every error warmfit raises on purpose."""


class CheckpointError(WarmfitError):
    """A checkpoint is missing, damaged, of an unknown schema, or unsafe to load.

    The message names the file and the problem.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class RunDirLockedError(WarmfitError):
    """Another live process, or another open Trainer or RunDir of this process
    (``this_process``), holds the run directory's lock."""

    def __init__(
        self,
        run_dir: object,
        pid: int,
        host: str = "",
        *,
        this_process: bool = False,
        orphans: tuple[list[int], float] | None = None,
    ) -> None:
        self.run_dir = str(run_dir)
        self.pid = pid
        if orphans is not None:  # the holder is gone; processes it left hold the lock
            pids, waited = orphans
            which = f" (pids {', '.join(map(str, pids))})" if pids else ""
            message = (
                f"run directory {self.run_dir} is locked by process {pid} on {host}, which "
                f"is no longer running: processes it left behind{which} still hold the lock "
                "(children it forked, such as data-loading workers), and did not exit "
                f"within {waited:g} s. Stop them, or use another run_dir."
            )
        elif this_process:
            message = (
                f"run directory {self.run_dir} is locked by this process (pid {pid}): "
                "another Trainer or RunDir in this program still has it open. Call close() "
                "on that Trainer (or build it as 'with warmfit.Trainer(...) as trainer:', "
                "which closes it), or delete every reference to it ('del trainer'); or use "
                "another run_dir."
            )
        else:
            where = f" on {host}" if host else ""
            message = (
                f"run directory {self.run_dir} is locked by process {pid}{where}. "
                "Wait for it to finish, stop it, or use another run_dir."
            )
        super().__init__(message)


class StateMismatchError(WarmfitError, ValueError):
    """A checkpoint does not fit the Trainer it is loaded into (keys, shapes, settings)."""


class NonFiniteLossError(WarmfitError, FloatingPointError):
    """Training produced a NaN or infinite loss. Nothing after it is saved.

    Where the loss is read at every step (the CPU, one process) training stops before
    that step's update: weights, optimizer and counters are those of the last good step
    (its forward pass has drawn from the random streams: they are not rewound, which
    would cost a copy of every stream at every step). Where it stays on the device (a
    GPU, DDP) it is read at the next save or epoch end (``seen_at``): the steps up to
    there have run, and the trainer's weights may be NaN; the run directory's
    checkpoints are the good ones.
    """

    def __init__(self, step: int, epoch: int, value: float, seen_at: int | None = None) -> None:
        self.step = step
        self.epoch = epoch
        self.value = value
        self.seen_at = seen_at
        if seen_at is None:
            where = (
                f"Training stopped before that step's update: the trainer holds the weights, "
                f"optimizer and counters after step {step - 1} (the failed step's forward "
                "pass has drawn from the random streams)."
            )
        else:
            where = (
                f"It was read at step {seen_at} (on a GPU or under DDP losses are read at "
                "saves and epoch ends): the trainer holds the state after that step, its "
                "weights possibly NaN, and nothing after the NaN was saved. Rewind to a "
                "checkpoint (trainer.rewind('latest')) before going on."
            )
        super().__init__(
            f"the loss became {value} at global step {step} (epoch {epoch}). {where} Lower "
            "the learning rate, or check the data for NaN/inf."
        )


class TrainingInterrupted(WarmfitError, KeyboardInterrupt):
    """Raised by ``fit`` after SIGINT/SIGTERM once a checkpoint has been written.

    Catch it to keep the process alive; otherwise the process ends. ``checkpoint`` is
    the path written (or None without a run directory).
    """

    def __init__(
        self, signal_name: str, checkpoint: object, step: int, ends_at: str | None = None
    ) -> None:
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.step = step
        self.ends_at = ends_at
        if checkpoint is None:
            where = (
                "no run_dir was given, so no checkpoint was written; trainer.save(path) "
                "keeps the state."
            )
        elif ends_at is None:  # the call had finished (a signal during its closing save)
            where = (
                f"checkpoint written to {checkpoint}; the fit call had finished. Run the same "
                "command again (or construct the Trainer on the same run_dir) to train more."
            )
        else:
            where = (
                f"checkpoint written to {checkpoint}. Run the same command again (or "
                "construct the Trainer on the same run_dir and repeat the same fit call) to "
                f"finish this call exactly where it would have ended, at {ends_at}; a call "
                f"with other arguments starts anew from step {step}."
            )
        super().__init__(f"training stopped by {signal_name} at global step {step}: {where}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended
        (130 for SIGINT, 143 for SIGTERM): what the command line exits with."""
        return 128 + signal.Signals[self.signal_name].value


def invalid_param(
    name: str, owner: str, expected: str | Iterable[object], got: object
) -> ValueError:
    """The one message template for a bad parameter value."""
    if not isinstance(expected, str):
        expected = "one of {" + ", ".join(repr(e) for e in expected) + "}"
    return ValueError(f"The {name!r} parameter of {owner} must be {expected}. Got {got!r} instead.")


def check_int(name: str, value: object, owner: str, *, minimum: int) -> int:
    """Refuse anything but an int (not a bool) >= ``minimum``, with :func:`invalid_param`;
    return it as a plain ``int`` (a NumPy integer converted: it goes into JSON and torch)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise invalid_param(name, owner, f"an int >= {minimum}", value)
    return int(value)


def check_real(name: str, value: object, owner: str, *, minimum: float = 0.0) -> float:
    """Refuse anything but a finite real number (not a bool) >= ``minimum``; return it
    as a plain ``float``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise invalid_param(name, owner, f"a finite number >= {minimum:g}", value)
    return float(value)
