"""scikit-learn Pipelines under a Trainer: the transformers are fitted once per run (refit
by ``restart``, kept by ``continue`` and ``warm``), the final step trains on the rows they
give; split == straight and resume == straight bit for bit, the whole Pipeline in the
checkpoint through skops; every refusal with its message (``docs/sklearn.md``,
"Pipelines")."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import types
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import MiniBatchKMeans
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.kernel_approximation import RBFSampler
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC

import warmfit
from conftest import assert_same_state
from warmfit.backends.sklearn import dumps, loads
from warmfit.errors import CheckpointError, StateMismatchError
from warmfit.testing import Case, check_backend, restart_schedule_and_callbacks

INSTEAD = "use warmfit.EarlyStopping(...) with validation_data=(x_val, y_val) instead."
KEEP = (
    "Pass data they can transform (a OneHotEncoder(handle_unknown='ignore') for categories "
    "it has not seen), fit with mode='restart' to fit them again on this data, or build the "
    "Trainer with backend_options={'refit_transformers': 'new_data'}."
)


def make_data(n: int = 200, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three numeric columns and a categorical column of integer codes 0..3."""
    rng = np.random.RandomState(seed)
    num = rng.normal(loc=shift, size=(n, 3))
    cat = rng.randint(0, 4, size=n)
    y = (num[:, 0] - num[:, 1] + (cat == 2) > shift).astype(np.int64)
    return np.c_[num, cat], y


def prep() -> ColumnTransformer:
    return ColumnTransformer([("num", StandardScaler(), [0, 1, 2]), ("cat", OneHotEncoder(), [3])])


def sgd_pipeline(**sgd: Any) -> Pipeline:
    # random_state=None: SGD's shuffling draws from the Trainer's NumPy stream.
    return Pipeline([("prep", prep()), ("sgd", SGDClassifier(random_state=None, **sgd))])


def trainer(model: Any, **kwargs: Any) -> warmfit.Trainer:
    return warmfit.Trainer(model, batch_size=16, seed=3, verbose=0, **kwargs)


def blob(t: warmfit.Trainer) -> bytes:
    """The whole Pipeline as stored in a checkpoint (canonical skops bytes)."""
    return t.state_dict()["tensors"]["model/skops"].tobytes()


def scaler(t: warmfit.Trainer) -> StandardScaler:
    return t.model.named_steps["prep"].named_transformers_["num"]


def fitted_mean(x: np.ndarray) -> np.ndarray:
    """The mean_ a StandardScaler fitted on the numeric columns of ``x`` has."""
    return StandardScaler().fit(x[:, [0, 1, 2]]).mean_  # the copy ColumnTransformer makes


def snapshot(t: warmfit.Trainer) -> tuple:
    """What a refused call must leave as it was: counters, ledger, history, the Pipeline."""
    sd = t.state_dict()
    return sd["state"]["counters"], len(t.ledger), len(t.history), blob(t)


def refused(t: warmfit.Trainer, x: Any, y: Any, error: type = ValueError, **fit_kwargs) -> str:
    """Fit, expecting a refusal that changes nothing; return its message."""
    before = snapshot(t)
    with pytest.raises(error) as err:
        t.fit(x, y, **fit_kwargs)
    assert snapshot(t) == before
    return str(err.value)


# -- split == straight, and what the final step trains on ----------------------------------
def test_split_equals_straight_scaler_one_hot_sgd():
    """fit(epochs=2) + fit(epochs=3) == fit(epochs=5): the fitted transformers, the final
    step's coefficients and counters, the predictions, the whole state, bit for bit."""
    x, y = make_data()
    straight = trainer(sgd_pipeline())
    straight.fit(x, y, epochs=5)
    split = trainer(sgd_pipeline())
    split.fit(x, y, epochs=2)
    split.fit(x, y, epochs=3)
    assert np.array_equal(split.model[-1].coef_, straight.model[-1].coef_)
    assert split.model[-1].t_ == straight.model[-1].t_ == 1 + 5 * 200
    assert np.array_equal(split.predict(x), straight.predict(x))
    assert blob(split) == blob(straight)
    assert_same_state(straight, split)
    # The transformers were fitted once, on the training rows.
    assert np.array_equal(scaler(split).mean_, fitted_mean(x))
    assert scaler(split).n_samples_seen_ == 200


