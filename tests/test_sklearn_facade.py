"""warmfit.sklearn: scikit-learn estimators around a PyTorch module and a warmfit Trainer."""

from __future__ import annotations

import functools
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from warmfit.sklearn import EXPECTED_FAILED_CHECKS, NeuralNetClassifier, NeuralNetRegressor

SMALL = dict(hidden_layer_sizes=(16,), max_epochs=5, lr=1e-2)


def make_data(n: int = 120, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, d))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    return x, y


def weights(est) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in est.module_.state_dict().items()}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@parametrize_with_checks(
    [NeuralNetClassifier(**SMALL), NeuralNetRegressor(**SMALL)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_fit_starts_over_and_warm_start_continues_exactly():
    x, y = make_data()
    straight = NeuralNetClassifier(**{**SMALL, "max_epochs": 6}, random_state=0).fit(x, y)
    split = NeuralNetClassifier(**{**SMALL, "max_epochs": 2}, random_state=0, warm_start=True)
    split.fit(x, y)
    split.set_params(max_epochs=4).fit(x, y)
    assert_same_weights(straight, split)
    assert split.n_epochs_ == 6
    assert [r["mode"] for r in split.trainer_.ledger] == ["continue", "continue"]
    # Without warm_start, fit starts over: the same as one fresh fit.
    again = NeuralNetClassifier(**SMALL, random_state=0)
    again.fit(x, y)
    again.fit(x, y)
    assert_same_weights(again, NeuralNetClassifier(**SMALL, random_state=0).fit(x, y))
    assert again.n_epochs_ == 5


def test_partial_fit_trains_one_more_epoch_in_continue_mode():
    x, y = make_data()
    est = NeuralNetClassifier(**SMALL, random_state=1)
    for _ in range(3):
        est.partial_fit(x, y, classes=[0, 1, 2])
    straight = NeuralNetClassifier(**{**SMALL, "max_epochs": 3}, random_state=1).fit(x, y)
    assert_same_weights(straight, est)
    assert est.n_epochs_ == 3
    # The next chunk may be different data (here: another size): scikit-learn's meaning.
    est.partial_fit(x[:50], y[:50])
    assert est.n_epochs_ == 4


def test_float64_in_float64_compute_and_float32_in_float32_compute():
    x, y = make_data()
    assert NeuralNetRegressor(**SMALL).fit(x, y * 1.0).predict(x).dtype == np.float64
    est = NeuralNetRegressor(**SMALL).fit(x.astype(np.float32), y * 1.0)
    assert next(est.module_.parameters()).dtype == torch.float32


class Linear(nn.Module):
    def __init__(self, n_features: int, n_outputs: int, scale: float = 1.0) -> None:
        super().__init__()
        self.lin = nn.Linear(n_features, n_outputs)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_custom_module_is_picklable_with_partial():
    x, y = make_data()
    est = NeuralNetClassifier(
        module=functools.partial(Linear, scale=2.0), max_epochs=2, random_state=0
    ).fit(x, y)
    assert isinstance(est.module_, Linear) and est.module_.scale == 2.0
    back = pickle.loads(pickle.dumps(est))
    assert np.array_equal(back.predict_proba(x), est.predict_proba(x))
    back.set_params(warm_start=True).fit(x, y)  # a restored estimator continues
    assert back.n_epochs_ == 4


def test_guardrails_classes_features_and_set_params():
    x, y = make_data()
    est = NeuralNetClassifier(**SMALL, random_state=0, warm_start=True).fit(x, y)
    y_new = y.copy()
    y_new[0] = 9
    with pytest.raises(ValueError) as err:
        est.partial_fit(x, y_new)
    assert str(err.value) == (
        "y has classes [9] that NeuralNetClassifier was not built for (classes_ is [0, 1, 2]). "
        "Pass every class with partial_fit(..., classes=...) on the first call, or set "
        "warm_start=False and call fit to start over."
    )
    with pytest.raises(
        ValueError,
        match=re.escape("X has 3 features, but NeuralNetClassifier is expecting 5 features"),
    ):
        est.fit(x[:, :3], y)
    est.set_params(hidden_layer_sizes=(8,))
    with pytest.raises(ValueError) as err:
        est.fit(x, y)
    assert str(err.value) == (
        "hidden_layer_sizes changed from (16,) to (8,) since the network was built; "
        "NeuralNetClassifier cannot continue training a different architecture. Set "
        "warm_start=False and call fit to start over."
    )
    est.set_params(hidden_layer_sizes=(16,), lr=1e-3)
    state_before = est.trainer_.optimizer.state_dict()["state"][0]["step"].item()
    with pytest.warns(UserWarning, match="the optimizer keeps its state"):
        est.fit(x, y)
    assert est.trainer_.optimizer.param_groups[0]["lr"] == 1e-3
    assert est.trainer_.optimizer.state_dict()["state"][0]["step"].item() > state_before
    with pytest.raises(ValueError) as err:
        NeuralNetRegressor(max_epochs=0).fit(x, y)
    assert str(err.value) == (
        "The 'max_epochs' parameter of NeuralNetRegressor must be an int >= 1. Got 0 instead."
    )


def test_pipeline_and_grid_search():
    x, y = make_data(160)
    pipe = make_pipeline(StandardScaler(), NeuralNetClassifier(**SMALL, random_state=0))
    grid = GridSearchCV(
        pipe,
        {"neuralnetclassifier__lr": [1e-3, 3e-2], "neuralnetclassifier__max_epochs": [2, 4]},
        cv=2,
    )
    grid.fit(x, y)
    assert set(grid.best_params_) == {"neuralnetclassifier__lr", "neuralnetclassifier__max_epochs"}
    assert grid.best_score_ > 0.6
    clone(grid.best_estimator_)  # still a plain estimator
    reg = GridSearchCV(NeuralNetRegressor(**SMALL, random_state=0), {"batch_size": [16, 64]}, cv=2)
    reg.fit(x, x[:, 0] - x[:, 1])
    assert reg.best_params_["batch_size"] in (16, 64)


def test_fit_leaves_the_global_random_streams_alone():
    x, y = make_data()
    torch.manual_seed(11)
    np.random.seed(11)
    t_before, np_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    NeuralNetClassifier(**SMALL, random_state=0).fit(x, y)
    assert torch.equal(torch.get_rng_state(), t_before)
    assert np.array_equal(np.random.get_state()[1], np_before)


def test_docs_example_runs():
    text = (Path(__file__).parents[1] / "docs" / "sklearn.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for code in blocks:
            exec(compile(code, "docs/sklearn.md", "exec"), {})


@pytest.mark.parametrize("make", [NeuralNetClassifier, NeuralNetRegressor])
def test_module_instance_is_refused_with_a_pointer_to_the_class(make):
    x, y = make_data(40)
    est = make(module=nn.Linear(5, 3), max_epochs=1, random_state=0)
    message = (
        f"The 'module' parameter of {make.__name__} must be a callable (n_features, "
        "n_outputs) -> torch.nn.Module, or None. Got an instance of Linear (a network "
        "already built) instead. Pass the class (module=Linear) or a factory such as "
        "functools.partial(Linear, ...): fit builds a new network from it for the data's "
        "shape."
    )
    for call in (est.fit, est.partial_fit):
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            call(x, y)
    assert not hasattr(est, "trainer_")  # refused before anything was built
    # The class itself is the documented way: nn.Linear(in_features, out_features).
    assert isinstance(make(module=nn.Linear, max_epochs=1).fit(x, y).module_, nn.Linear)


@pytest.mark.parametrize(
    "lr", [0, -1e-3, float("nan"), np.float32("inf"), True, "0.01", np.array([1e-2])]
)
def test_lr_must_be_a_finite_positive_real(lr):
    x, y = make_data(40)
    with pytest.raises(ValueError) as err:
        NeuralNetClassifier(lr=lr, max_epochs=1).fit(x, y)
    assert str(err.value) == (
        f"The 'lr' parameter of NeuralNetClassifier must be a finite float > 0. Got {lr!r} instead."
    )


def test_numpy_scalar_params_train_as_plain_numbers(tmp_path):
    x, y = make_data(64)
    # 2**-6 is exact in float32, so both estimators use the very same learning rate.
    plain = dict(batch_size=16, lr=2.0**-6, max_epochs=3, random_state=0)
    numpy = dict(
        batch_size=np.int64(16), lr=np.float32(2.0**-6), max_epochs=np.int64(3),
        random_state=np.int64(0),
    )  # fmt: skip
    ref = NeuralNetClassifier(hidden_layer_sizes=(8,), **plain).fit(x, y)
    est = NeuralNetClassifier(hidden_layer_sizes=(np.int64(8),), **numpy).fit(x, y)
    assert np.array_equal(est.predict_proba(x), ref.predict_proba(x))
    assert est.get_params()["lr"] is numpy["lr"]  # the parameter itself is kept as given
    assert type(est.trainer_.batch_size) is int
    assert type(est.trainer_.optimizer.param_groups[0]["lr"]) is float
    assert type(est.trainer_.ledger[0]["epochs_asked"]) is int
    est.trainer_.save(tmp_path / "ckpt")  # JSON holds the counters
    # Changed between continued calls: applied as plain numbers, the same as plain ones.
    for e, bs, lr in ((ref, 8, 2.0**-7), (est, np.int64(8), np.float32(2.0**-7))):
        e.set_params(warm_start=True, batch_size=bs, lr=lr, max_epochs=np.int64(1))
        with pytest.warns(UserWarning, match="the optimizer keeps its state"):
            e.fit(x, y)
    assert type(est.trainer_.batch_size) is int
    assert type(est.trainer_.optimizer.param_groups[0]["lr"]) is float
    assert np.array_equal(est.predict_proba(x), ref.predict_proba(x))
    est.trainer_.save(tmp_path / "ckpt2")


def test_grid_search_over_numpy_arrays_of_batch_sizes_and_learning_rates():
    x, y = make_data(64)
    grid = GridSearchCV(
        NeuralNetClassifier(hidden_layer_sizes=(8,), max_epochs=1, random_state=0),
        {"batch_size": np.array([16, 32]), "lr": np.array([1e-2, 3e-2], dtype=np.float32)},
        cv=2,
        error_score="raise",
    ).fit(x, y)
    assert grid.best_params_["batch_size"] in (16, 32)
    assert type(grid.best_estimator_.trainer_.batch_size) is int
