"""The conformance suite: one contract, run against any backend (``docs/design.md``).

A backend's author describes a setup on the backend as a :class:`Case` — how to build a
fresh Trainer, the data it fits, the unit of ``fit`` (``epochs``, or ``rounds``) and
where to cut — and runs :func:`check_backend` in a test::

    from warmfit.testing import Case, check_backend

    case = Case("mine", build=lambda: (make_model(), {"framework": MyBackend, ...}),
                data=lambda: (x, y))
    check_backend(case, tmp_path)   # AssertionError naming the first entry that differs

Every check compares with the uninterrupted run, :meth:`Case.reference` (``total``
units in one fit call), bit for bit: :func:`assert_same_state`, on the library's own
comparator :func:`warmfit.check.compare_states` (every tensor of the state by dtype,
shape and bytes; every counter, random stream, schedule, optimizer, callback and data
record and history value type for type, floats by their bits). The checks
(:data:`CHECKS`, run in this order):

- ``split``: ``cut`` units, then the rest, in one Trainer (the caller's global random
  streams disturbed in between) == the reference; history and ledger agree.
- ``save_load``: ``cut`` units; ``save`` and :meth:`Trainer.load` into a fresh Trainer,
  and ``state_dict`` / ``load_state_dict`` into another: each holds the saved state
  at once (a round trip loses nothing), and the rest == the reference.
- ``steps``: ``fit(steps=)`` stops inside an epoch; finishing with ``until_epoch``,
  in the same Trainer and in a fresh one loaded from a checkpoint, == the reference.
- ``interrupt``: a SIGTERM stops a fit call after its first step
  (:class:`~warmfit.TrainingInterrupted`); the same call again, in the same Trainer
  and in a fresh one loaded from a checkpoint, finishes it == the reference.
- ``rewind``: with a ``run_dir``, :meth:`Trainer.rewind` to epoch ``cut`` after the
  whole run, then the rest again == the reference.
- ``restart``: ``mode="restart"`` after training == a freshly built Trainer's run.
- ``warm``: ``mode="warm"`` at epoch ``cut`` == ``continue`` from the state the modes
  table defines (:attr:`Case.warm_state`, built by hand from public state, without the
  warm code path).
- ``seed``: another seed gives other tensors (the backend uses the seed; the
  comparison can fail).

A mode the case does not list in :attr:`Case.modes` is checked to be refused (a
``ValueError`` before anything changes) instead.

Owns: :class:`Case`, :func:`check_backend` and the checks, :func:`assert_same_state`
(the one comparison of two training states for tests) and :func:`fresh_optimizer_state`
(the state a ``warm`` call starts from). Does not own: comparing two states entry by
entry (:func:`warmfit.check.compare_states`), nor what the contract is
(``docs/design.md``).

Run it in the main thread: the ``interrupt`` check sends this process SIGTERM, which
warmfit catches during a fit call in the main thread only. Each check writes its
checkpoints and run directory in a new folder under the ``tmp_dir`` it is given.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import os
import random
import signal
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .callbacks import Callback
from .check import compare_states, same_value
from .checkpoint import read_checkpoint
from .data import Cursor
from .errors import TrainingInterrupted
from .history import History
from .modes import MODES
from .trainer import Trainer

__all__ = [
    "CHECKS",
    "Case",
    "assert_same_state",
    "check_backend",
    "fresh_optimizer_state",
    "restart_schedule_and_callbacks",
    "state_of",
]

StateDict = Mapping[str, Any]


# -- the comparison -------------------------------------------------------------------------
def state_of(x: Trainer | StateDict | str | os.PathLike[str]) -> dict[str, Any]:
    """``{"tensors", "state"}`` of a Trainer, a ``state_dict()`` or a checkpoint folder;
    the state's dict a copy (its parts are not)."""
    if isinstance(x, Trainer):
        sd: Mapping[str, Any] = x.state_dict()
    elif isinstance(x, (str, os.PathLike)):
        tensors, state = read_checkpoint(Path(x))
        sd = {"tensors": tensors, "state": state}
    else:
        sd = x
    return {"tensors": sd["tensors"], "state": dict(sd["state"])}