def test_the_final_step_trains_on_the_transformed_rows_and_predict_goes_through_all():
    """The Pipeline's final step is exactly the bare estimator trained on the rows the
    fitted transformers give; predict and evaluate go through the whole Pipeline."""
    x, y = make_data()
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=3)
    rows = prep().fit(x, y).transform(x)
    bare = trainer(SGDClassifier(random_state=None))
    bare.fit(rows, y, epochs=3)
    assert np.array_equal(t.model[-1].coef_, bare.model.coef_)
    assert np.array_equal(t.model[-1].intercept_, bare.model.intercept_)
    x_new, y_new = make_data(50, seed=1)
    assert np.array_equal(t.predict(x_new), bare.model.predict(t.model[0].transform(x_new)))
    assert t.evaluate(x_new, y_new)["accuracy"] == float(
        np.mean(bare.predict(t.model[0].transform(x_new)) == y_new)
    )


def test_validation_goes_through_the_pipeline_and_never_perturbs_training():
    x, y = make_data()
    xv, yv = make_data(60, seed=9)
    plain = trainer(sgd_pipeline())
    plain.fit(x, y, epochs=3)
    validated = trainer(sgd_pipeline())
    validated.fit(x, y, epochs=1, validation_data=(xv, yv))
    validated.fit(x, y, epochs=2, validation_data=(xv, yv))
    assert blob(validated) == blob(plain)
    assert validated.history[-1]["val_accuracy"] == float(np.mean(plain.predict(xv) == yv))


def test_caller_stream_untouched_and_transformers_with_random_state_none_follow_the_seed():
    """A transformer with random_state=None (RBFSampler draws its weights from NumPy's
    global generator) is fitted under a stream derived from the seed: the same weights in
    every run of that seed and after a restart, other weights for another seed; the
    caller's global stream is not drawn from."""

    def make() -> Pipeline:
        return Pipeline(
            [
                ("scale", StandardScaler()),
                ("rbf", RBFSampler(n_components=20, random_state=None)),
                ("sgd", SGDClassifier(random_state=None)),
            ]
        )

    x, y = make_data()
    x = x[:, :3]
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    straight = trainer(make())
    straight.fit(x, y, epochs=3)
    assert np.array_equal(np.random.get_state()[1], before)
    split = trainer(make())
    split.fit(x, y, epochs=1)
    split.fit(x, y, epochs=2)
    assert blob(split) == blob(straight)
    weights = straight.model.named_steps["rbf"].random_weights_
    split.fit(x, y, epochs=3, mode="restart")
    assert np.array_equal(split.model.named_steps["rbf"].random_weights_, weights)
    assert_same_state(straight, split, differ=("counters.run",))
    other = warmfit.Trainer(make(), batch_size=16, seed=4, verbose=0)
    other.fit(x, y, epochs=1)
    assert not np.array_equal(other.model.named_steps["rbf"].random_weights_, weights)


# -- checkpoints ---------------------------------------------------------------------------
def test_save_and_load_in_a_fresh_trainer_equals_straight(tmp_path):
    x, y = make_data()
    straight = trainer(sgd_pipeline())
    straight.fit(x, y, epochs=5)
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=2)
    t.save(tmp_path / "ck")
    pipe = sgd_pipeline()
    final = pipe[-1]
    loaded = warmfit.Trainer.load(tmp_path / "ck", pipe, batch_size=16, seed=3, verbose=0)
    assert loaded.model is pipe and loaded.model[-1] is final  # loaded in place
    assert np.array_equal(scaler(loaded).mean_, scaler(t).mean_)
    loaded.fit(x, y, epochs=3)
    assert blob(loaded) == blob(straight)
    assert_same_state(straight, loaded)


