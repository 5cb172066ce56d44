"""The conformance suite (STYLE point 7), run against every built-in backend.

The contract and its checks are the public :mod:`warmfit.testing` (a third party runs
the same on its own backend); this file defines the torch, Keras and scikit-learn
:class:`~warmfit.testing.Case` objects and runs every check on every case, one test
each, so a failure names the case and the check. The comparison is
:func:`warmfit.testing.assert_same_state`, on :func:`warmfit.check.compare_states`;
the comparator's own rules are tested at the end.

Real process restarts are covered by ``test_resume_processes.py``; here a "restart" is a
Trainer built from scratch (with the caller's global streams disturbed in between) that
loads the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, make_data, require, trainer_settings
from warmfit import schedules
from warmfit.testing import CHECKS, Case, check_backend, restart_schedule_and_callbacks

BATCH = 16  # every case: 200 samples in batches of 16, 13 steps per epoch


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


def with_validation() -> dict[str, Any]:
    return {"validation_data": validation()}


# -- scikit-learn ------------------------------------------------------------------------
def sklearn_warm_state(trained: Mapping[str, Any], never_trained: Mapping[str, Any]) -> dict:
    """The state a ``warm`` call starts from on an SGD or MLP estimator, by hand from
    ``docs/sklearn.md``: what SGD's own warm-start fit resets (its step counter ``t_``,
    and the averages, the coefficients going back to the unaveraged ones), or the MLP's
    Adam dropped (the next ``partial_fit`` builds a fresh one); the rate the estimator
    was built with (which a schedule or ReduceLROnPlateau overwrote); then the schedule
    and callbacks as for every backend."""
    from warmfit.backends.sklearn import dumps, loads

    est = loads(trained["tensors"]["model/skops"].tobytes())
    fresh = loads(never_trained["tensors"]["model/skops"].tobytes())
    if hasattr(est, "eta0"):  # SGD
        est.t_, est.eta0 = 1.0, fresh.eta0
        if est.average:
            est.coef_, est.intercept_ = est._standard_coef, est._standard_intercept
            est._average_coef = np.zeros_like(est.coef_)
            est._average_intercept = np.zeros_like(est.intercept_)
    else:
        del est._optimizer
        est.learning_rate_init = fresh.learning_rate_init
    tensors = {**trained["tensors"], "model/skops": np.frombuffer(dumps(est), np.uint8)}
    return restart_schedule_and_callbacks(
        {"tensors": tensors, "state": trained["state"]}, never_trained
    )


def sklearn_case(name: str, build: Callable[[], tuple[Any, dict]], **kwargs: Any) -> Case:
    kwargs = {"data": arrays, "fit_kwargs": with_validation, "steps_per_epoch": 13, **kwargs}
    return Case(name, build, **kwargs)


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


NO_WARM = ("continue", "restart")  # refused: sufficient statistics, or rounds

CASES = [
    Case("torch-arrays", torch_build, arrays, fit_kwargs=with_validation, steps_per_epoch=13),
    Case(
        "torch-dataset",
        torch_build,
        lambda: (PairDataset(*arrays()),),
        fit_kwargs=lambda: {"validation_split": 0.2},
        steps_per_epoch=10,  # 160 training samples after the split
    ),
    Case(
        "keras-torch", keras_build, arrays, total=3, fit_kwargs=with_validation, steps_per_epoch=13
    ),
    sklearn_case(
        "sklearn-SGDClassifier",
        sklearn_build(_sgd, schedule=schedules.step_decay(0.05, step_size=10, gamma=0.5)),
        warm_state=sklearn_warm_state,
    ),
    sklearn_case(
        "sklearn-MLPClassifier", sklearn_build(_mlp), total=3, warm_state=sklearn_warm_state
    ),
    sklearn_case(
        "sklearn-MiniBatchKMeans",
        sklearn_build(_kmeans),
        data=lambda: (arrays()[0],),  # unsupervised: no y
        fit_kwargs=lambda: {"validation_data": (validation()[0],)},
        modes=NO_WARM,
    ),
    sklearn_case(
        "sklearn-HistGradientBoosting-rounds",
        sklearn_build(_hist_gradient_boosting, backend_options={"estimators_per_round": 2}),
        unit="rounds",
        steps_per_epoch=1,
        modes=NO_WARM,
    ),
    sklearn_case(
        "sklearn-GradientBoosting-rounds",
        sklearn_build(_gradient_boosting),  # one stage (3 trees, one a class) a round
        unit="rounds",
        total=3,
        steps_per_epoch=1,
        modes=NO_WARM,
    ),
    sklearn_case(
        "sklearn-RandomForest-rounds",
        sklearn_build(_forest, backend_options={"estimators_per_round": 2}),
        unit="rounds",
        steps_per_epoch=1,
        modes=NO_WARM,
    ),
]


# -- the contract, every check on every case -----------------------------------------------
#: (case, check) -> the bug that makes it fail: strict, so the fix shows as an XPASS.
#: (case, check) -> why it fails: a strict xfail, so a fix shows as an XPASS. None now.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _params() -> list[Any]:
    params = []
    for check in CHECKS:
        for case in CASES:
            why = KNOWN_BUGS.get((case.name, check))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=why)]
            params.append(
                pytest.param(case, check, id=f"{case.name}-{check}", marks=marks * bool(why))
            )
    return params


@pytest.mark.parametrize(("case", "check"), _params())
def test_conformance(case, check, tmp_path):
    """``warmfit.testing``'s check ``check`` on ``case``: see its docstring."""
    check_backend(case, tmp_path, checks=[check])


def test_the_seed_check_sees_another_seed_in_the_tensors():
    """The suite can fail: the states of two seeds differ in their tensors, and the
    message names the first entry that differs (a weight)."""
    case = CASES[0]
    other = case.trainer(seed=8)
    case.fit(other, units=case.total)
    with pytest.raises(AssertionError) as err:
        warmfit.testing.assert_same_state(case.reference(), other, what="seeds 7 and 8")
    assert str(err.value).startswith(
        "seeds 7 and 8: the states differ in "
    ) and "entries, the first: parameter net.0.weight (model/net.0.weight): max |difference|" in (
        str(err.value)
    )


def test_a_differing_estimator_is_named_by_its_attribute():
    """Where a scikit-learn estimator's bytes differ, the entry names the attribute."""
    case = next(c for c in CASES if c.name == "sklearn-SGDClassifier")
    other = case.trainer(seed=8)
    case.fit(other, units=case.total)
    with pytest.raises(AssertionError) as err:
        warmfit.testing.assert_same_state(case.reference(), other)
    assert "parameter skops (model/skops): first at estimator.coef_" in str(err.value)


# -- the comparison itself ---------------------------------------------------------------
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
