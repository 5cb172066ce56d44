"""The one interface every framework adapter implements.

Separation of concerns:

- The :class:`~warmfit.Trainer` owns the contract: modes, the cursor, the data order,
  the fit loop, schedules, callbacks, history, ledger, checkpoints, signals.
- A backend owns the framework: building the model and optimizer, turning arrays into
  the framework's batches, one optimizer step, evaluation, prediction, the framework's
  random streams, and turning its state into plain arrays + JSON and back.

A new backend is one file: a subclass of :class:`Backend` implementing its abstract
methods (and overriding the declared defaults it needs to);
:func:`warmfit.backends.select` picks it from the model's type. The Trainer calls only
what these two declare.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import StateMismatchError


class NonFiniteLoss(Exception):
    """Raised by ``train_step`` *before* the optimizer step when the loss is NaN/inf."""

    def __init__(self, value: float) -> None:
        self.value = value
        super().__init__(value)


class Backend(abc.ABC):
    """What the Trainer needs from a framework, declared: every member the Trainer calls
    is here, and it calls nothing else. A new backend subclasses it and implements the
    abstract methods (the framework's work); the others have documented defaults, which
    are right for a single-process framework that needs no extra checks (one process:
    ``world_size`` 1, ``rank`` 0, collectives that return their own argument; every mode
    supported; no deterministic switch; a torch LR scheduler refused; background saves
    copied into reused NumPy buffers).

    All methods are called inside a fit call with the trainer's random streams swapped
    in, unless stated otherwise.
    """

    framework: str = ""
    #: The model being trained (the same object across ``restart``).
    model: Any = None

    # -- construction, warm and restart -------------------------------------------
    @abc.abstractmethod
    def init_model(self, seed: int, *, first: bool) -> None:
        """Initialise the weights from ``seed`` (``first``: at construction; else restart)."""

    @abc.abstractmethod
    def init_optimizer(self, schedule: Any) -> None:
        """A fresh optimizer (and framework scheduler, if ``schedule`` is one)."""

    @abc.abstractmethod
    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        """The framework's random streams as they are right after seeding with ``seed``."""

    @abc.abstractmethod
    def capture_rng(self) -> dict[str, np.ndarray]:
        """The framework's current global random streams (copies)."""

    @abc.abstractmethod
    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        """Make ``state`` the framework's global random streams."""

    # -- data -----------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, x: Any, y: Any) -> Any:
        """Validate and place training data (e.g. on the device); returns a handle with
        ``__len__``. Raise ``ValueError``/``TypeError`` naming the problem on bad input."""

    @abc.abstractmethod
    def subset(self, data: Any, rows: np.ndarray) -> Any:
        """The rows ``rows`` of a prepared data handle (for the validation split)."""

    @abc.abstractmethod
    def fingerprint(self, data: Any) -> tuple[str, list[int]]:
        """(content hash, shape of x) of a prepared data handle."""

    @abc.abstractmethod
    def batches(
        self, data: Any, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        """The epoch's global batches from sample ``offset`` of ``order`` on. Must not
        touch any sample before ``offset``."""

    # -- training -------------------------------------------------------------------
    @abc.abstractmethod
    def train_mode(self, training: bool) -> None:
        """Switch layers such as dropout between training and inference behaviour."""

    @abc.abstractmethod
    def set_learning_rate(self, lr: float) -> None: ...

    @abc.abstractmethod
    def learning_rate(self) -> float: ...

    @abc.abstractmethod
    def train_step(self, batch: Any) -> Any:
        """One optimizer step; returns a loss handle for :meth:`read_losses` (or None)."""

    @abc.abstractmethod
    def end_epoch(self) -> None:
        """Called after every completed epoch (epoch-interval framework schedulers)."""

    def epoch_logs(self) -> dict[str, float]:
        """Figures of the epoch just completed for its history record, besides the loss
        (the torch step's gradient norms and skipped fp16 steps); by default none."""
        return {}

    @abc.abstractmethod
    def read_losses(self, handles: list[Any]) -> np.ndarray | None:
        """Float64 values of the loss handles (the only host sync of the loop); None if
        the steps report no loss (a scikit-learn estimator without one)."""

    @abc.abstractmethod
    def evaluate(self, data: Any, batch_size: int) -> dict[str, float]:
        """Loss and metrics on ``data``; never changes the training state."""

    @abc.abstractmethod
    def predict(self, x: Any, batch_size: int) -> Any: ...

    # -- state ----------------------------------------------------------------------
    @abc.abstractmethod
    def state_tensors(self) -> dict[str, np.ndarray]:
        """Every array of the state (weights, optimizer slots, framework RNG), as views
        where possible; the caller copies before training goes on."""

    @abc.abstractmethod
    def state_meta(self) -> dict[str, Any]:
        """Everything else, as JSON data (optimizer hyper-parameters, scheduler state)."""

    @abc.abstractmethod
    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_tensors` + :meth:`state_meta`; raise
        :class:`~warmfit.errors.StateMismatchError` listing every mismatched key.

        The caller hands the arrays over: a backend may keep them (as optimizer slots,
        say) rather than copy them, so nobody else may write to them afterwards."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The settings a resume compares (model keys/shapes, optimizer class and
        hyper-parameters, loss), as JSON data."""

    # -- declared capabilities, with their defaults ---------------------------------
    # ``modes``, ``world_size`` and ``rank`` are read-only to the Trainer: a backend
    # overrides them with a class attribute or a property.
    @property
    def modes(self) -> tuple[str, ...]:
        """The modes of a fit call this backend honours (the others are refused first)."""
        return ("continue", "warm", "restart")

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    optimizer: Any = None
    #: The last step's gradient norm before clipping (a handle: read when asked), or
    #: None where the step does not clip (``StepLogs.grad_norm``).
    last_grad_norm: Any = None
    #: The Trainer's seed, set by :meth:`init_model` (data-reading streams use it).
    seed: int = 0
    _snapshot_buffers: Any = None

    # -- checks, each before the fit call changes anything --------------------------
    def check_mode(self, mode: str) -> None:
        """Called first by ``fit``: refuse a mode this backend cannot honour, or a call
        it cannot make exact for a reason that needs no data (a global mode)."""
        if mode not in self.modes:
            raise ValueError(
                f"mode={mode!r} is not supported for {self.framework} models. Supported "
                f"modes: {self.modes}."
            )

    def preflight(
        self,
        mode: str,
        data: Any,
        val_data: Any,
        *,
        batch_size: int,
        schedule: Any,
        sets_lr: bool,
    ) -> None:
        """Every refusal that needs the call's data, before anything changes: a new
        ``schedule`` (None if the call keeps its own) this backend cannot drive, a
        learning rate it cannot set, data the model or the loss cannot take, a batch
        that leaves a rank no rows the model cannot run on."""
        if schedule is not None:
            self.check_schedule(schedule)
        if sets_lr and mode == "continue":
            self.check_lr_groups()
        self.check_data(data, with_target=True, what="fit:")
        if val_data is not None:
            self.check_data(val_data, with_target=True, what="validation:")
        if self.world_size > 1:  # a collective: every rank calls it
            self.check_zero_rows(data, batch_size)

    def check_schedule(self, schedule: Any) -> None:
        """Refuse a schedule this backend cannot drive (default: a torch LR scheduler)."""
        from ..schedules import TorchScheduler

        if isinstance(schedule, TorchScheduler):
            raise TypeError(
                "schedules.from_torch(...) builds a torch LR scheduler, which drives a torch "
                f"optimizer only; this is a {self.framework} model. Pass a warmfit schedule "
                "(warmfit.schedules), a function step -> learning rate."
            )

    def check_lr_groups(self) -> None:
        """Refuse a ``continue`` whose learning rate warmfit sets when the optimizer's
        parameter groups are no longer those its factory built (default: nothing)."""
        return None  # the default: nothing to do

    def check_lr_settable(self, who: str, instead: str) -> None:
        """Refuse ``who`` (e.g. ``ReduceLROnPlateau``) setting a learning rate this
        backend cannot set; ``instead`` says what to do (default: it can)."""
        return None  # the default: nothing to do

    def check_data(self, data: Any, *, with_target: bool, what: str) -> None:
        """Refuse data the model or the loss cannot take, naming it (default: nothing)."""
        return None  # the default: nothing to do

    def check_validation_split(self, data: Any) -> None:
        """Refuse ``validation_split`` on data this backend cannot split by rows, before
        anything changes (default: it can)."""
        return None  # the default: nothing to do

    def check_zero_rows(self, data: Any, batch_size: int) -> None:
        """Under DDP: refuse a model that cannot run on a rank's empty share of a global
        batch (default: nothing)."""
        return None  # the default: nothing to do

    def check_rng(self, state: Mapping[str, np.ndarray]) -> None:
        """Refuse framework random-stream entries the framework would reject."""
        return None  # the default: nothing to do

    def check_deterministic(self) -> None:
        """Refuse ``Trainer(deterministic=True)`` where it cannot be honoured."""
        return None  # the default: nothing to do

    # -- switches ---------------------------------------------------------------------
    def set_deterministic(self) -> Callable[[], None] | None:
        """Turn deterministic algorithms on for a fit call; return what puts the
        previous setting back (None: nothing to switch, as for scikit-learn)."""
        return None

    def set_schedule(self, schedule: Any) -> None:
        """``fit(schedule=...)`` replaced the schedule (after :meth:`check_schedule`):
        build the framework scheduler it names, if any (default: none to build)."""
        return None  # the default: nothing to do

    def close(self) -> None:
        """Release what the backend holds (a DDP wrapper); it cannot train after."""
        return None  # the default: nothing to do

    # -- collectives (DDP) ------------------------------------------------------------
    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return flag

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order."""
        return [payload]

    def barrier(self) -> None:
        """Wait for every rank."""
        return None  # the default: nothing to do

    # -- state ------------------------------------------------------------------------
    def snapshot_tensors(self) -> dict[str, np.ndarray]:
        """:meth:`state_tensors` as private copies for the background writer,
        valid until the next call (default: reused NumPy buffers)."""
        from ..background import SnapshotBuffers

        if self._snapshot_buffers is None:
            self._snapshot_buffers = SnapshotBuffers()
        return self._snapshot_buffers.copy(self.state_tensors())

    def load_weights(
        self, tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None
    ) -> None:
        """Load the ``model/*`` entries of ``tensors`` into the model (the weights an
        EarlyStopping restores)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_weights")


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


def check_keys(what: str, own: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
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


def leaf_rows(found: Sequence[tuple[str, Any]], name: str) -> int:
    """The number of rows (first dimension) every leaf of a structure ``name`` has:
    ``found`` holds its (path, array) pairs, at least one. A ``ValueError`` names a leaf
    without a first dimension, or each leaf and its length if they differ."""
    for path, a in found:
        if a.ndim == 0:
            raise ValueError(
                f"{path} must have at least one dimension (samples first). Got a scalar "
                f"{a.item()!r}."
            )
    lengths = {path: len(a) for path, a in found}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{p} has {n}" for p, n in lengths.items())
        raise ValueError(
            f"Every array of {name} must have the same number of samples (its first "
            f"dimension): {listed}. Pass one row per sample in each."
        )
    return len(found[0][1])


def named_metrics(
    metrics: Any, named: Mapping[str, Callable[..., float]]
) -> dict[str, Callable[..., float]]:
    """The metrics of a backend whose metrics are ``fn(y_true, y_pred) -> float``:
    ``metrics`` a mapping (taken as it is) or names from ``named`` and callables, by
    their ``__name__``. An unknown name is a ``ValueError`` listing the known ones."""
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out: dict[str, Callable[..., float]] = {}
    for m in metrics or ():
        if isinstance(m, str):
            if m not in named:
                raise ValueError(
                    f"Unknown metric {m!r}. Expected one of {sorted(named)} or a callable "
                    "(y_true, y_pred) -> float."
                )
            out[m] = named[m]
        else:
            out[getattr(m, "__name__", repr(m))] = m
    return out


def jsonable(v: Any) -> Any:
    """A model parameter as JSON data for :meth:`Backend.describe` (NumPy scalars as
    numbers, containers recursively, anything else by its ``repr``)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [jsonable(i) for i in v]
    if isinstance(v, dict):
        return {str(k): jsonable(i) for k, i in v.items()}
    if isinstance(v, np.random.RandomState):
        return "RandomState"
    return repr(v)