def test_resume_in_a_new_process_equals_straight(tmp_path):
    """2 epochs in one process, 3 more in another that resumes from run_dir == 5 straight."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from sklearn.compose import ColumnTransformer
        from sklearn.linear_model import SGDClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler
        import warmfit

        rng = np.random.RandomState(0)
        num = rng.normal(loc=0.0, size=(200, 3))
        cat = rng.randint(0, 4, size=200)
        y = (num[:, 0] - num[:, 1] + (cat == 2) > 0.0).astype(np.int64)
        x = np.c_[num, cat]
        prep = ColumnTransformer(
            [("num", StandardScaler(), [0, 1, 2]), ("cat", OneHotEncoder(), [3])]
        )
        pipe = Pipeline([("prep", prep), ("sgd", SGDClassifier(random_state=None))])
        t = warmfit.Trainer(pipe, batch_size=16, seed=3, verbose=0, run_dir=sys.argv[1])
        t.fit(x, y, until_epoch=int(sys.argv[2]))
        t.close()
        open(sys.argv[3], "wb").write(t.state_dict()["tensors"]["model/skops"].tobytes())
        """
    )
    (tmp_path / "job.py").write_text(script)
    run_dir = tmp_path / "run"
    for until in (2, 5):
        out = subprocess.run(
            [sys.executable, str(tmp_path / "job.py"), str(run_dir), str(until),
             str(tmp_path / f"{until}.skops")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    assert "warmfit: resumed from" in out.stdout
    x, y = make_data()
    straight = trainer(sgd_pipeline())
    straight.fit(x, y, epochs=5)
    assert (tmp_path / "5.skops").read_bytes() == blob(straight)
    resumed = trainer(sgd_pipeline(), run_dir=run_dir)
    assert resumed.epoch == 5
    assert_same_state(straight, resumed)
    resumed.close()


def test_the_pipeline_loads_without_pickle_and_untrusted_steps_are_refused(monkeypatch):
    """ColumnTransformer, OneHotEncoder, StandardScaler and SGDClassifier are trusted by
    skops: the checkpoint loads with pickle switched off. A Pipeline holding a type that
    is not trusted is refused, and the Trainer's Pipeline is left as it was."""

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle was used")

    x, y = make_data()
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=1)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    restored = loads(blob(t))
    assert np.array_equal(restored.predict(x), t.predict(x))
    fresh = trainer(sgd_pipeline())
    fresh.load_state_dict(t.state_dict())
    assert blob(fresh) == blob(t)

    hostile = Pipeline([("mark", Marker()), ("sgd", SGDClassifier())]).fit(x, y)
    with pytest.raises(CheckpointError) as err:
        loads(dumps(hostile))
    assert str(err.value) == (
        "model/skops: the estimator contains untrusted types ['test_sklearn_pipeline.Marker']; "
        "refusing to load them (they could run code). If you trust this checkpoint, add the "
        "type names to warmfit.backends.sklearn.TRUSTED_TYPES."
    )
    sd = t.state_dict()
    sd["tensors"]["model/skops"] = np.frombuffer(dumps(hostile), dtype=np.uint8)
    before = blob(t)
    with pytest.raises(CheckpointError, match="untrusted types"):
        t.load_state_dict(sd)
    assert blob(t) == before


class Marker(TransformerMixin, BaseEstimator):
    def fit(self, x, y=None):
        self.marker_ = 1
        return self

    def transform(self, x):
        return x


def test_a_checkpoint_of_other_steps_is_refused(tmp_path):
    x, y = make_data()
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=1)
    t.save(tmp_path / "ck")
    other = Pipeline([("scale", StandardScaler()), ("sgd", SGDClassifier())])
    with pytest.raises(StateMismatchError) as err:
        warmfit.Trainer.load(tmp_path / "ck", other, batch_size=16, seed=3, verbose=0)
    assert str(err.value) == (
        "the checkpoint's Pipeline has the steps [['prep', "
        "'sklearn.compose._column_transformer.ColumnTransformer'], ['sgd', "
        "'sklearn.linear_model._stochastic_gradient.SGDClassifier']], this Trainer's has "
        "[['scale', 'sklearn.preprocessing._data.StandardScaler'], ['sgd', "
        "'sklearn.linear_model._stochastic_gradient.SGDClassifier']]. Pass a Pipeline with "
        "the steps of the run that wrote the checkpoint."
    )


