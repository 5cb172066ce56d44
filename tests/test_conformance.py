"""The conformance suite (STYLE point 7): one contract, run against every backend.

"N units straight == k units, (save, load,) N - k units", bit for bit. Each backend is a
:class:`Case`: how to build a fresh Trainer, the data it fits, the unit of ``fit``
(``epochs``, or ``rounds`` for scikit-learn ensembles) and where to cut. The same test
functions run on every case; the reference is always the uninterrupted run, compared
with :func:`assert_same_bits`: the one comparison of the whole state,
``conftest.assert_same_state`` (every tensor of the state byte for byte, and every
counter, random stream, schedule, optimizer, callback and data record and history
value, float by bits).

Real process restarts are covered by ``test_resume_processes.py``; here a "restart" is a
Trainer built from scratch (with the caller's global streams disturbed in between) that
loads the checkpoint.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, assert_same_state, make_data, require, trainer_settings
from warmfit import schedules

BATCH = 16  # every case: 200 samples in batches of 16, 13 steps per epoch


# -- comparison ----------------------------------------------------------------------------
def _bits(value: Any) -> Any:
    """A value with every float replaced by its exact bytes (NaN == NaN, -0.0 != 0.0)."""
    if isinstance(value, (float, np.floating)):
        return ("float", struct.pack("<d", float(value)))
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bits(v) for v in value]
    return value


def assert_same_values(a: Any, b: Any, path: str) -> None:
    """Every value an object graph holds, bit for bit: arrays by bytes (a structured
    array field by field: its padding bytes are no value), floats by bytes, objects by
    their pickled state. Not compared: which equal objects are shared."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: dtype or shape differs"
        if a.dtype.hasobject:
            for i, (p, q) in enumerate(zip(a.ravel(), b.ravel(), strict=True)):
                assert_same_values(p, q, f"{path}[{i}]")
        elif a.dtype.names:
            for f in a.dtype.names:
                assert (
                    np.ascontiguousarray(a[f]).tobytes() == np.ascontiguousarray(b[f]).tobytes()
                ), f"{path}.{f} differs"
        else:
            assert a.tobytes() == b.tobytes(), f"{path} differs"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            assert_same_values(p, q, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{path}: keys differ"
        for k in a:
            assert_same_values(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, np.random.RandomState):
        assert_same_values(a.get_state(legacy=True), b.get_state(legacy=True), f"{path}.state")
    elif a is None or isinstance(a, (bool, int, float, complex, str, bytes, np.generic, type)):
        assert _bits(a) == _bits(b), f"{path}: {a!r} vs {b!r}"
    else:  # an estimator, a tree, a loss, an optimizer: what pickle would save of it
        assert_same_values(a.__getstate__(), b.__getstate__(), path)


def history_values(t: warmfit.Trainer) -> list[dict[str, Any]]:
    """The history's values: everything but which call (segment) and mode wrote a row."""
    return [_bits({k: v for k, v in r.items() if k not in ("segment", "mode")}) for r in t.history]


def assert_same_bits(
    case: Case, a: warmfit.Trainer, b: warmfit.Trainer, *, differ: tuple[str, ...] = ()
) -> None:
    """Bit for bit, on any backend: :func:`conftest.assert_same_state`. Where a
    scikit-learn estimator's bytes differ, its decoded values are compared first, so
    that the failure names the attribute."""
    if case.estimator:
        ea, eb = (t.state_dict()["tensors"]["model/skops"].tobytes() for t in (a, b))
        if ea != eb:
            from warmfit.backends.sklearn import loads

            assert_same_values(loads(ea), loads(eb), "model/skops")
    assert_same_state(a, b, differ=differ)


def assert_ledger_adds_up(split: warmfit.Trainer, straight: warmfit.Trainer, calls: int) -> None:
    """The split run's ledger is the straight run's one row cut into ``calls`` rows."""
    rows, (ref,) = list(split.ledger), list(straight.ledger)
    assert len(rows) == calls
    assert [r["mode"] for r in rows] == ["continue"] * calls
    assert [r["segment"] for r in rows] == list(range(calls))
    assert rows[0]["step_start"] == ref["step_start"] == 0
    assert rows[0]["epoch_start"] == ref["epoch_start"] == 0
    for before, after in itertools.pairwise(rows):
        assert after["step_start"] == before["step_end"]
        assert after["epoch_start"] == before["epoch_start"] + before["epochs_done"]
    assert rows[-1]["step_end"] == ref["step_end"] == straight.global_step
    assert sum(r["epochs_done"] for r in rows) == ref["epochs_done"] == straight.epoch
    for r in rows:
        assert (r["fingerprint"], r["data_shape"]) == (ref["fingerprint"], ref["data_shape"])
        assert r["stopped_by"] is None
    assert _bits(rows[-1]["final"]) == _bits(ref["final"])


def disturb_global_streams() -> None:
    """What a new process (or the caller's own code) does to the global generators."""
    torch.manual_seed(12345), np.random.seed(12345), random.seed(12345)
    torch.rand(17), np.random.rand(5), random.random()


# -- the cases -------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One backend under the contract.

    ``build`` returns a fresh ``(model, Trainer settings)`` pair, identical on every call;
    ``data`` the positional arguments of ``fit``; ``fit_kwargs`` the keyword arguments
    every call passes (validation). ``total`` units straight are cut after ``cut``.
    ``steps_per_epoch`` is 1 where one unit is one indivisible step (rounds): no cut in
    the middle of an epoch there. ``estimator``: the state holds a scikit-learn
    estimator (``model/skops``), whose values a failing comparison names.
    """

    name: str
    build: Callable[[], tuple[Any, dict[str, Any]]]
    data: Callable[[], tuple[Any, ...]]
    unit: str = "epochs"
    total: int = 4
    cut: int = 1
    steps_per_epoch: int = 13
    fit_kwargs: Callable[[], dict[str, Any]] = field(default=lambda: {})
    estimator: bool = False

    def trainer(self, **overrides: Any) -> warmfit.Trainer:
        model, settings = self.build()
        return warmfit.Trainer(model, **{**settings, **overrides})

    def load(self, path: Path) -> warmfit.Trainer:
        model, settings = self.build()
        return warmfit.Trainer.load(path, model, **settings)

    def fit(self, trainer: warmfit.Trainer, **kwargs: Any) -> None:
        """One fit call: ``fit(*data, <unit>=n)``, ``steps=``, ``until_epoch=``, ``mode=``."""
        if "units" in kwargs:
            kwargs[self.unit] = kwargs.pop("units")
        trainer.fit(*self.data(), **self.fit_kwargs(), **kwargs)

    def straight(self) -> warmfit.Trainer:
        """The reference: ``total`` units in one call (built once per case; read only)."""
        return _straight(self)


@cache
def _straight(case: Case) -> warmfit.Trainer:
    t = case.trainer()
    case.fit(t, units=case.total)
    return t


@cache
def arrays() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


@cache
def validation() -> tuple[np.ndarray, np.ndarray]:
    return make_data(60, seed=9)


class PairDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over the arrays (the DataLoader path)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def torch_build() -> tuple[Any, dict[str, Any]]:
    return MLP, trainer_settings()  # dropout, Adam, warmup + cosine per step


def keras_build() -> tuple[Any, dict[str, Any]]:
    keras = require("keras", reason="keras 3 is not installed")
    keras.utils.set_random_seed(3)  # the instance's initial weights
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),  # unseeded: torch's global stream on torch
            keras.layers.Dense(3),
        ]
    )
    settings = dict(
        trainer_settings(),
        optimizer=lambda: keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, settings


def sklearn_case(name: str, build: Callable[[], tuple[Any, dict]], **kwargs: Any) -> Case:
    kwargs = {"data": arrays, "fit_kwargs": with_validation, **kwargs}
    return Case(name, build, estimator=True, **kwargs)


def sklearn_build(make: Callable[[], Any], **kwargs: Any) -> Callable[[], tuple[Any, dict]]:
    def build() -> tuple[Any, dict[str, Any]]:
        return make(), dict(batch_size=BATCH, seed=7, verbose=0, **kwargs)

    return build


def _sgd() -> Any:
    from sklearn.linear_model import SGDClassifier

    # random_state=None: its shuffling draws from the Trainer's NumPy stream.
    return SGDClassifier(learning_rate="constant", eta0=0.05, average=5, random_state=None)


def _mlp() -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier((8,), random_state=None)  # its own Adam, moments in the state


def _kmeans() -> Any:
    from sklearn.cluster import MiniBatchKMeans

    # random_state=None: its _random_state *is* NumPy's global generator (the Trainer's).
    return MiniBatchKMeans(n_clusters=3, random_state=None, reassignment_ratio=0.5)


def _hist_gradient_boosting() -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_depth=3, max_features=0.5, early_stopping=False)


def _gradient_boosting() -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(subsample=0.7, max_features=3, max_depth=2)


def _forest() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(max_depth=4, random_state=None)


def with_validation() -> dict[str, Any]:
    return {"validation_data": validation()}


CASES = [
    Case("torch-arrays", torch_build, arrays, fit_kwargs=with_validation),
    Case(
        "torch-dataset",
        torch_build,
        lambda: (PairDataset(*arrays()),),
        fit_kwargs=lambda: {"validation_split": 0.2},
        steps_per_epoch=10,  # 160 training samples after the split
    ),
    Case("keras-torch", keras_build, arrays, total=3, fit_kwargs=with_validation),
    sklearn_case(
        "sklearn-SGDClassifier",
        sklearn_build(_sgd, schedule=schedules.step_decay(0.05, step_size=10, gamma=0.5)),
    ),
    sklearn_case("sklearn-MLPClassifier", sklearn_build(_mlp), total=3),
    sklearn_case(
        "sklearn-MiniBatchKMeans",
        sklearn_build(_kmeans),
        data=lambda: (arrays()[0],),  # unsupervised: no y
        fit_kwargs=lambda: {"validation_data": (validation()[0],)},
    ),
    sklearn_case(
        "sklearn-HistGradientBoosting-rounds",
        sklearn_build(_hist_gradient_boosting, backend_options={"estimators_per_round": 2}),
        unit="rounds",
        cut=1,
        steps_per_epoch=1,
    ),
    sklearn_case(
        "sklearn-GradientBoosting-rounds",
        sklearn_build(_gradient_boosting),  # one stage (3 trees, one a class) a round
        unit="rounds",
        total=3,
        cut=1,
        steps_per_epoch=1,
    ),
    sklearn_case(
        "sklearn-RandomForest-rounds",
        sklearn_build(_forest, backend_options={"estimators_per_round": 2}),
        unit="rounds",
        cut=1,
        steps_per_epoch=1,
    ),
]
MID_EPOCH_CASES = [c for c in CASES if c.steps_per_epoch > 1]


def cases(selection: list[Case]) -> Any:
    return pytest.mark.parametrize("case", selection, ids=[c.name for c in selection])


# -- the contract ---------------------------------------------------------------------------
@cases(CASES)
def test_split_calls_equal_straight(case):
    """E1: k units, then N - k units, in the same Trainer == N units in one call."""
    straight = case.straight()
    split = case.trainer()
    case.fit(split, units=case.cut)
    disturb_global_streams()  # the caller's code between calls changes nothing
    case.fit(split, units=case.total - case.cut)
    assert_same_bits(case, straight, split)
    assert split.epoch == straight.epoch == case.total
    assert split.global_step == case.total * case.steps_per_epoch


@cases(CASES)
def test_save_then_fresh_trainer_load_equals_straight(case, tmp_path):
    """E2: k units, save, a Trainer built from scratch loads, N - k units == N straight."""
    straight = case.straight()
    first = case.trainer()
    case.fit(first, units=case.cut)
    first.save(tmp_path / "ck")
    del first
    disturb_global_streams()
    resumed = case.load(tmp_path / "ck")
    assert resumed.epoch == case.cut and resumed.cursor.offset == 0
    case.fit(resumed, units=case.total - case.cut)
    assert_same_bits(case, straight, resumed)
    assert_ledger_adds_up(resumed, straight, calls=2)


@cases(CASES)
def test_state_dict_into_fresh_trainer_equals_straight(case):
    """state_dict() -> load_state_dict() of a fresh Trainer -> N - k units == N straight."""
    straight = case.straight()
    first = case.trainer()
    case.fit(first, units=case.cut)
    state = first.state_dict()
    case.fit(first, units=1)  # the state_dict is a copy: later training does not reach it
    disturb_global_streams()
    resumed = case.trainer()
    resumed.load_state_dict(state)
    case.fit(resumed, units=case.total - case.cut)
    assert_same_bits(case, straight, resumed)
    assert_ledger_adds_up(resumed, straight, calls=2)


@cases(MID_EPOCH_CASES)
@pytest.mark.parametrize("via", ["same-trainer", "save-load"])
def test_cut_in_the_middle_of_an_epoch(case, via, tmp_path):
    """E3: ``steps=`` stops mid-epoch (epoch 1, half-way); finishing from the cursor, in
    the same Trainer or through a checkpoint, == N units straight."""
    straight = case.straight()
    cut = case.steps_per_epoch + case.steps_per_epoch // 2
    parts = case.trainer()
    case.fit(parts, steps=cut)
    assert parts.global_step == cut
    assert parts.cursor == warmfit.data.Cursor(1, (case.steps_per_epoch // 2) * BATCH)
    assert len(parts.history) == 1  # the cut epoch is not a row yet
    if via == "save-load":
        parts.save(tmp_path / "ck")
        disturb_global_streams()
        parts = case.load(tmp_path / "ck")
    case.fit(parts, until_epoch=case.total)
    assert_same_bits(case, straight, parts)
    assert_ledger_adds_up(parts, straight, calls=2)
    assert [r["steps_asked"] for r in parts.ledger] == [cut, None]


@cases(CASES)
def test_restart_equals_fresh_trainer(case):
    """``mode="restart"`` after training == the run of a freshly built Trainer."""
    t = case.trainer()
    case.fit(t, units=case.cut)
    case.fit(t, units=1)
    case.fit(t, units=case.total, mode="restart")
    fresh = case.straight()
    assert_same_bits(case, t, fresh, differ=("counters.run",))
    assert t.counters.run == 1 and len(t.history) == case.total
    assert [r["mode"] for r in t.ledger] == ["continue", "continue", "restart"]
    assert [r["run"] for r in t.ledger] == [0, 0, 1]


@cases(CASES)
def test_history_and_ledger_agree_with_straight(case):
    """The split run's history has the straight run's rows and values, in segments; its
    ledger is the straight run's row cut in two."""
    straight = case.straight()
    split = case.trainer()
    case.fit(split, units=case.cut)
    case.fit(split, units=case.total - case.cut)
    assert len(split.history) == len(straight.history) == case.total
    assert history_values(split) == history_values(straight)
    assert [r["epoch"] for r in split.history] == list(range(1, case.total + 1))
    assert [r["step"] for r in split.history] == [
        e * case.steps_per_epoch for e in range(1, case.total + 1)
    ]
    assert [r["segment"] for r in split.history] == [0] * case.cut + [1] * (case.total - case.cut)
    assert all(r["segment"] == 0 for r in straight.history)
    assert all(not math.isnan(r["val_loss"]) for r in split.history)  # validation ran
    assert_ledger_adds_up(split, straight, calls=2)
    assert [r["epochs_done"] for r in split.ledger] == [case.cut, case.total - case.cut]


# -- the comparison itself ---------------------------------------------------------------
@cases(CASES)
def test_the_comparison_sees_another_seed(case):
    """The suite can fail: another seed gives other weights, and the comparison of the
    state's tensors (not only the counters) says so."""
    straight = case.straight()
    other = case.trainer(seed=8)
    case.fit(other, units=case.total)
    with pytest.raises((AssertionError, pytest.fail.Exception)) as err:
        assert_same_bits(case, straight, other)
    assert re.search(r"(^|\()(model|optim|rng)/", str(err.value)), str(err.value)


def _state(**parts: Any) -> dict[str, Any]:
    """A small state in the shape of ``state_dict()``: one tensor, and ``parts``."""
    state = {"counters": {"epoch": 1, "fit_calls": 1}, "history": [], "ledger": []}
    return {"tensors": {"model/w": np.zeros(2, np.float32)}, "state": {**state, **parts}}


@pytest.mark.parametrize(
    ("a", "b", "entries"),
    [
        (  # JSON floats by their bits: -0.0 is not 0.0
            _state(epoch_partial={"loss_sum": 0.0}),
            _state(epoch_partial={"loss_sum": -0.0}),
            ["the partial epoch's loss sum (epoch_partial.loss_sum)"],
        ),
        (  # type for type: True is not 1
            _state(counters={"epoch": 1, "fit_calls": 1}),
            _state(counters={"epoch": True, "fit_calls": 1}),
            ["counter epoch: 1 straight, True split"],
        ),
        (  # a float one step apart in the history
            _state(history=[{"epoch": 1, "loss": 0.1, "segment": 0}]),
            _state(history=[{"epoch": 1, "loss": float(np.nextafter(0.1, 1)), "segment": 1}]),
            ["history epoch 1 loss: 0.1 straight, 0.10000000000000002 split"],
        ),
        (  # the data record, the call in progress, another rank's streams
            _state(data={"shape": [2, 8]}, call=None, rng={"host_ranks": {"1": {"py": [1]}}}),
            _state(data={"shape": [2, 9]}, call={"c": 1}, rng={"host_ranks": {"1": {"py": [2]}}}),
            [
                "RNG stream py of rank 1 (rng.host_ranks.1.py)",
                "the record of the training data (data.shape[1])",
                "the fit call in progress (call)",
            ],
        ),
        (  # a tensor's bytes: -0.0 is not 0.0 either
            _state(),
            {**_state(), "tensors": {"model/w": np.array([0.0, -0.0], np.float32)}},
            ["parameter w (model/w): max |difference| 0"],
        ),
    ],
)
def test_the_comparator_compares_bits_and_types(a, b, entries):
    from warmfit.check import compare_states

    assert compare_states(a, b) == entries
    assert compare_states(a, a) == []


def test_the_comparator_leaves_out_the_ledger_settings_and_the_number_of_calls():
    """What differs by design between a split and a straight run; NaN equals NaN."""
    from warmfit.check import NOT_COMPARED, compare_states

    nan = float("nan")
    a = _state(ledger=[{"call": 0}], settings={"threads": 1}, epoch_partial={"loss_sum": nan})
    b = _state(ledger=[{"call": 0}, {"call": 1}], settings={"threads": 2})
    b["state"]["counters"]["fit_calls"] = 2
    b["state"]["epoch_partial"] = {"loss_sum": -nan}
    assert compare_states(a, b) == []
    assert sorted(NOT_COMPARED) == ["ledger", "settings"]
