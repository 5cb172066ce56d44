"""The scikit-learn backend: split == straight bit for bit (E1), new-process resume (E2),
the three modes per estimator family, rounds for ensembles, skops checkpoints."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.base import BaseEstimator
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import IncrementalPCA
from sklearn.ensemble import (
    BaggingClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression, SGDClassifier, SGDRegressor
from sklearn.naive_bayes import GaussianNB
from sklearn.neural_network import MLPClassifier
from sklearn.tree import DecisionTreeClassifier

import warmfit
from conftest import assert_same_state
from warmfit.backends.sklearn import dumps, loads
from warmfit.errors import CheckpointError


def make_data(n: int = 200, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, d))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    return x, y


def trainer(est: BaseEstimator, **kwargs) -> warmfit.Trainer:
    return warmfit.Trainer(est, batch_size=16, seed=3, verbose=0, **kwargs)


def blob(t: warmfit.Trainer) -> bytes:
    """The estimator as stored in a checkpoint (canonical skops bytes)."""
    return t.state_dict()["tensors"]["model/skops"].tobytes()


# Each family: a factory and the fitted attributes compared with np.array_equal.
PARTIAL_FIT = {
    "SGDClassifier": (lambda: SGDClassifier(random_state=0), ["coef_", "intercept_", "t_"]),
    "SGDRegressor-average": (
        lambda: SGDRegressor(average=True, random_state=None),
        ["coef_", "intercept_", "t_", "_average_coef"],
    ),
    "MLPClassifier": (
        lambda: MLPClassifier((8,), random_state=None),
        ["coefs_", "intercepts_", "loss_curve_"],
    ),
    "GaussianNB": (GaussianNB, ["theta_", "var_", "class_count_"]),
    "MiniBatchKMeans": (
        lambda: MiniBatchKMeans(n_clusters=3, random_state=None),
        ["cluster_centers_", "_counts"],
    ),
    "IncrementalPCA": (lambda: IncrementalPCA(n_components=3), ["components_", "mean_", "var_"]),
}


def _target(est, y):
    if isinstance(est, (MiniBatchKMeans, IncrementalPCA)):
        return None
    return y.astype(np.float64) if isinstance(est, SGDRegressor) else y


def _attrs_equal(a, b, names):
    for name in names:
        va, vb = getattr(a, name), getattr(b, name)
        if isinstance(va, list):
            assert len(va) == len(vb) and all(
                np.array_equal(p, q) for p, q in zip(va, vb, strict=True)
            ), name
        else:
            assert np.array_equal(va, vb), name


@pytest.mark.parametrize("family", list(PARTIAL_FIT))
def test_e1_partial_fit_split_equals_straight(family):
    make, attrs = PARTIAL_FIT[family]
    x, y = make_data()
    yt = _target(make(), y)
    straight = trainer(make())
    straight.fit(x, yt, epochs=4)
    split = trainer(make())
    split.fit(x, yt, epochs=1)
    split.fit(x, yt, epochs=3)
    _attrs_equal(straight.model, split.model, attrs)
    assert_same_state(straight, split)
    assert split.global_step == straight.global_step == 4 * 13
    # The caller's global NumPy stream is untouched by training (random_state=None draws
    # from the trainer's own stream).
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    split.fit(x, yt, epochs=1)
    assert np.array_equal(np.random.get_state()[1], before)


def test_mlp_reports_its_own_batch_loss_and_sgd_reports_none():
    x, y = make_data()
    mlp = trainer(MLPClassifier((8,), random_state=0))
    losses = []
    original = MLPClassifier.partial_fit

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        losses.append((self.loss_, len(args[0])))
        return out

    MLPClassifier.partial_fit = spy
    try:
        mlp.fit(x, y, epochs=1)
    finally:
        MLPClassifier.partial_fit = original
    total = 0.0
    for loss, size in losses:
        total += loss * size
    assert mlp.history[-1]["loss"] == total / 200
    sgd = trainer(SGDClassifier(random_state=0))
    sgd.fit(x, y, epochs=1)
    assert sgd.history[-1]["loss"] is None


def test_continue_keeps_and_warm_resets_sgd_step_counter():
    x, y = make_data()
    cont = trainer(SGDClassifier(random_state=0, learning_rate="invscaling", eta0=0.1))
    cont.fit(x, y, epochs=2)
    assert cont.model.t_ == 1 + 2 * 200
    warm = trainer(SGDClassifier(random_state=0, learning_rate="invscaling", eta0=0.1))
    warm.fit(x, y, epochs=2)
    coef = warm.model.coef_.copy()
    warm.fit(x, y, epochs=1, mode="warm")
    cont.fit(x, y, epochs=1)
    assert cont.model.t_ == 1 + 3 * 200
    assert warm.model.t_ == 1 + 200  # the schedule started again at step 0
    assert warm.learning_rate == 0.1 / (1 + 200) ** 0.5  # eta0 / t_ ** power_t
    assert not np.array_equal(warm.model.coef_, coef)
    assert not np.array_equal(warm.model.coef_, cont.model.coef_)
    assert [r["mode"] for r in warm.ledger] == ["continue", "warm"]
    assert warm.epoch == 3  # counters are cumulative in warm mode


def test_continue_keeps_and_warm_rebuilds_mlp_adam():
    x, y = make_data()
    t = trainer(MLPClassifier((8,), random_state=0))
    t.fit(x, y, epochs=2)
    assert t.model._optimizer.t == 2 * 13
    first_moment = [m.copy() for m in t.model._optimizer.ms]
    t.fit(x, y, epochs=1)
    assert t.model._optimizer.t == 3 * 13
    t.fit(x, y, epochs=1, mode="warm")
    assert t.model._optimizer.t == 13  # fresh Adam: step count and moments start over
    assert not all(
        np.array_equal(a, b) for a, b in zip(first_moment, t.model._optimizer.ms, strict=True)
    )


@pytest.mark.parametrize(
    ("est", "why"),
    [
        (
            GaussianNB(),
            "its partial_fit state is sufficient statistics, not weights plus an optimizer",
        ),
        (
            RandomForestClassifier(random_state=0),
            "it grows by rounds and has no optimizer state to reset",
        ),
    ],
)
def test_warm_is_refused_where_meaningless(est, why):
    x, y = make_data()
    t = trainer(est)
    t.fit(x, y, epochs=1)
    before = dumps(t.model)
    with pytest.raises(ValueError) as err:
        t.fit(x, y, epochs=1, mode="warm")
    assert str(err.value) == (
        f"mode='warm' is not supported for {type(est).__name__}: {why}. "
        "Supported modes: ('continue', 'restart')."
    )
    assert dumps(t.model) == before and t.epoch == 1 and len(t.ledger) == 1


@pytest.mark.parametrize(
    "make",
    [lambda: SGDClassifier(random_state=0), lambda: RandomForestClassifier(random_state=None)],
)
def test_restart_equals_a_fresh_trainer(make):
    x, y = make_data()
    est = make()
    t = trainer(est)
    t.fit(x, y, epochs=3)
    t.fit(x, y, epochs=2, mode="restart")
    assert t.model is est  # the user's object, refitted in place
    fresh = trainer(make())
    fresh.fit(x, y, epochs=2)
    assert blob(t) == blob(fresh)
    assert_same_state(t, fresh, differ=("counters.run",))
    assert t.counters.run == 1 and t.epoch == 2


ENSEMBLES = {
    "RandomForest-int": (lambda: RandomForestClassifier(random_state=0), "predict_proba"),
    "RandomForest-None": (lambda: RandomForestClassifier(random_state=None), "predict_proba"),
    "RandomForest-RandomState": (
        lambda: RandomForestClassifier(random_state=np.random.RandomState(4)),
        "predict_proba",
    ),
    "ExtraTrees": (lambda: ExtraTreesRegressor(max_features=0.5), "predict"),
    "GradientBoosting": (
        lambda: GradientBoostingClassifier(subsample=0.7, max_features=2),
        "predict_proba",
    ),
    "HistGradientBoosting": (
        lambda: HistGradientBoostingRegressor(max_features=0.5, early_stopping=False),
        "predict",
    ),
    "Bagging-None": (lambda: BaggingClassifier(), "predict_proba"),
}


@pytest.mark.parametrize("name", list(ENSEMBLES))
def test_rounds_add_up(name):
    make, method = ENSEMBLES[name]
    x, y = make_data()
    if "Regressor" in type(make()).__name__:
        y = x[:, 0] + 0.1 * x[:, 3]
    straight = trainer(make())
    straight.fit(x, y, rounds=4)
    split = trainer(make())
    split.fit(x, y, rounds=2)
    split.fit(x, y, rounds=2)
    assert np.array_equal(getattr(straight.model, method)(x), getattr(split.model, method)(x))
    if hasattr(straight.model, "feature_importances_"):
        assert np.array_equal(straight.model.feature_importances_, split.model.feature_importances_)
    assert blob(straight) == blob(split)
    assert_same_state(straight, split)
    assert [r["epochs_done"] for r in split.ledger] == [2, 2]
    assert split.global_step == split.epoch == 4


def test_rounds_grow_estimators_and_restart_from_scratch():
    x, y = make_data()
    est = RandomForestClassifier(n_estimators=100, random_state=0)
    t = trainer(est)
    t.fit(x, y, rounds=3)
    assert len(est.estimators_) == 3 and est.n_estimators == 3 and est.warm_start is False
    t.fit(x, y, rounds=2)
    assert len(est.estimators_) == 5
    t.fit(x, y, rounds=1, mode="restart")
    assert len(est.estimators_) == 1
    with pytest.raises(ValueError, match="validation_split is not available for "):
        t.fit(x, y, rounds=1, validation_split=0.2)  # a round fits on all rows at once
    t.fit(x, y, rounds=1, validation_data=(x[:50], y[:50]))
    assert set(t.history[-1]) >= {"val_loss", "val_accuracy"}


@pytest.mark.parametrize(
    "make", [lambda: SGDClassifier(random_state=None), lambda: MLPClassifier((8,))]
)
def test_e2_new_process_resume(tmp_path, make):
    """2 epochs, then a new process resumes from run_dir and trains 2 more == 4 straight."""
    est_src = {SGDClassifier: "SGDClassifier()", MLPClassifier: "MLPClassifier((8,))"}[type(make())]
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from sklearn.linear_model import SGDClassifier
        from sklearn.neural_network import MLPClassifier
        import warmfit
        rng = np.random.RandomState(0)
        x = rng.normal(size=(200, 6))
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
        t = warmfit.Trainer({est_src}, batch_size=16, seed=3, verbose=0, run_dir=sys.argv[1])
        t.fit(x, y, epochs=2)
        t.close()
        open(sys.argv[2], "wb").write(t.state_dict()["tensors"]["model/skops"].tobytes())
        """
    )
    (tmp_path / "job.py").write_text(script)
    run_dir = tmp_path / "run"
    for i in range(2):
        out = subprocess.run(
            [sys.executable, str(tmp_path / "job.py"), str(run_dir), str(tmp_path / f"{i}.skops")],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
    assert "warmfit: resumed from" in out.stdout
    x, y = make_data()
    straight = trainer(make())
    straight.fit(x, y, epochs=4)
    assert (tmp_path / "1.skops").read_bytes() == blob(straight)
    resumed = warmfit.Trainer(make(), batch_size=16, seed=3, verbose=0, run_dir=run_dir)
    assert resumed.epoch == 4
    assert_same_state(straight, resumed)
    resumed.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLPClassifier((8,), random_state=1),
        # random_state=None: its _random_state *is* NumPy's global generator; it must come
        # back as the global one (the trainer's stream), not as a frozen copy.
        lambda: MiniBatchKMeans(n_clusters=3, random_state=None, reassignment_ratio=0.5),
    ],
)
def test_checkpoint_round_trip_in_process(tmp_path, make):
    x, y = make_data()
    y = None if isinstance(make(), MiniBatchKMeans) else y
    t = trainer(make())
    t.fit(x, y, epochs=1)
    t.save(tmp_path / "ck")
    loaded = warmfit.Trainer.load(tmp_path / "ck", make(), batch_size=16, seed=3, verbose=0)
    t.fit(x, y, epochs=2)
    loaded.fit(x, y, epochs=2)
    assert_same_state(t, loaded)