def test_a_damaged_record_of_the_transformers_data_is_refused():
    x, y = make_data()
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=1)
    sd = t.state_dict()
    assert len(sd["tensors"]["model/transformers_data"]) == 24  # the data's fingerprint
    sd["tensors"]["model/transformers_data"] = np.frombuffer(b"not hex!", dtype=np.uint8)
    fresh = trainer(sgd_pipeline())
    with pytest.raises(StateMismatchError) as err:
        fresh.load_state_dict(sd)
    assert str(err.value) == (
        "the checkpoint's 'model/transformers_data' is b'not hex!', not a data fingerprint "
        "(hexadecimal digits): the file is damaged. Resume from another checkpoint."
    )
    assert not hasattr(fresh.model[-1], "coef_")  # left as it was


# -- the modes -----------------------------------------------------------------------------
def test_continue_keeps_the_transformers_on_other_data_restart_refits_them():
    """continue on other data keeps the transformers fitted on the first data (the scaler's
    mean_ does not move, the final step goes on); restart on that data fits them again on
    it, and the run equals a fresh Trainer's on it."""
    x, y = make_data()
    x2, y2 = make_data(seed=1, shift=2.0)
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=2)
    mean = scaler(t).mean_.copy()
    with pytest.warns(UserWarning, match="data changed"):
        t.fit(x2, y2, epochs=1)  # continue
    assert np.array_equal(scaler(t).mean_, mean)
    assert t.model[-1].t_ == 1 + 3 * 200  # the final step went on
    t.fit(x2, y2, epochs=2, mode="restart")
    assert np.array_equal(scaler(t).mean_, fitted_mean(x2))
    assert not np.array_equal(scaler(t).mean_, mean)
    fresh = trainer(sgd_pipeline())
    fresh.fit(x2, y2, epochs=2)
    assert blob(t) == blob(fresh)
    assert_same_state(fresh, t, differ=("counters.run",))


def test_warm_keeps_the_transformers_and_resets_the_final_steps_optimizer():
    """warm: the transformers as they were (fitted on the first data, also with other data
    now); SGD's t_ back to 1 as for the bare estimator; the rest continues."""
    x, y = make_data()
    x2, y2 = make_data(seed=1, shift=2.0)
    t = trainer(sgd_pipeline(learning_rate="invscaling", eta0=0.05))
    t.fit(x, y, epochs=2)
    prep_before = dumps(t.model.named_steps["prep"])
    coef = t.model[-1].coef_.copy()
    t.fit(x2, y2, epochs=1, mode="warm", new_data=True)
    assert dumps(t.model.named_steps["prep"]) == prep_before
    assert t.model[-1].t_ == 1 + 200
    assert not np.array_equal(t.model[-1].coef_, coef)
    # By hand: the bare estimator on the rows the kept transformers give, warm from the
    # same coefficients, trains to the same bits.
    rows, rows2 = t.model[0].transform(x), t.model[0].transform(x2)
    bare = trainer(SGDClassifier(random_state=None, learning_rate="invscaling", eta0=0.05))
    bare.fit(rows, y, epochs=2)
    bare.fit(rows2, y2, epochs=1, mode="warm", new_data=True)
    assert np.array_equal(t.model[-1].coef_, bare.model.coef_)
    assert dumps(t.model[-1]) == dumps(bare.model)


def test_mlp_final_step_split_and_resume_equal_straight_and_warm_rebuilds_adam(tmp_path):
    """MLPClassifier(random_state=None) last: its _random_state *is* NumPy's global
    generator (the Trainer's stream), found inside the Pipeline's steps and restored as
    the global one on load, not as a frozen copy."""

    def make() -> Pipeline:
        return Pipeline([("prep", prep()), ("mlp", MLPClassifier((8,), random_state=None))])

    x, y = make_data()
    straight = trainer(make())
    straight.fit(x, y, epochs=3)
    split = trainer(make())
    split.fit(x, y, epochs=1)
    split.save(tmp_path / "ck")
    split.fit(x, y, epochs=2)
    assert blob(split) == blob(straight)
    loaded = warmfit.Trainer.load(tmp_path / "ck", make(), batch_size=16, seed=3, verbose=0)
    assert loaded.model[-1]._random_state is np.random.mtrand._rand
    loaded.fit(x, y, epochs=2)
    assert_same_state(straight, loaded)
    adam = split.model[-1]._optimizer
    split.fit(x, y, epochs=1, mode="warm")
    assert split.model[-1]._optimizer is not adam
    assert split.model[-1]._optimizer.t == 13  # one epoch of 13 batches with a fresh Adam