def assert_same_state(
    a: Trainer | StateDict | str | os.PathLike[str],
    b: Trainer | StateDict | str | os.PathLike[str],
    *,
    differ: Iterable[str] = (),
    ledger: bool = False,
    labels: tuple[str, str] = ("first", "second"),
    what: str = "",
) -> None:
    """``a`` and ``b`` (Trainers, ``state_dict()`` results or checkpoint folders) hold the
    same training state, bit for bit: :func:`warmfit.check.compare_states` finds no
    difference (every tensor by dtype, shape and bytes; every counter but ``fit_calls``,
    random stream, schedule, optimizer and callback state, data record, call in
    progress and history value, type for type and float by bits), and two Trainers have
    the same learning rate, bit for bit.

    Raises ``AssertionError`` whose message names the first entry that differs and then
    lists them all, each as :func:`~warmfit.check.compare_states` names it (``labels``
    name ``a`` and ``b`` there; ``what`` opens the message). A scikit-learn estimator
    whose bytes differ (``model/skops``) is decoded, and its entry names the first
    attribute that differs.

    ``differ`` names what differs by design and is left out: a counter
    (``"counters.run"``), an entry of a part (``"data.fingerprint"``), a part of the
    state (``"call"``) or a tensor (``"rng/torch_cpu"``). ``ledger=True`` compares the
    ledgers too (a state that must be left unchanged, its ledger included)."""
    __tracebackhide__ = True  # pytest shows the caller's line
    sa, sb = state_of(a), state_of(b)
    for part in differ:
        if "/" in part:  # a tensor
            for sd in (sa, sb):
                assert part in sd["tensors"], f"no tensor {part} in the state"
                sd["tensors"] = {k: v for k, v in sd["tensors"].items() if k != part}
            continue
        key, _, sub = part.partition(".")
        for s in (sa["state"], sb["state"]):
            assert key in s and (not sub or sub in s[key]), f"no {part} in the state"
            if sub:  # a copy: the state's own dict may be the trainer's live one
                s[key] = {k: v for k, v in s[key].items() if k != sub}
            else:
                s.pop(key)
    trainer = b if isinstance(b, Trainer) else None
    entries = compare_states(sa, sb, trainer, labels=labels)
    entries = [_name_estimator_attribute(e, sa, sb) for e in entries]
    if ledger and sa["state"]["ledger"] != sb["state"]["ledger"]:
        entries.append("the ledger (ledger)")
    if isinstance(a, Trainer) and isinstance(b, Trainer):
        lr_a, lr_b = a.learning_rate, b.learning_rate
        if not _same_number(lr_a, lr_b):
            entries.append(f"learning rate: {lr_a!r} {labels[0]}, {lr_b!r} {labels[1]}")
    if entries:
        head = f"{what}: " if what else ""
        raise AssertionError(
            f"{head}the states differ in {len(entries)} "
            f"{'entry' if len(entries) == 1 else 'entries'}, the first: {entries[0]}\n  "
            + "\n  ".join(entries)
        )


def _same_number(x: Any, y: Any) -> bool:
    """The same type and bits (NaN equals NaN; -0.0 differs from 0.0)."""
    if type(x) is not type(y):
        return False
    if x != x and y != y:  # NaN
        return True
    return bool(x == y and math.copysign(1.0, x) == math.copysign(1.0, y))


SKOPS = "model/skops"  # the scikit-learn backend's estimator, as skops bytes


def _name_estimator_attribute(entry: str, a: StateDict, b: StateDict) -> str:
    """``entry``, and if it is the estimator's bytes, the first attribute that differs."""
    if f"({SKOPS})" not in entry or SKOPS not in a["tensors"] or SKOPS not in b["tensors"]:
        return entry
    try:
        from .backends.sklearn import loads

        ea, eb = (loads(np.asarray(s["tensors"][SKOPS]).tobytes()) for s in (a, b))
    except Exception:  # not an estimator skops can read: the entry says what it can
        return entry
    path = _first_value_difference(ea, eb, "estimator")
    return entry if path is None else f"{entry}: first at {path}"