class Untrusted(BaseEstimator):
    def fit(self, x, y=None):
        self.marker_ = 1
        return self


def test_untrusted_skops_types_are_refused_and_nothing_is_unpickled(monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    blob = dumps(Untrusted().fit(None))
    with pytest.raises(CheckpointError) as err:
        loads(blob)
    assert str(err.value) == (
        "model/skops: the estimator contains untrusted types ['test_sklearn_backend.Untrusted']; "
        "refusing to load them (they could run code). If you trust this checkpoint, add the "
        "type names to warmfit.backends.sklearn.TRUSTED_TYPES."
    )
    # Through a Trainer: the state is refused and the estimator is left untouched.
    x, y = make_data()
    t = trainer(MLPClassifier((8,), random_state=1))
    t.fit(x, y, epochs=1)
    sd = t.state_dict()
    before = dumps(t.model)
    sd["tensors"]["model/skops"] = np.frombuffer(blob, dtype=np.uint8)
    with pytest.raises(CheckpointError, match="untrusted types"):
        t.load_state_dict(sd)
    assert dumps(t.model) == before
    # A trusted estimator (with MLP's Adam optimizer, an explicitly listed type) loads
    # without pickle.
    restored = loads(before)
    assert np.array_equal(restored.coefs_[0], t.model.coefs_[0])


def test_canonical_dumps_are_deterministic():
    x, y = make_data()
    est = MLPClassifier((8,), random_state=0, max_iter=5).fit(x, y)
    twin = loads(dumps(est))
    assert dumps(est) == dumps(twin)


TREE_MODELS = {
    "DecisionTree": lambda: DecisionTreeClassifier(random_state=0),
    "RandomForest": lambda: RandomForestClassifier(n_estimators=4, random_state=0),
    "GradientBoosting": lambda: GradientBoostingClassifier(n_estimators=4, random_state=0),
    "ExtraTrees": lambda: ExtraTreesRegressor(n_estimators=4, random_state=0),
}


@pytest.mark.parametrize("name", sorted(TREE_MODELS))
def test_canonical_dumps_of_tree_ensembles(name):
    """Regression: sklearn's Tree node records have 7 uninitialised padding bytes (57
    bytes of fields in 64), which dumps copied, so a loaded tree dumped other bytes."""
    x, y = make_data()
    est = TREE_MODELS[name]().fit(x, y)
    blob = dumps(est)
    twin = loads(blob)
    assert dumps(twin) == blob
    assert dumps(TREE_MODELS[name]().fit(x, y)) == blob  # fitted apart: the same bytes
    assert np.array_equal(twin.predict(x), est.predict(x))


def test_canonical_dumps_of_boosting_grown_after_a_load():
    """Regression: trees grown after a load held another (equal) 'squared_error' string
    than the loaded ones; skops records which objects are one, so the schema differed."""
    x, y = make_data()
    straight = GradientBoostingRegressor(n_estimators=6, random_state=0, warm_start=True)
    straight.fit(x, y)
    split = GradientBoostingRegressor(n_estimators=3, random_state=0, warm_start=True)
    split = loads(dumps(split.fit(x, y)))
    split.set_params(n_estimators=6).fit(x, y)
    assert np.array_equal(split.predict(x), straight.predict(x))
    assert dumps(split) == dumps(straight)


def test_sub_estimators_holding_the_global_generator_resume_bit_for_bit(tmp_path):
    """Regression: GradientBoosting(random_state=None) gives each tree its ``_rng``, NumPy's
    global generator. It was dumped as a copy: the loaded trees held a frozen copy, the
    trees grown after the load the global one, so the bytes were not the straight run's."""
    x, y = make_data()

    def make():
        return GradientBoostingClassifier(subsample=0.7, max_features=2, max_depth=2)

    straight = trainer(make())
    straight.fit(x, y, rounds=4)
    first = trainer(make())
    first.fit(x, y, rounds=2)
    first.save(tmp_path / "ck")
    meta = first.state_dict()["state"]["backend"]
    assert meta["global_rng_attrs"] == ["_rng"]
    assert first.model.estimators_.shape == (2, 3)  # 2 rounds, 3 classes
    assert meta["global_rng_paths"] == [
        [["attr", "estimators_"], ["item", list(i)], ["attr", "random_state"]]
        for i in np.ndindex(2, 3)
    ]
    resumed = warmfit.Trainer.load(tmp_path / "ck", make(), batch_size=16, seed=3, verbose=0)
    assert all(t.random_state is np.random.mtrand._rand for t in resumed.model.estimators_.flat)
    resumed.fit(x, y, rounds=2)
    assert_same_state(straight, resumed)
    assert blob(straight) == blob(resumed)


def test_canonical_dumps_ignore_identity_of_immutables_keep_it_of_arrays():
    x, y = make_data()
    one, two = (SGDClassifier(random_state=0).fit(x, y) for _ in range(2))
    word, arr = "squared" + "_error", np.arange(3.0)
    one.a_, one.b_ = word, word  # one object
    two.a_, two.b_ = "".join(word), "_".join(word.split("_"))  # equal, two objects
    assert two.a_ is not two.b_
    assert dumps(one) == dumps(two)
    one.c_, one.d_ = arr, arr  # a mutable object shared stays shared
    back = loads(dumps(one))
    assert back.c_ is back.d_ and np.array_equal(back.c_, arr) and back.a_ == word


def test_canonical_dumps_zero_the_padding_of_structured_arrays():
    from warmfit.backends.sklearn import _zero_npy_padding

    dtype = np.dtype([("a", "i1"), ("b", "f8"), ("c", [("d", "i2"), ("e", "f4")])], align=True)
    assert dtype.itemsize == 24  # a, 7 padding, b, then c: d, 2 padding, e
    blobs = []
    for garbage in (0x00, 0xAB, 0xFF):
        arr = np.zeros(5, dtype=dtype)
        arr.view(np.uint8)[:] = garbage  # fields and padding alike
        arr["a"], arr["b"], arr["c"]["d"], arr["c"]["e"] = 1, np.nan, -2, 0.5
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        blobs.append(_zero_npy_padding(buf.getvalue()))
        back = np.load(io.BytesIO(blobs[-1]), allow_pickle=False)
        assert back.dtype == arr.dtype
        assert back["a"].tobytes() == arr["a"].tobytes()
        assert back["b"].tobytes() == arr["b"].tobytes()  # NaN's bits too
        assert back["c"]["d"].tobytes() == arr["c"]["d"].tobytes()
        assert back["c"]["e"].tobytes() == arr["c"]["e"].tobytes()
    assert blobs[0] == blobs[1] == blobs[2]  # the garbage left no trace
    plain = io.BytesIO()
    np.save(plain, np.arange(4.0))
    assert _zero_npy_padding(plain.getvalue()) == plain.getvalue()


def test_bad_arguments_and_guardrails():
    with pytest.raises(TypeError) as err:
        warmfit.Trainer(SGDClassifier(), optimizer=lambda p: p)
    assert str(err.value) == (
        "SGDClassifier is a scikit-learn estimator: it has its own optimizer and loss (set "
        "them through its parameters, e.g. SGDClassifier(learning_rate_init=...)). Do not pass "
        "'optimizer' to Trainer."
    )
    with pytest.raises(TypeError, match="LogisticRegression has no partial_fit"):
        warmfit.Trainer(LogisticRegression())
    x, y = make_data()
    t = trainer(SGDClassifier(random_state=0))
    t.fit(x, y, epochs=1)
    y_new = y.copy()
    y_new[0] = 7
    with pytest.raises(ValueError) as err:
        t.fit(x, y_new, epochs=1)
    assert str(err.value) == (
        "y has classes [7] that SGDClassifier was not trained with (its classes are [0, 1, 2]). "
        "partial_fit cannot add classes; fit with mode='restart' on data with every class."
    )
    with pytest.raises(ValueError) as err:
        t.fit(x[:, :4], y, epochs=1, mode="warm")
    assert str(err.value) == (
        "x has 4 features, but SGDClassifier was trained on 6. Pass data with the same "
        "features, or fit with mode='restart'."
    )
    t.fit(x[:, :4], y, epochs=1, mode="restart")  # a restart may change the features
    assert t.model.n_features_in_ == 4


def test_a_changed_estimator_parameter_says_which_value_is_kept(tmp_path):
    from sklearn.linear_model import SGDClassifier

    x, y = make_data(150)
    kw = dict(batch_size=16, seed=1, verbose=0, run_dir=tmp_path)
    with warmfit.Trainer(SGDClassifier(alpha=1e-4, random_state=0), **kw) as t:
        t.fit(x, y, epochs=2)
    with pytest.warns(UserWarning) as caught:
        resumed = warmfit.Trainer(SGDClassifier(alpha=0.5, random_state=0), **kw)
    assert str(caught[0].message) == (
        "resuming with different settings: params.alpha: checkpoint 0.0001, now 0.5. The "
        "estimator is restored whole from the checkpoint, its parameters included, so the "
        "checkpoint's values are kept; to train with a new value, call "
        "trainer.model.set_params(...) before fit (mode='warm' to record it as a change of "
        "course)."
    )
    with resumed:
        assert resumed.model.alpha == 1e-4
        resumed.model.set_params(alpha=0.5)  # what the message says
        resumed.fit(x, y, epochs=1, mode="warm")
        assert resumed.model.alpha == 0.5


def test_estimators_per_round_on_a_partial_fit_estimator_is_refused():
    with pytest.raises(ValueError) as err:
        warmfit.Trainer(SGDClassifier(), backend_options={"estimators_per_round": 3})
    assert str(err.value) == (
        "estimators_per_round=3 is for estimators that grow by rounds (forests, boosting, "
        "bagging); SGDClassifier trains with partial_fit, one call per batch. Remove "
        "estimators_per_round."
    )


def test_validation_split_on_a_round_estimator_is_refused_by_name():
    from sklearn.ensemble import RandomForestClassifier

    x = np.random.default_rng(0).normal(size=(40, 3))
    t = warmfit.Trainer(RandomForestClassifier(n_estimators=1), verbose=0)
    with pytest.raises(ValueError) as err:
        t.fit(x, (x[:, 0] > 0).astype(int), rounds=1, validation_split=0.25)
    assert str(err.value) == (
        "validation_split is not available for RandomForestClassifier: a round fits on the "
        "whole data at once. Pass validation_data=(x_val, y_val)."
    )
    assert len(t.ledger) == 0 and t.global_step == 0