def test_refit_transformers_new_data_refits_on_other_data_only():
    """backend_options={'refit_transformers': 'new_data'}: a call whose training rows are
    not those the transformers were fitted on fits them again (the final step goes on);
    the same data again keeps them; a refit that would change the final step's features
    is refused before anything changes."""
    x, y = make_data()
    x2, y2 = make_data(seed=1, shift=2.0)
    opts = {"backend_options": {"refit_transformers": "new_data"}}
    t = trainer(sgd_pipeline(), **opts)
    t.fit(x, y, epochs=2)
    t.fit(x2, y2, epochs=1, new_data=True)
    assert np.array_equal(scaler(t).mean_, fitted_mean(x2))
    assert t.model[-1].t_ == 1 + 3 * 200
    refit = dumps(t.model[0])
    t.fit(x2, y2, epochs=1)
    assert dumps(t.model[0]) == refit  # the same rows: kept
    # Straight and split still agree with the option on (the data never changes).
    a, b = trainer(sgd_pipeline(), **opts), trainer(sgd_pipeline(), **opts)
    a.fit(x, y, epochs=3)
    b.fit(x, y, epochs=1)
    b.fit(x, y, epochs=2)
    assert blob(a) == blob(b)
    # Two categories only: the one-hot part would shrink from 4 columns to 2.
    few = x2[:, 3] < 2
    assert refused(t, x2[few], y2[few], epochs=1, new_data=True) == (
        "The Pipeline's transformers, fitted again on this call's data "
        "(refit_transformers='new_data'), turn x into 5 features, but the Pipeline's final "
        "step 'sgd' (SGDClassifier) was trained on 7. Make the transformers give the same "
        "features (e.g. OneHotEncoder(categories=[...]) listing every category), or fit with "
        "mode='restart'."
    )


def test_restart_keeps_the_users_step_objects():
    x, y = make_data()
    pipe = sgd_pipeline()
    final, first = pipe[-1], pipe[0]
    t = trainer(pipe)
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=1, mode="restart")
    assert t.model is pipe and pipe[-1] is final and pipe[0] is first
    assert final.t_ == 1 + 200 and np.array_equal(scaler(t).mean_, fitted_mean(x))


# -- rounds and other final steps ----------------------------------------------------------
@pytest.mark.parametrize(
    "final",
    [
        lambda: HistGradientBoostingClassifier(max_depth=3, early_stopping=False),
        lambda: RandomForestClassifier(max_depth=4, random_state=None),
    ],
    ids=["HistGradientBoosting", "RandomForest"],
)
def test_round_estimator_last_split_equals_straight(final):
    x, y = make_data()

    def make() -> Pipeline:
        return Pipeline([("prep", prep()), ("model", final())])

    straight = trainer(make())
    straight.fit(x, y, rounds=5)
    split = trainer(make())
    split.fit(x, y, rounds=2)
    split.fit(x, y, rounds=3)
    assert blob(split) == blob(straight)
    assert np.array_equal(split.predict(x), straight.predict(x))
    assert_same_state(straight, split)
    assert scaler(split).n_samples_seen_ == 200
    assert refused(split, x, y, rounds=1, mode="warm") == (
        f"mode='warm' is not supported for the Pipeline's final step 'model' "
        f"({type(final()).__name__}): it grows by rounds and has no optimizer state to "
        "reset. Supported modes: ('continue', 'restart')."
    )


def test_hist_gradient_boosting_last_is_a_plain_fit_on_the_transformed_rows():
    x, y = make_data()
    hgb = HistGradientBoostingClassifier(random_state=0)
    t = trainer(Pipeline([("prep", prep()), ("hgb", hgb)]))
    t.fit(x, y, rounds=4)
    rows = prep().fit(x, y).transform(x)
    plain = HistGradientBoostingClassifier(max_iter=4, random_state=0).fit(rows, y)
    assert dumps(t.model[-1]) == dumps(plain)


