"""The one interface every framework adapter implements.

Separation of concerns:

- The :class:`~warmfit.Trainer` owns the contract: modes, the cursor, the data order,
  the fit loop, schedules, callbacks, history, ledger, checkpoints, signals.
- A backend owns the framework: building the model and optimizer, turning arrays into
  the framework's batches, one optimizer step, evaluation, prediction, the framework's
  random streams, and turning its state into plain arrays + JSON and back.

A new backend is one file implementing :class:`Backend`; :func:`warmfit.backends.select`
picks it from the model's type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import StateMismatchError


class NonFiniteLoss(Exception):
    """Raised by ``train_step`` *before* the optimizer step when the loss is NaN/inf."""

    def __init__(self, value: float) -> None:
        self.value = value
        super().__init__(value)


@runtime_checkable
class Backend(Protocol):
    """What the Trainer needs from a framework. All methods are called inside a fit call
    with the trainer's random streams swapped in, unless stated otherwise."""

    framework: str

    # -- construction, warm and restart -------------------------------------------
    def init_model(self, seed: int, *, first: bool) -> None:
        """Initialise the weights from ``seed`` (``first``: at construction; else restart)."""

    def init_optimizer(self, schedule: Any) -> None:
        """A fresh optimizer (and framework scheduler, if ``schedule`` is one)."""

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        """The framework's random streams as they are right after seeding with ``seed``."""

    def capture_rng(self) -> dict[str, np.ndarray]:
        """The framework's current global random streams (copies)."""

    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        """Make ``state`` the framework's global random streams."""

    # -- data -----------------------------------------------------------------------
    def prepare(self, x: Any, y: Any) -> Any:
        """Validate and place training data (e.g. on the device); returns a handle with
        ``__len__``. Raise ``ValueError``/``TypeError`` naming the problem on bad input."""

    def subset(self, data: Any, rows: np.ndarray) -> Any:
        """The rows ``rows`` of a prepared data handle (for the validation split)."""

    def fingerprint(self, data: Any) -> tuple[str, list[int]]:
        """(content hash, shape of x) of a prepared data handle."""

    def batches(
        self, data: Any, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        """The epoch's global batches from sample ``offset`` of ``order`` on. Must not
        touch any sample before ``offset``."""

    # -- training -------------------------------------------------------------------
    def train_mode(self, training: bool) -> None:
        """Switch layers such as dropout between training and inference behaviour."""

    def set_learning_rate(self, lr: float) -> None: ...

    def learning_rate(self) -> float: ...

    def train_step(self, batch: Any) -> Any:
        """One optimizer step; returns a loss handle for :meth:`read_losses` (or None)."""

    def end_epoch(self) -> None:
        """Called after every completed epoch (epoch-interval framework schedulers)."""

    def read_losses(self, handles: list[Any]) -> np.ndarray:
        """Float64 values of the loss handles (the only host sync of the loop)."""

    def evaluate(self, data: Any, batch_size: int) -> dict[str, float]:
        """Loss and metrics on ``data``; never changes the training state."""

    def predict(self, x: Any, batch_size: int) -> Any: ...

    # -- state ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        """Every array of the state (weights, optimizer slots, framework RNG), as views
        where possible; the caller copies before training goes on."""

    def state_meta(self) -> dict[str, Any]:
        """Everything else, as JSON data (optimizer hyper-parameters, scheduler state)."""

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_tensors` + :meth:`state_meta`; raise
        :class:`~warmfit.errors.StateMismatchError` listing every mismatched key.

        The caller hands the arrays over: a backend may keep them (as optimizer slots,
        say) rather than copy them, so nobody else may write to them afterwards."""

    def describe(self) -> dict[str, Any]:
        """The settings a resume compares (model keys/shapes, optimizer class and
        hyper-parameters, loss), as JSON data."""


def check_samples(x: Any, x_rows: Any, y_rows: Any) -> None:
    """The checks every array backend makes of x and y, in one wording: x is not a
    scalar, x and y have as many rows, and there is at least one."""
    if x_rows is None:
        raise ValueError(f"x must have at least one dimension (samples first). Got a scalar {x!r}.")
    if y_rows is not None and y_rows != x_rows:
        raise ValueError(
            f"x and y must have the same number of samples. Got {x_rows} rows in x and "
            f"{y_rows} in y."
        )
    if x_rows == 0:
        raise ValueError("x has no samples: nothing to train on.")


def check_keys(what: str, own: Mapping[str, Any], saved: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`StateMismatchError` listing every missing, unexpected and mis-shaped
    key of ``saved`` against ``own`` (a backend's arrays by name)."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = [
        f"{k}: checkpoint {list(saved[k].shape)} vs {what} {list(own[k].shape)}"
        for k in sorted(set(own) & set(saved))
        if tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing}")
        if unexpected:
            parts.append(f"unexpected in the checkpoint: {unexpected}")
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes))
        raise StateMismatchError(
            f"the checkpoint does not match the {what}: "
            + " | ".join(parts)
            + f". Build the {what} the same way as the run that wrote the checkpoint."
        )