def _first_value_difference(a: Any, b: Any, path: str) -> str | None:
    """Where two object graphs (estimators) first hold different values, bit for bit:
    arrays by bytes (a structured array field by field: its padding bytes are no value),
    floats by bytes, objects by their pickled state; None if nowhere. Not compared:
    which equal objects are shared."""
    if type(a) is not type(b):
        return f"{path} ({type(a).__name__} vs {type(b).__name__})"
    if isinstance(a, np.ndarray):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return f"{path} (dtype or shape)"
        if a.dtype.hasobject:
            pairs = zip(a.ravel(), b.ravel(), strict=True)
            return _first_of(_first_value_difference(p, q, f"{path}[{i}]")
                             for i, (p, q) in enumerate(pairs))  # fmt: skip
        for f in a.dtype.names or ():
            if np.ascontiguousarray(a[f]).tobytes() != np.ascontiguousarray(b[f]).tobytes():
                return f"{path}.{f}"
        return None if a.dtype.names or a.tobytes() == b.tobytes() else path
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        return _first_of(_first_value_difference(p, q, f"{path}[{i}]")
                         for i, (p, q) in enumerate(zip(a, b, strict=True)))  # fmt: skip
    if isinstance(a, dict):
        if sorted(map(str, a)) != sorted(map(str, b)):
            return f"{path} (keys)"
        return _first_of(_first_value_difference(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, np.random.RandomState):
        return _first_value_difference(
            a.get_state(legacy=True), b.get_state(legacy=True), f"{path}.state"
        )
    if isinstance(a, (float, np.floating)):  # by its bytes (NaN == NaN, -0.0 != 0.0)
        return None if struct.pack("<d", float(a)) == struct.pack("<d", float(b)) else path
    if a is None or isinstance(a, (bool, int, complex, str, bytes, np.generic, type)):
        return None if a == b else path
    # an estimator, a tree, a loss, an optimizer: what pickle would save of it
    return _first_value_difference(a.__getstate__(), b.__getstate__(), path)


def _first_of(paths: Iterable[str | None]) -> str | None:
    return next((p for p in paths if p is not None), None)


# -- the state a warm call starts from ---------------------------------------------------------
def restart_schedule_and_callbacks(state: StateDict, never_trained: StateDict) -> dict[str, Any]:
    """``state`` with the rows of the modes table that ``warm`` changes besides the
    optimizer's own state: the schedule starts again at 0 (``schedule_origin`` = the
    current global step) from the fresh optimizer's learning rate (``schedule.base_lr``,
    the rate without a schedule), and the callbacks are reset. Both are taken from
    ``never_trained`` (the ``state_dict()`` of a Trainer that never trained). A copy;
    the arrays are shared."""
    tensors = {k: v for k, v in state["tensors"].items() if not k.startswith("callbacks/")}
    tensors |= {k: v for k, v in never_trained["tensors"].items() if k.startswith("callbacks/")}
    s = dict(state["state"])
    s["counters"] = {**s["counters"], "schedule_origin": s["counters"]["global_step"]}
    s["schedule"] = {**s["schedule"], "base_lr": never_trained["state"]["schedule"]["base_lr"]}
    s["callbacks"] = never_trained["state"]["callbacks"]
    return {"tensors": tensors, "state": s}


def fresh_optimizer_state(trained: StateDict, never_trained: StateDict) -> dict[str, Any]:
    """The state a ``warm`` call starts from, built by hand from the modes table:
    ``trained``'s weights, counters, data record, random streams and history, with the
    optimizer and the callbacks of ``never_trained`` (the ``state_dict()`` of a Trainer
    that never trained: the factory's fresh optimizer) and the schedule starting again
    at the current step. A Trainer loaded with it and fitted in ``continue`` mode is the
    reference of a ``warm`` call, made without the warm code path.

    The optimizer is found by the convention of warmfit's torch and Keras backends: its
    arrays are the ``optim/*`` tensors, its plain data ``state.backend.optimizer`` (and
    a framework LR scheduler's ``state.backend.scheduler``). A backend that keeps it
    elsewhere gives its :class:`Case` a ``warm_state`` of its own (for instance on
    :func:`restart_schedule_and_callbacks`)."""
    tensors = {k: v for k, v in trained["tensors"].items() if not k.startswith("optim/")}
    tensors |= {k: v for k, v in never_trained["tensors"].items() if k.startswith("optim/")}
    state = dict(trained["state"])
    fresh = never_trained["state"]["backend"]
    state["backend"] = {
        **state["backend"],
        **{k: fresh[k] for k in ("optimizer", "scheduler") if k in fresh},
    }
    return restart_schedule_and_callbacks({"tensors": tensors, "state": state}, never_trained)


# -- the case ---------------------------------------------------------------------------------
UNITS = ("epochs", "rounds")


@dataclass(frozen=True)
class Case:
    """One setup on a backend, under the contract.

    ``build`` returns a fresh ``(model, Trainer settings)`` pair, the same on every call
    (a Trainer of its own backend: ``{"framework": MyBackend, ...}``; no ``run_dir``: the
    checks give their own). ``data`` returns the positional arguments of ``fit`` and
    ``fit_kwargs`` the keyword arguments every call passes (validation data; with it,
    every history row must have a ``val_loss`` that is not NaN). ``unit`` is ``fit``'s
    unit, ``"epochs"`` or ``"rounds"``; ``total`` units straight are cut after ``cut``.
    ``steps_per_epoch`` is what an epoch takes (1 where a unit is one indivisible step,
    as a round: no cut inside an epoch there); None takes what the reference run took.
    ``modes`` are the modes the backend honours (the others must be refused);
    ``warm_state(trained, never_trained)`` builds the state a ``warm`` call starts from
    out of two ``state_dict()`` results (:func:`fresh_optimizer_state` by default).
    """

    name: str
    build: Callable[[], tuple[Any, dict[str, Any]]]
    data: Callable[[], tuple[Any, ...]]
    fit_kwargs: Callable[[], dict[str, Any]] = field(default=dict)
    unit: str = "epochs"
    total: int = 4
    cut: int = 1
    steps_per_epoch: int | None = None
    modes: tuple[str, ...] = MODES
    warm_state: Callable[[StateDict, StateDict], Mapping[str, Any]] = fresh_optimizer_state

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"Case.unit must be one of {UNITS}. Got {self.unit!r} instead.")
        if not 0 < self.cut < self.total:
            raise ValueError(
                f"Case needs 0 < cut < total (a run cut in two). Got cut={self.cut!r}, "
                f"total={self.total!r}."
            )
        if "continue" not in self.modes or not set(self.modes) <= set(MODES):
            raise ValueError(
                f"Case.modes must hold 'continue' and name modes among {MODES}. Got "
                f"{self.modes!r} instead."
            )

    def trainer(self, *, callbacks: Sequence[Callback] = (), **overrides: Any) -> Trainer:
        """A fresh Trainer: ``build()``'s settings with ``overrides``, and ``callbacks``
        after the case's own."""
        model, settings = self.build()
        return Trainer(model, **_settings(settings, callbacks, overrides))

    def load(self, path: str | os.PathLike[str], *, callbacks: Sequence[Callback] = ()) -> Trainer:
        """:meth:`Trainer.load` of the checkpoint at ``path`` into a freshly built one."""
        model, settings = self.build()
        return Trainer.load(path, model, **_settings(settings, callbacks, {}))

    def fit(self, trainer: Trainer, *, units: int | None = None, **kwargs: Any) -> History:
        """One fit call: ``fit(*data, <unit>=units, **fit_kwargs, **kwargs)``."""
        if units is not None:
            kwargs[self.unit] = units
        fit: Callable[..., History] = trainer.fit  # data positional, the rest by keyword
        return fit(*self.data(), **self.fit_kwargs(), **kwargs)

    def reference(self) -> Trainer:
        """The uninterrupted run: ``total`` units in one fit call. Built once per case
        (cached for the process) and only read by the checks."""
        return _reference(self)