def test_an_unsupervised_final_step_is_scored_on_the_rows_it_sees():
    x, _ = make_data()

    def make() -> Pipeline:
        km = MiniBatchKMeans(n_clusters=3, random_state=None, n_init=1)
        return Pipeline([("prep", prep()), ("km", km)])

    straight = trainer(make())
    straight.fit(x, None, epochs=3)
    split = trainer(make())
    split.fit(x, None, epochs=1)
    split.fit(x, None, epochs=2)
    assert blob(split) == blob(straight)
    rows = straight.model[0].transform(x)
    assert straight.evaluate(x)["loss"] == float(-straight.model[-1].score(rows) / len(x))


# -- refusals, each before anything changes ------------------------------------------------
def test_the_final_steps_own_early_stopping_is_refused_naming_the_step():
    x, y = make_data()
    t = trainer(sgd_pipeline(early_stopping=True))
    assert refused(t, x, y, epochs=1) == (
        "SGDClassifier(early_stopping=True), the final step 'sgd' of the Pipeline, stops "
        "early only in fit; warmfit trains SGDClassifier with partial_fit (one call per "
        "batch), where scikit-learn never stops early (it refuses early_stopping=True on the "
        "first call and on later calls only holds validation_fraction of each batch out of "
        f"training). Set sgd__early_stopping=False and {INSTEAD}"
    )
    assert len(t.ledger) == 0 and not hasattr(scaler_or_none(t), "mean_")
    t.model.set_params(sgd__early_stopping=False)  # what the message says
    t.fit(x, y, epochs=1)

    hgb = trainer(Pipeline([("prep", prep()), ("hgb", HistGradientBoostingClassifier(
        early_stopping=True))]))  # fmt: skip
    assert refused(hgb, x, y, rounds=1) == (
        "HistGradientBoostingClassifier(early_stopping=True), the final step 'hgb' of the "
        "Pipeline, stops early: it stops adding iterations once its score stops improving, "
        "but warmfit grows it round by round (each round a warm-start fit with max_iter "
        "raised by estimators_per_round), and a stop inside one round does not stop the "
        f"next: training would silently go on. Set hgb__early_stopping=False and {INSTEAD}"
    )
    mlp = trainer(Pipeline([("prep", prep()), ("mlp", MLPClassifier(
        solver="sgd", learning_rate="adaptive"))]))  # fmt: skip
    assert refused(mlp, x, y, epochs=1) == (
        "MLPClassifier(solver='sgd', learning_rate='adaptive'), the final step 'mlp' of the "
        "Pipeline, divides its step size by 5 whenever its training loss stops improving by "
        "tol over n_iter_no_change epochs, a rule of fit; warmfit trains MLPClassifier with "
        "partial_fit (one call per batch), where the rule would count batches and compare "
        "batch losses instead: silently another rule. Set mlp__learning_rate='constant' and "
        "use warmfit.ReduceLROnPlateau(factor=0.2, ...) with validation_data=(x_val, y_val) "
        "instead."
    )


def scaler_or_none(t: warmfit.Trainer) -> Any:
    return getattr(t.model.named_steps["prep"], "named_transformers_", {}).get("num")


def test_data_the_kept_transformers_cannot_take_is_refused():
    x, y = make_data()
    t = trainer(sgd_pipeline())
    t.fit(x, y, epochs=1)
    unseen = x.copy()
    unseen[0, 3] = 7  # a category the OneHotEncoder has not seen
    assert refused(t, unseen, y, epochs=1, new_data=True) == (
        "The Pipeline's transformers (fitted at the start of the run) cannot transform this "
        "call's training data: step 'prep' (ColumnTransformer) raised ValueError: Found "
        f"unknown categories [np.float64(7.0)] in column 0 during transform. {KEEP}"
    )
    xv = unseen[:20]
    assert refused(t, x, y, epochs=1, validation_data=(xv, y[:20])).startswith(
        "The Pipeline's transformers (fitted at the start of the run) cannot transform the "
        "validation data: step 'prep' (ColumnTransformer) raised ValueError"
    )
    assert refused(t, x[:, :3], y, epochs=1, new_data=True) == (
        "x has 3 features, but the Pipeline's transformers were fitted on 4. Pass data with "
        "the same features, or fit with mode='restart'."
    )
    assert refused(t, x, np.where(y == 1, 2, y), epochs=1) == (
        "y has classes [2] that the Pipeline's final step 'sgd' (SGDClassifier) was not "
        "trained with (its classes are [0, 1]). partial_fit cannot add classes; fit with "
        "mode='restart' on data with every class."
    )
    # A restart may take them: the transformers are fitted again on this data.
    t.fit(unseen, y, epochs=1, mode="restart")
    assert t.model[0].named_transformers_["cat"].categories_[0].tolist() == [0, 1, 2, 3, 7]


