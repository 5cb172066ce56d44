"""Estimators' own stopping rules (issue 15, item 7): warmfit grows round estimators one
warm-start fit at a time and drives the others with partial_fit, so a rule of the
estimator's ``fit`` that stops training (or adapts the step size on a plateau) would
silently not be the same. Such an estimator is refused before anything changes, with a
message naming the parameter to set and what to use instead; where the rule does not
apply, warmfit's result is scikit-learn's own, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import (
    BaggingClassifier,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
)
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Perceptron, SGDClassifier, SGDOneClassSVM, SGDRegressor
from sklearn.multioutput import MultiOutputClassifier
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.utils.validation import check_is_fitted

import warmfit
from warmfit.backends.sklearn import dumps

INSTEAD = "use warmfit.EarlyStopping(...) with validation_data=(x_val, y_val) instead."
INSTEAD_LR = (
    "use warmfit.ReduceLROnPlateau(factor=0.2, ...) with validation_data=(x_val, y_val) instead."
)


def rounds_why(key: str) -> str:
    return (
        f"but warmfit grows it round by round (each round a warm-start fit with {key} raised by "
        "estimators_per_round), and a stop inside one round does not stop the next: training "
        "would silently go on."
    )


def make_data(n: int, d: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels, so that scikit-learn's own early stopping fires within a few dozen
    iterations."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, d))
    y = (x[:, 0] + 2.0 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def trainer(est, **kwargs) -> warmfit.Trainer:
    return warmfit.Trainer(est, batch_size=16, seed=3, verbose=0, **kwargs)


def snapshot(t: warmfit.Trainer) -> tuple:
    """What a refused call must leave as it was: counters, ledger, history, estimator."""
    sd = t.state_dict()
    return (
        sd["state"]["counters"],
        [dict(r) for r in t.ledger],
        len(t.history),
        sd["tensors"]["model/skops"].tobytes(),
        dumps(t.model),
    )


def refused(t: warmfit.Trainer, x, y, **fit_kwargs) -> str:
    """Fit, expecting a refusal that changes nothing; return its message."""
    before = snapshot(t)
    with pytest.raises(ValueError) as err:
        t.fit(x, y, **fit_kwargs)
    assert snapshot(t) == before
    return str(err.value)


def assert_fresh(t: warmfit.Trainer) -> None:
    assert len(t.ledger) == 0 and t.epoch == 0 and t.global_step == 0
    assert t.state_dict()["state"]["counters"]["fit_calls"] == 0
    with pytest.raises(NotFittedError):
        check_is_fitted(t.model)


# -- HistGradientBoosting ------------------------------------------------------------------
def test_hist_gradient_boosting_auto_decides_by_sklearns_row_threshold():
    """'auto' is early stopping above 10,000 rows: at 10,000 warmfit grows exactly what a
    plain fit does; at 10,001 (where a plain fit stops early) it refuses, and with the
    advised early_stopping=False it is again a plain fit, bit for bit."""
    x, y = make_data(10_001)
    # Why: a plain fit of the user's estimator stops early; warmfit's rounds would not.
    assert HistGradientBoostingClassifier(max_iter=60, random_state=0).fit(x, y).n_iter_ < 60

    at = trainer(HistGradientBoostingClassifier(random_state=0))
    at.fit(x[:10_000], y[:10_000], rounds=3)
    plain = HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(x[:10_000], y[:10_000])
    assert plain.do_early_stopping_ is False
    assert dumps(at.model) == dumps(plain)

    above = trainer(HistGradientBoostingClassifier(random_state=0))
    assert refused(above, x, y, rounds=3) == (
        "HistGradientBoostingClassifier(early_stopping='auto') stops early (scikit-learn turns "
        "it on above 10000 training rows; this fit has 10001): it stops adding iterations once "
        f"its score stops improving, {rounds_why('max_iter')} Set early_stopping=False and "
        f"{INSTEAD}"
    )
    assert_fresh(above)
    above.model.set_params(early_stopping=False)  # what the message says
    above.fit(x, y, rounds=3)
    plain = HistGradientBoostingClassifier(max_iter=3, early_stopping=False, random_state=0)
    assert dumps(above.model) == dumps(plain.fit(x, y))


@pytest.mark.parametrize("cls", [HistGradientBoostingClassifier, HistGradientBoostingRegressor])
def test_hist_gradient_boosting_early_stopping_true_is_refused_at_any_size(cls):
    x, y = make_data(200)
    t = trainer(cls(early_stopping=True, n_iter_no_change=2))
    assert refused(t, x, y, rounds=2) == (
        f"{cls.__name__}(early_stopping=True) stops early: it stops adding iterations once its "
        f"score stops improving, {rounds_why('max_iter')} Set early_stopping=False and {INSTEAD}"
    )
    assert_fresh(t)
    # Switched on between calls: refused too, the grown estimator left as it was.
    t.model.set_params(early_stopping=False)
    t.fit(x, y, rounds=2)
    t.model.set_params(early_stopping=True)
    assert refused(t, x, y, rounds=2).startswith(f"{cls.__name__}(early_stopping=True) stops")
    assert t.model.n_iter_ == 2 and len(t.ledger) == 1


# -- GradientBoosting ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [GradientBoostingClassifier, GradientBoostingRegressor])
def test_gradient_boosting_n_iter_no_change_is_refused(cls):
    x, y = make_data(200)
    y = y if cls is GradientBoostingClassifier else y.astype(np.float64)
    # Why: a plain fit of the user's estimator stops early; warmfit's rounds would not.
    est = cls(n_iter_no_change=2, max_depth=2, random_state=0)
    assert clone(est).set_params(n_estimators=100).fit(x, y).n_estimators_ < 100
    t = trainer(est)
    assert refused(t, x, y, rounds=3) == (
        f"{cls.__name__}(n_iter_no_change=2) stops early: it stops adding estimators once its "
        f"validation score stops improving, {rounds_why('n_estimators')} Set "
        f"n_iter_no_change=None and {INSTEAD}"
    )
    assert_fresh(t)
    t.model.set_params(n_iter_no_change=None)  # what the message says
    t.fit(x, y, rounds=3)
    plain = cls(n_estimators=3, max_depth=2, random_state=0).fit(x, y)
    assert dumps(t.model) == dumps(plain)


# -- partial_fit estimators ------------------------------------------------------------------
SGD_FAMILY = [
    (SGDClassifier, lambda y: y),
    (SGDRegressor, lambda y: y.astype(np.float64)),
    (Perceptron, lambda y: y),
]


def sgd_early_stopping_message(name: str, prefix: str = "", where: str = "") -> str:
    return (
        f"{name}(early_stopping=True){where} stops early only in fit; warmfit trains {name} "
        "with partial_fit (one call per batch), where scikit-learn never stops early (it "
        "refuses early_stopping=True on the first call and on later calls only holds "
        f"validation_fraction of each batch out of training). Set {prefix}early_stopping=False "
        f"and {INSTEAD}"
    )


@pytest.mark.parametrize(("cls", "target"), SGD_FAMILY)
def test_sgd_family_early_stopping_is_refused(cls, target):
    x, y = make_data(100)
    y = target(y)
    t = trainer(cls(early_stopping=True, random_state=0))
    assert refused(t, x, y, epochs=1) == sgd_early_stopping_message(cls.__name__)
    assert_fresh(t)
    # Switched on after a first fit, partial_fit would silently hold 10% of each batch out
    # of training: refused as well, before anything changes.
    t.model.set_params(early_stopping=False)
    t.fit(x, y, epochs=1)
    t.model.set_params(early_stopping=True)
    assert refused(t, x, y, epochs=1) == sgd_early_stopping_message(cls.__name__)
    assert len(t.ledger) == 1 and t.epoch == 1


@pytest.mark.parametrize(("cls", "target"), [(MLPClassifier, int), (MLPRegressor, float)])
def test_mlp_early_stopping_is_refused(cls, target):
    x, y = make_data(100)
    t = trainer(cls(hidden_layer_sizes=(4,), early_stopping=True, random_state=0))
    assert refused(t, x, y.astype(target), epochs=1) == (
        f"{cls.__name__}(early_stopping=True) stops early only in fit; warmfit trains "
        f"{cls.__name__} with partial_fit (one call per batch), which scikit-learn refuses with "
        f"early_stopping=True. Set early_stopping=False and {INSTEAD}"
    )
    assert_fresh(t)
    t.model.set_params(early_stopping=False)  # what the message says
    t.fit(x, y.astype(target), epochs=1)
    assert t.epoch == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: SGDClassifier(learning_rate="adaptive", eta0=0.1, random_state=0),
            "SGDClassifier(learning_rate='adaptive') divides its step size by 5 whenever its "
            "loss stops improving by tol, a rule of fit; warmfit trains SGDClassifier with "
            "partial_fit (one call per batch), where that never happens: the step size would "
            f"silently stay eta0. Set learning_rate='constant' and {INSTEAD_LR}",
        ),
        (
            lambda: SGDOneClassSVM(learning_rate="adaptive", eta0=0.1, random_state=0),
            "SGDOneClassSVM(learning_rate='adaptive') divides its step size by 5 whenever its "
            "loss stops improving by tol, a rule of fit; warmfit trains SGDOneClassSVM with "
            "partial_fit (one call per batch), where that never happens: the step size would "
            f"silently stay eta0. Set learning_rate='constant' and {INSTEAD_LR}",
        ),
        (
            lambda: MLPRegressor(
                hidden_layer_sizes=(4,), solver="sgd", learning_rate="adaptive", random_state=0
            ),
            "MLPRegressor(solver='sgd', learning_rate='adaptive') divides its step size by 5 "
            "whenever its training loss stops improving by tol over n_iter_no_change epochs, a "
            "rule of fit; warmfit trains MLPRegressor with partial_fit (one call per batch), "
            "where the rule would count batches and compare batch losses instead: silently "
            f"another rule. Set learning_rate='constant' and {INSTEAD_LR}",
        ),
    ],
)
def test_adaptive_learning_rates_are_refused(make, message):
    x, y = make_data(100)
    est = make()
    if isinstance(est, SGDOneClassSVM):
        y = None
    elif isinstance(est, MLPRegressor):
        y = y.astype(np.float64)
    t = trainer(est)
    assert refused(t, x, y, epochs=1) == message
    assert_fresh(t)
    t.model.set_params(learning_rate="constant")  # what the message says
    t.fit(x, y, epochs=1)
    assert t.epoch == 1


def test_nested_partial_fit_estimators_are_judged_bagging_is_not():
    """A meta-estimator's partial_fit drives its estimator's partial_fit: judged like it,
    the parameter named as set on the meta-estimator. Bagging fits each of its estimators
    whole with a plain fit, as without warmfit: their own stopping is unchanged."""
    x, y = make_data(200)
    meta = trainer(MultiOutputClassifier(SGDClassifier(early_stopping=True)))
    assert refused(meta, x, np.c_[y, 1 - y], epochs=1) == sgd_early_stopping_message(
        "SGDClassifier", "estimator__", ", the estimator of MultiOutputClassifier,"
    )
    assert_fresh(meta)

    def bagging(n: int) -> BaggingClassifier:
        inner = SGDClassifier(early_stopping=True, n_iter_no_change=2, random_state=0)
        return BaggingClassifier(inner, n_estimators=n, random_state=0)

    t = trainer(bagging(10))
    t.fit(x, y, rounds=3)
    plain = bagging(3).fit(x, y)
    assert [e.n_iter_ for e in plain.estimators_] == [e.n_iter_ for e in t.model.estimators_]
    assert min(e.n_iter_ for e in plain.estimators_) < 1000  # they did stop early
    for ours, theirs in zip(t.model.estimators_, plain.estimators_, strict=True):
        assert dumps(ours) == dumps(theirs)
    assert np.array_equal(t.model.predict_proba(x), plain.predict_proba(x))


# -- which estimator a call trains; resume -------------------------------------------------
def test_decided_on_the_estimator_the_call_trains_and_the_same_on_resume(tmp_path):
    """A resumed 'continue' trains the checkpoint's estimator (early_stopping=False) and is
    allowed, as the straight run was, even though the estimator passed to resume is the
    default 'auto'; a 'restart' trains a clone of that one and is refused on 10,001 rows."""
    x, y = make_data(10_001)
    kw = dict(batch_size=16, seed=3, verbose=0, run_dir=tmp_path)
    with warmfit.Trainer(HistGradientBoostingClassifier(early_stopping=False), **kw) as t:
        t.fit(x, y, rounds=2)
    with pytest.warns(UserWarning, match="params.early_stopping: checkpoint False, now 'auto'"):
        resumed = warmfit.Trainer(HistGradientBoostingClassifier(), **kw)
    with resumed:
        assert resumed.model.early_stopping is False  # the checkpoint's estimator, whole
        resumed.fit(x, y, rounds=2)
        straight = trainer(HistGradientBoostingClassifier(early_stopping=False))
        straight.fit(x, y, rounds=4)
        assert dumps(resumed.model) == dumps(straight.model)
        assert refused(resumed, x, y, rounds=1, mode="restart") == (
            "HistGradientBoostingClassifier(early_stopping='auto') stops early (scikit-learn "
            "turns it on above 10000 training rows; this fit has 10001): it stops adding "
            f"iterations once its score stops improving, {rounds_why('max_iter')} Set "
            f"early_stopping=False and {INSTEAD}"
        )
        assert resumed.model.n_iter_ == 4 and resumed.epoch == 4