def _settings(
    settings: Mapping[str, Any], callbacks: Sequence[Callback], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    out = {**settings, **overrides}
    if callbacks:
        out["callbacks"] = [*settings.get("callbacks", ()), *callbacks]
    return out


@functools.cache
def _reference(case: Case) -> Trainer:
    t = case.trainer()
    case.fit(t, units=case.total)
    return t


def _steps_per_epoch(case: Case) -> int:
    """What an epoch takes: the case's figure, checked against the reference run's."""
    ref = case.reference()
    assert ref.epoch == case.total, (
        f"{case.name}: the reference run ended at epoch {ref.epoch}, not {case.total} "
        f"({case.total} {case.unit} in one call)"
    )
    spe = case.steps_per_epoch or ref.global_step // case.total
    assert ref.global_step == case.total * spe, (
        f"{case.name}: the reference run took {ref.global_step} steps in {case.total} "
        f"epochs, not {spe} an epoch"
    )
    return spe


def _validates(case: Case) -> bool:
    kwargs = case.fit_kwargs()
    return any(kwargs.get(k) is not None for k in ("validation_data", "validation_split"))


def _disturb_global_streams() -> None:
    """What a new process (or the caller's own code) does to the global generators."""
    np.random.seed(12345), random.seed(12345)
    np.random.rand(5), random.random()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(12345)
        torch.rand(17)


def _assert_ledger_adds_up(case: Case, split: Trainer, calls: int) -> None:
    """The split run's ledger is the reference's one row cut into ``calls`` rows."""
    straight = case.reference()
    rows, (ref,) = list(split.ledger), list(straight.ledger)
    where = f"{case.name}: the ledger"
    assert len(rows) == calls, f"{where} has {len(rows)} rows, not {calls}"
    assert [r["mode"] for r in rows] == ["continue"] * calls, where
    assert [r["segment"] for r in rows] == list(range(calls)), where
    assert rows[0]["step_start"] == ref["step_start"] == 0, where
    assert rows[0]["epoch_start"] == ref["epoch_start"] == 0, where
    for before, after in itertools.pairwise(rows):
        assert after["step_start"] == before["step_end"], where
        assert after["epoch_start"] == before["epoch_start"] + before["epochs_done"], where
    assert rows[-1]["step_end"] == ref["step_end"] == straight.global_step, where
    assert sum(r["epochs_done"] for r in rows) == ref["epochs_done"] == straight.epoch, where
    for r in rows:
        assert (r["fingerprint"], r["data_shape"]) == (ref["fingerprint"], ref["data_shape"])
        assert r["stopped_by"] is None, where
    assert same_value(rows[-1]["final"], ref["final"]), f"{where}: final metrics differ"


def _same_as_reference(case: Case, check: str, t: Trainer, **kwargs: Any) -> None:
    __tracebackhide__ = True
    labels = kwargs.pop("labels", ("straight", check))
    what = f"{case.name}, check {check!r}"
    assert_same_state(case.reference(), t, labels=labels, what=what, **kwargs)


def _assert_refused(case: Case, mode: str) -> None:
    """A mode the case does not list is refused before anything changes."""
    t = case.trainer()
    case.fit(t, units=case.cut)
    before = t.state_dict()
    try:
        case.fit(t, units=1, mode=mode)
    except ValueError:
        pass
    else:
        raise AssertionError(
            f"{case.name}: mode={mode!r} is not in Case.modes, yet a fit call in it was not "
            "refused with a ValueError"
        )
    assert_same_state(before, t, ledger=True, what=f"{case.name}: a refused {mode!r} call")


# -- the checks ------------------------------------------------------------------------------
def check_split(case: Case, tmp_dir: Path) -> None:
    """``cut`` units, then ``total - cut``, in one Trainer == ``total`` in one call (the
    caller's global random streams disturbed between the calls change nothing); the
    history has the reference's rows and values, in two segments, and the ledger is
    the reference's row cut in two."""
    spe, ref = _steps_per_epoch(case), case.reference()
    split = case.trainer()
    case.fit(split, units=case.cut)
    _disturb_global_streams()
    case.fit(split, units=case.total - case.cut)
    _same_as_reference(case, "split", split)
    assert split.epoch == case.total and split.global_step == case.total * spe
    epochs = list(range(1, case.total + 1))
    assert [r["epoch"] for r in split.history] == epochs
    assert [r["step"] for r in split.history] == [e * spe for e in epochs]
    assert [r["segment"] for r in split.history] == [0] * case.cut + [1] * (case.total - case.cut)
    assert all(r["segment"] == 0 for r in ref.history)
    if _validates(case):  # validation ran, every epoch
        assert all(not math.isnan(r["val_loss"]) for r in split.history), split.history
    _assert_ledger_adds_up(case, split, calls=2)
    assert [r["epochs_done"] for r in split.ledger] == [case.cut, case.total - case.cut]


def check_save_load(case: Case, tmp_dir: Path) -> None:
    """``cut`` units; ``save`` and a fresh Trainer's :meth:`Trainer.load`, and
    ``state_dict()`` into a fresh Trainer's ``load_state_dict``: each holds the saved
    state right away (a round trip loses nothing), and ``total - cut`` more units ==
    the reference. The ``state_dict()`` is a copy: training on does not reach it."""
    first = case.trainer()
    case.fit(first, units=case.cut)
    saved = first.state_dict()
    first.save(tmp_dir / "ck")
    case.fit(first, units=1)  # after state_dict() and save(): neither sees it
    del first
    for via in ("Trainer.load", "load_state_dict"):
        _disturb_global_streams()
        if via == "Trainer.load":
            resumed = case.load(tmp_dir / "ck")
        else:
            resumed = case.trainer()
            resumed.load_state_dict(saved)
        assert_same_state(
            saved, resumed, labels=("saved", "loaded"),
            what=f"{case.name}, check 'save_load', right after {via}",
        )  # fmt: skip
        assert resumed.epoch == case.cut and resumed.cursor.offset == 0
        case.fit(resumed, units=case.total - case.cut)
        _same_as_reference(case, "save_load", resumed, labels=("straight", f"after {via}"))
        _assert_ledger_adds_up(case, resumed, calls=2)


def check_steps(case: Case, tmp_dir: Path) -> None:
    """``fit(steps=)`` stops half-way into epoch ``cut`` (at its end where an epoch is
    one step); finishing with ``until_epoch=total`` from the cursor, in the same Trainer
    and in a fresh one loaded from a checkpoint, == the reference."""
    spe = _steps_per_epoch(case)
    cut = case.cut * spe + spe // 2
    parts = case.trainer()
    case.fit(parts, steps=cut)
    assert parts.global_step == cut
    offset = (spe // 2) * parts.batch_size
    assert parts.cursor == Cursor(case.cut, offset), parts.cursor
    assert len(parts.history) == case.cut  # the cut epoch is not a row yet
    parts.save(tmp_dir / "ck")
    for via in ("the same Trainer", "Trainer.load"):
        if via == "Trainer.load":
            _disturb_global_streams()
            parts = case.load(tmp_dir / "ck")
        case.fit(parts, until_epoch=case.total)
        _same_as_reference(case, "steps", parts, labels=("straight", f"steps, {via}"))
        _assert_ledger_adds_up(case, parts, calls=2)
        assert [r["steps_asked"] for r in parts.ledger] == [cut, None]


class _Interrupt(Callback):
    """Sends this process SIGTERM when a fit call starts, once armed: warmfit stops the
    call after its first step with TrainingInterrupted. Holds no state (its entry in a
    checkpoint is that of any stateless callback)."""

    armed = False

    def on_fit_start(self, trainer: Trainer, mode: str) -> None:
        if self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGTERM)


def _without_last_callback(t: Trainer) -> dict[str, Any]:
    sd = state_of(t)
    sd["state"]["callbacks"] = sd["state"]["callbacks"][:-1]
    return sd


def check_interrupt(case: Case, tmp_dir: Path) -> None:
    """``cut`` units; a SIGTERM stops the next call, asked for the rest, after its first
    step (inside epoch ``cut``; at its end where an epoch is one step) with
    :class:`~warmfit.TrainingInterrupted`, the call recorded as open in the state. The
    same call again finishes it, in the same Trainer and in a fresh one loaded from a
    checkpoint: == the reference (history in two segments, as if never interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "the 'interrupt' check sends this process SIGTERM, which warmfit catches in "
            "the main thread only: run check_backend there, or leave 'interrupt' out of "
            "its checks"
        )
    spe, ref = _steps_per_epoch(case), case.reference()
    interrupt = _Interrupt()
    t = case.trainer(callbacks=[interrupt])
    case.fit(t, units=case.cut)
    interrupt.armed = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # warmfit's line about the signal
            case.fit(t, units=case.total - case.cut)
    except TrainingInterrupted as err:
        stopped_at = err.step
    else:
        raise AssertionError(f"{case.name}: a SIGTERM during fit raised no TrainingInterrupted")
    assert stopped_at == t.global_step == case.cut * spe + 1, (stopped_at, t.global_step)
    if spe > 1:
        assert t.cursor == Cursor(case.cut, t.batch_size), t.cursor
    assert t.state_dict()["state"]["call"] is not None, "the interrupted call is not open"
    t.save(tmp_dir / "ck")
    for via in ("the same Trainer", "Trainer.load"):
        if via == "Trainer.load":
            _disturb_global_streams()
            t = case.load(tmp_dir / "ck", callbacks=[_Interrupt()])
        case.fit(t, units=case.total - case.cut)  # the same call: it finishes
        assert_same_state(
            ref, _without_last_callback(t), labels=("straight", f"interrupted, {via}"),
            what=f"{case.name}, check 'interrupt'",
        )  # fmt: skip
        assert _same_number(ref.learning_rate, t.learning_rate), "learning rates differ"
        rows = list(t.ledger)
        assert [r.get("resumes_call") for r in rows] == [None, None, 1], rows
        assert rows[1]["stopped_by"] == "SIGTERM" and rows[2]["step_end"] == ref.global_step
        assert [r["segment"] for r in t.history] == [0] * case.cut + [1] * (case.total - case.cut)


def check_rewind(case: Case, tmp_dir: Path) -> None:
    """With a ``run_dir``: ``cut`` units and the rest (checkpointing changes nothing:
    == the reference), ``rewind(epoch=cut)`` (the state is that checkpoint's), and the
    rest again == the reference."""
    spe = _steps_per_epoch(case)
    with case.trainer(run_dir=tmp_dir / "run") as t:
        case.fit(t, units=case.cut)
        case.fit(t, units=case.total - case.cut)
        _same_as_reference(case, "rewind", t, labels=("straight", "with a run_dir"))
        path = t.rewind(epoch=case.cut)
        assert t.epoch == case.cut and t.cursor.offset == 0 and t.global_step == case.cut * spe
        assert_same_state(
            path, t, labels=("checkpoint", "rewound"),
            what=f"{case.name}, check 'rewind', right after the rewind",
        )  # fmt: skip
        assert len(t.history) == case.cut
        case.fit(t, units=case.total - case.cut)
        _same_as_reference(case, "rewind", t, labels=("straight", "rewound"))
        assert [r["mode"] for r in t.ledger] == ["continue", "continue", "rewind", "continue"]


def check_restart(case: Case, tmp_dir: Path) -> None:
    """``mode="restart"`` after training == the run of a freshly built Trainer (but for
    ``counters.run``)."""
    if "restart" not in case.modes:
        return _assert_refused(case, "restart")
    t = case.trainer()
    case.fit(t, units=case.cut)
    case.fit(t, units=1)
    case.fit(t, units=case.total, mode="restart")
    _same_as_reference(case, "restart", t, differ=("counters.run",))
    assert t.counters.run == 1 and len(t.history) == case.total
    assert [r["mode"] for r in t.ledger] == ["continue", "continue", "restart"]
    assert [r["run"] for r in t.ledger] == [0, 0, 1]
    return None


def check_warm(case: Case, tmp_dir: Path) -> None:
    """``cut`` units, then ``mode="warm"`` for the rest == a fresh Trainer loaded with
    ``case.warm_state(trained, never_trained)`` (the state after ``cut`` units with a
    fresh optimizer, the schedule's origin at the current step and reset callbacks),
    then ``continue`` for the rest. Counters go on; a new optimizer is built."""
    if "warm" not in case.modes:
        return _assert_refused(case, "warm")
    spe = _steps_per_epoch(case)
    t = case.trainer()
    case.fit(t, units=case.cut)
    old_optimizer = t.optimizer
    by_hand = case.trainer()
    by_hand.load_state_dict(case.warm_state(t.state_dict(), case.trainer().state_dict()))
    case.fit(t, units=case.total - case.cut, mode="warm")
    case.fit(by_hand, units=case.total - case.cut)
    assert_same_state(
        by_hand, t, labels=("by hand", "warm"),
        what=f"{case.name}, check 'warm': warm != continue from the state it starts from",
    )  # fmt: skip
    assert old_optimizer is None or t.optimizer is not old_optimizer, "no new optimizer"
    assert t.epoch == case.total and t.global_step == case.total * spe
    assert t.counters.schedule_origin == case.cut * spe
    assert [r["segment"] for r in t.history] == [0] * case.cut + [1] * (case.total - case.cut)
    assert [r["mode"] for r in t.ledger] == ["continue", "warm"]
    return None


def check_seed(case: Case, tmp_dir: Path) -> None:
    """Another seed gives other tensors (weights, optimizer slots or random streams):
    the backend uses the seed, and the comparison of the state's tensors can fail."""
    _, settings = case.build()
    other = case.trainer(seed=settings.get("seed", 0) + 1)
    case.fit(other, units=case.total)
    entries = compare_states(state_of(case.reference()), state_of(other), other)
    tensors = [e for e in entries if any(f"({k}/" in e for k in ("model", "optim", "rng"))]
    assert tensors, (
        f"{case.name}: another seed gave the same weights, optimizer slots and random "
        f"streams (other entries that differ: {entries})"
    )


#: Every check, by name, in the order :func:`check_backend` runs them.
CHECKS: dict[str, Callable[[Case, Path], None]] = {
    "split": check_split,
    "save_load": check_save_load,
    "steps": check_steps,
    "interrupt": check_interrupt,
    "rewind": check_rewind,
    "restart": check_restart,
    "warm": check_warm,
    "seed": check_seed,
}


def check_backend(
    case: Case, tmp_dir: str | os.PathLike[str], *, checks: Iterable[str] | None = None
) -> None:
    """Run every check of :data:`CHECKS` (or those named in ``checks``, in
    :data:`CHECKS`' order) on ``case``; each writes in a new folder under ``tmp_dir``.

    Raises ``AssertionError`` at the first check that fails, its message naming the
    case, the check and the first state entry that differs (as
    :func:`warmfit.check.compare_states` names it: ``optimizer slot step of parameter
    0.weight (optim/0/step): missing in the loaded run``), then every other one.
    ``ValueError`` for a check name that does not exist. Returns None when the backend
    keeps the contract on this case."""
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"No such check: {unknown}. The checks: {list(CHECKS)}.")
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    for name in CHECKS:
        if name in names:
            folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_dir))
            CHECKS[name](case, folder)