def test_a_transformer_that_cannot_be_fitted_is_refused_before_anything_changes():
    x, y = make_data()
    x = x.copy()
    x[0, 0] = np.inf
    t = trainer(sgd_pipeline())
    message = refused(t, x, y, epochs=1)
    assert message.startswith(
        "Fitting the Pipeline's transformers on the training data failed at step 'prep' "
        "(ColumnTransformer): ValueError: Input X contains infinity"
    )
    assert message.endswith("Fix the data or the step's parameters (nothing has changed).")
    assert len(t.ledger) == 0 and scaler_or_none(t) is None


def test_pipelines_warmfit_cannot_train_are_refused_at_construction():
    with pytest.raises(TypeError) as err:
        trainer(Pipeline([("scale", StandardScaler()), ("svc", SVC())]))
    assert str(err.value) == (
        "The Pipeline's final step 'svc' (SVC) has no partial_fit and does not grow with "
        "warm_start, so warmfit cannot give its fit calls a continue/warm/restart meaning. "
        "Supported: estimators with partial_fit (SGDClassifier, MLPClassifier, GaussianNB, "
        "MiniBatchKMeans, IncrementalPCA, ...) and RandomForest/ExtraTrees, "
        "GradientBoosting, HistGradientBoosting and Bagging estimators."
    )
    with pytest.raises(TypeError) as err:
        trainer(Pipeline([("scale", StandardScaler()), ("last", "passthrough")]))
    assert str(err.value) == (
        "The final step 'last' of the Pipeline is 'passthrough': warmfit trains a Pipeline's "
        "final step, so it must be an estimator with partial_fit (SGDClassifier, "
        "MLPClassifier, ...) or one that grows with warm_start (RandomForest, "
        "HistGradientBoosting, ...). Put one last."
    )
    with pytest.raises(TypeError) as err:
        trainer(Pipeline([("sgd1", SGDClassifier()), ("sgd2", SGDClassifier())]))
    assert str(err.value) == (
        "The step 'sgd1' of the Pipeline (SGDClassifier) has no fit and transform: every "
        "step but the last must be a transformer, or 'passthrough'. Move it last, or "
        "remove it."
    )
    with pytest.raises(ValueError) as err:
        trainer(sgd_pipeline(), backend_options={"refit_transformers": "always"})
    assert str(err.value) == (
        "The 'refit_transformers' parameter of SklearnBackend must be one of {'restart', "
        "'new_data'}. Got 'always' instead."
    )
    with pytest.raises(ValueError) as err:
        trainer(SGDClassifier(), backend_options={"refit_transformers": "new_data"})
    assert str(err.value) == (
        "The 'refit_transformers' parameter of SklearnBackend is for a Pipeline's "
        "transformers; SGDClassifier is not a Pipeline. Remove it."
    )


def test_dataframes_and_non_numeric_arrays_are_refused(monkeypatch):
    """pandas is not a dependency: a stand-in module shows the refusal of a DataFrame."""
    fake = types.ModuleType("pandas")

    class DataFrame:
        pass

    class Series:
        pass

    fake.DataFrame, fake.Series = DataFrame, Series  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pandas", fake)
    x, y = make_data()
    t = trainer(sgd_pipeline())
    expected = (
        "x is a pandas DataFrame: warmfit trains a Pipeline on NumPy arrays (it hashes, "
        "orders and cuts the rows as arrays, and the transformers are fitted on them). Pass "
        "x.to_numpy() (string categories encoded as integer codes first) and name the "
        "ColumnTransformer's columns by position (e.g. [0, 1, 2]), not by name."
    )
    assert refused(t, DataFrame(), y, error=TypeError, epochs=1) == expected
    t.fit(x, y, epochs=1)
    with pytest.raises(TypeError) as err:
        t.predict(DataFrame())
    assert str(err.value) == expected
    assert refused(t, x.astype(object), y, error=TypeError, epochs=1) == (
        "x must be numeric for Pipeline. Got dtype object. Encode string categories as "
        "integer codes (np.unique(column, return_inverse=True)) and let a OneHotEncoder "
        "inside the Pipeline one-hot them."
    )


def test_a_changed_step_parameter_is_named_on_resume(tmp_path):
    x, y = make_data()
    kw = dict(batch_size=16, seed=3, verbose=0, run_dir=tmp_path)
    with warmfit.Trainer(sgd_pipeline(alpha=1e-4), **kw) as t:
        t.fit(x, y, epochs=2)
    with pytest.warns(UserWarning) as caught:
        resumed = warmfit.Trainer(sgd_pipeline(alpha=0.5), **kw)
    assert str(caught[0].message).startswith(
        "resuming with different settings: params.sgd__alpha: checkpoint 0.0001, now 0.5."
    )
    with resumed:
        assert resumed.model[-1].alpha == 1e-4  # the checkpoint's Pipeline, whole
    # A schedule writes the final step's eta0: no difference on resume.
    with warmfit.Trainer(
        sgd_pipeline(learning_rate="constant", eta0=0.1),
        schedule=warmfit.schedules.step_decay(0.1, step_size=5, gamma=0.5),
        **dict(kw, run_dir=tmp_path / "b"),
    ) as t:
        t.fit(x, y, epochs=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warmfit.Trainer(
            sgd_pipeline(learning_rate="constant", eta0=0.1),
            schedule=warmfit.schedules.step_decay(0.1, step_size=5, gamma=0.5),
            **dict(kw, run_dir=tmp_path / "b"),
        ).close()


# -- the conformance suite on Pipelines ----------------------------------------------------
def pipeline_warm_state(trained: dict, never_trained: dict) -> dict:
    """The state a warm call starts from, by hand (docs/sklearn.md): the Pipeline as
    trained, its transformers untouched, its final SGD step's t_ back to 1 and eta0 back
    to the constructor's; the schedule and callbacks as for every backend."""
    pipe = loads(trained["tensors"]["model/skops"].tobytes())
    fresh = loads(never_trained["tensors"]["model/skops"].tobytes())
    pipe[-1].t_, pipe[-1].eta0 = 1.0, fresh[-1].eta0
    tensors = {**trained["tensors"], "model/skops": np.frombuffer(dumps(pipe), np.uint8)}
    return restart_schedule_and_callbacks({"tensors": tensors, "state": trained["state"]},
                                          never_trained)  # fmt: skip


def _data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


def _validation() -> dict[str, Any]:
    return {"validation_data": make_data(60, seed=9)}


def _sgd_build() -> tuple[Any, dict]:
    schedule = warmfit.schedules.step_decay(0.05, step_size=10, gamma=0.5)
    pipe = sgd_pipeline(learning_rate="constant", eta0=0.05)
    return pipe, dict(batch_size=16, seed=7, verbose=0, schedule=schedule)


def _forest_build() -> tuple[Any, dict]:
    pipe = Pipeline([("prep", prep()), ("rf", RandomForestClassifier(max_depth=4))])
    return pipe, dict(batch_size=16, seed=7, verbose=0,
                      backend_options={"estimators_per_round": 2})  # fmt: skip


CASES = [
    Case("pipeline-SGD", _sgd_build, _data, fit_kwargs=_validation, steps_per_epoch=13,
         warm_state=pipeline_warm_state),
    Case("pipeline-RandomForest-rounds", _forest_build, _data, fit_kwargs=_validation,
         unit="rounds", steps_per_epoch=1, modes=("continue", "restart")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conformance_suite(case, tmp_path):
    """warmfit.testing's every check (split, save/load, steps, interrupt and the same call
    again, rewind, restart, warm, seed) on a Pipeline."""
    check_backend(case, tmp_path)
