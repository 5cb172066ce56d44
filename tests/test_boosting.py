"""XGBoost and LightGBM under the contract, with the real libraries: rounds add up bit
for bit (the booster's saved bytes, and predictions with ``np.array_equal``) with row
and column subsampling and bagging on, across split calls, checkpoints and processes;
the conformance suite on each; the modes; each refusal with its message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import warmfit
from conftest import require
from warmfit import schedules
from warmfit.testing import CHECKS, Case, assert_same_state, check_backend

xgb = require("xgboost", reason="xgboost is not installed (extra warmfit[xgboost])")
lgb = require("lightgbm", reason="lightgbm is not installed (extra warmfit[lightgbm])")

WORKER = Path(__file__).resolve().parent / "_boosting_worker.py"


@cache
def data(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, binary labels, a regression target)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(size=n) > 0).astype(np.int64)
    return x, y, 2 * x[:, 0] + x[:, 1] ** 2 + rng.normal(size=n) * 0.1


def three_classes() -> tuple[np.ndarray, np.ndarray]:
    x, _, t = data()
    return x, np.digitize(t, np.quantile(t, [1 / 3, 2 / 3]))


# Every random option of each library on: row and column subsampling, bagging.
MODELS: dict[str, Callable[[], Any]] = {
    "XGBClassifier": lambda: xgb.XGBClassifier(
        subsample=0.7, colsample_bytree=0.7, colsample_bylevel=0.8, colsample_bynode=0.9,
        max_depth=3, n_jobs=1,
    ),
    "LGBMClassifier": lambda: lgb.LGBMClassifier(
        subsample=0.7, subsample_freq=1, colsample_bytree=0.7, feature_fraction_bynode=0.8,
        extra_trees=True, num_leaves=7, n_jobs=1,
    ),
    "XGBoost-native-regression": lambda: warmfit.boosting.XGBoost(
        {"objective": "reg:squarederror", "subsample": 0.7, "colsample_bytree": 0.6,
         "max_depth": 3, "nthread": 1}
    ),
    "LightGBM-native-regression": lambda: warmfit.boosting.LightGBM(
        {"objective": "regression", "bagging_fraction": 0.7, "bagging_freq": 2,
         "feature_fraction": 0.7, "num_leaves": 7, "num_threads": 1}
    ),
}  # fmt: skip


def target(name: str) -> np.ndarray:
    _, y, t = data()
    return t if "regression" in name else y


def schedule() -> Any:
    return schedules.warmup(2, schedules.cosine(0.3, horizon=10, min_lr=0.02), start_factor=0.2)


def trainer(name: str, **kwargs: Any) -> warmfit.Trainer:
    settings = dict(schedule=schedule(), seed=5, verbose=0)
    return warmfit.Trainer(MODELS[name](), **{**settings, **kwargs})


def fit(t: warmfit.Trainer, name: str, rounds: int, **kwargs: Any) -> None:
    x, _, _ = data()
    t.fit(x, target(name), rounds=rounds, validation_data=(x[:150], target(name)[:150]), **kwargs)


def booster_bytes(t: warmfit.Trainer) -> bytes:
    return t.state_dict()["tensors"]["model/booster"].tobytes()


# -- rounds add up --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_four_then_six_rounds_equal_ten_with_sampling_on(name, tmp_path):
    straight = trainer(name)
    fit(straight, name, 10)
    split = trainer(name)
    fit(split, name, 4)
    fit(split, name, 6)
    assert booster_bytes(split) == booster_bytes(straight)
    assert_same_state(straight, split)
    x = data()[0]
    assert np.array_equal(split.predict(x), straight.predict(x))
    # through the checkpoint: a fresh Trainer (a fresh booster from the bytes) goes on the same
    cut = trainer(name)
    fit(cut, name, 3)
    cut.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(tmp_path / "ck", MODELS[name](), schedule=schedule(),
                                   seed=5, verbose=0)  # fmt: skip
    fit(resumed, name, 7)
    assert_same_state(straight, resumed)
    assert np.array_equal(resumed.predict(x), straight.predict(x))


def test_without_sampling_xgboost_skips_the_reseeding_and_grows_the_trees_of_its_own_train():
    """No row or column subsampling: no round draws random numbers, so warmfit skips
    rebuilding the samplers; 4 + 6 rounds predict as 10, and as xgb.train's 10."""
    x, _, target = data()
    params = {"objective": "reg:squarederror", "eta": 0.3, "max_depth": 3, "nthread": 1}
    split = warmfit.Trainer(warmfit.boosting.XGBoost(dict(params)), seed=5, verbose=0)
    split.fit(x, target, rounds=4)
    split.fit(x, target, rounds=6)
    assert split.backend.engine.samples is False
    own = xgb.train(params, xgb.DMatrix(x, label=target), 10)
    assert np.array_equal(split.predict(x), own.inplace_predict(x))


@pytest.mark.parametrize("name", ["XGBClassifier", "LGBMClassifier"])
def test_without_warmfit_the_libraries_own_continuation_is_not_exact(name):
    """The gap warmfit closes, measured on the same data: the library's own
    continuation (``xgb_model=`` / ``init_model=``) after 4 rounds does not give the
    trees of 10 rounds in one call once subsampling is on."""
    x, y, _ = data()
    if name == "XGBClassifier":
        params = {"objective": "binary:logistic", "subsample": 0.7, "colsample_bytree": 0.7,
                  "nthread": 1, "seed": 3}  # fmt: skip
        d = xgb.DMatrix(x, label=y)
        straight = xgb.train(params, d, 10)
        split = xgb.train(params, d, 6, xgb_model=xgb.train(params, d, 4))
        a, b = straight.predict(d), split.predict(d)
    else:
        params = {"objective": "binary", "bagging_fraction": 0.7, "bagging_freq": 1,
                  "feature_fraction": 0.7, "num_threads": 1, "verbose": -1, "seed": 3}  # fmt: skip
        straight = lgb.train(params, lgb.Dataset(x, y), 10)
        first = lgb.train(params, lgb.Dataset(x, y), 4)
        split = lgb.train(params, lgb.Dataset(x, y), 6, init_model=first)
        a, b = straight.predict(x), split.predict(x)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("name", ["XGBClassifier", "LGBMClassifier"])
def test_the_learning_rate_of_a_round_is_the_schedules_at_that_global_round(name):
    t = trainer(name)
    for rounds in (3, 1, 6):
        fit(t, name, rounds)
    sched = schedule()
    assert [h["lr"] for h in t.history] == [sched(r) for r in range(10)]
    one = trainer(name)
    fit(one, name, 10)
    assert booster_bytes(one) == booster_bytes(t)


def test_three_classes_resume_exactly_and_the_wrappers_predict_as_the_trainer(tmp_path):
    """The wrapper's multi-class objective (chosen from the classes, as its own fit
    does) is restored with the checkpoint; restart on two classes goes back to binary."""
    x, y = three_classes()
    for name in ("XGBClassifier", "LGBMClassifier"):
        t = trainer(name)
        t.fit(x, y, rounds=3)
        model = t.model
        assert np.array_equal(model.predict(x), t.predict(x))
        assert set(np.unique(t.predict(x))) == {0, 1, 2}
        assert model.predict_proba(x).shape == (len(x), 3)
        t.save(tmp_path / name)
        resumed = warmfit.Trainer.load(tmp_path / name, MODELS[name](), schedule=schedule(),
                                       seed=5, verbose=0)  # fmt: skip
        resumed.fit(x, y, rounds=2)
        t.fit(x, y, rounds=2)
        assert_same_state(t, resumed)
        t.fit(x, (y == 2).astype(np.int64), rounds=1, mode="restart")
        assert t.model.predict_proba(x).shape == (len(x), 2)


def test_labels_other_than_0_to_k_are_predicted_as_given_by_the_native_holders():
    x, y, _ = data()
    labels = np.array(["no", "yes"])[y]
    for model in (warmfit.boosting.XGBoost({"objective": "binary:logistic", "nthread": 1}),
                  warmfit.boosting.LightGBM({"objective": "binary", "num_threads": 1})):
        t = warmfit.Trainer(model, verbose=0)
        t.fit(x, labels, rounds=2, validation_data=(x[:50], labels[:50]))
        assert set(t.predict(x)) == {"no", "yes"}
        assert 0.5 < t.history[-1]["val_accuracy"] <= 1.0
        assert model.booster is not None


# -- processes and kill -9 --------------------------------------------------------------------
def worker(library: str, run_dir: Path, rounds: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(WORKER), library, str(run_dir), str(rounds), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_kill_9_with_a_checkpoint_every_round_resumes_to_the_straight_run(library, tmp_path):
    straight = worker(library, tmp_path / "straight", 12, "--out", str(tmp_path / "s"))
    out, err = straight.communicate(timeout=120)
    assert straight.returncode == 0, err
    run = tmp_path / "run"
    victim = worker(library, run, 12, "--slow", "0.15")
    deadline = time.monotonic() + 60
    # Step 5's folder exists only once step 4's save has committed (one save at a time).
    while time.monotonic() < deadline and not list(run.glob("checkpoints/*-step-00000000000[5-9]")):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    resumed = worker(library, run, 12, "--out", str(tmp_path / "r"))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    started = int(out.split("started at round ")[1].split()[0])
    assert 4 <= started < 12, out  # it resumed mid-run, in a new process
    assert_same_state(tmp_path / "s", tmp_path / "r")


# -- early stopping across calls --------------------------------------------------------------
@pytest.mark.parametrize("name", ["XGBClassifier", "LGBMClassifier"])
def test_early_stopping_across_calls_stops_at_the_round_of_one_straight_call(name):
    def build() -> warmfit.Trainer:
        return trainer(name, schedule=None, callbacks=[warmfit.EarlyStopping(patience=2)])

    x, y, _ = data()
    noisy = np.where(np.random.default_rng(1).random(len(y)) < 0.3, 1 - y, y)  # overfits soon
    straight = build()
    straight.fit(x, noisy, rounds=60, validation_data=(x[:150], y[:150]))
    stopped = straight.epoch
    assert 3 <= stopped < 60 and straight.ledger[-1]["stopped_by"] == "EarlyStopping"
    split = build()
    for _ in range(30):
        split.fit(x, noisy, rounds=2, validation_data=(x[:150], y[:150]))
        if split.ledger[-1].get("stopped_by"):
            break
    assert split.epoch == stopped
    assert booster_bytes(split) == booster_bytes(straight)


# -- modes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["XGBClassifier", "LGBMClassifier"])
def test_restart_drops_the_trees_and_warm_keeps_them_with_a_fresh_schedule(name):
    fresh = trainer(name)
    fit(fresh, name, 4)
    t = trainer(name)
    fit(t, name, 6)
    fit(t, name, 4, mode="restart")
    assert booster_bytes(t) == booster_bytes(fresh)
    w = trainer(name)
    fit(w, name, 3)
    before = booster_bytes(w)
    fit(w, name, 2, mode="warm")
    sched = schedule()
    assert [h["lr"] for h in w.history[-2:]] == [sched(0), sched(1)]  # the schedule again
    assert booster_bytes(w).startswith(before[:16]) and w.state_dict()["state"]["backend"][
        "rounds"
    ] == 5


def test_restart_leaves_the_wrapper_unfitted_until_its_first_round():
    from sklearn.exceptions import NotFittedError

    for name in ("XGBClassifier", "LGBMClassifier"):
        t = trainer(name)
        fit(t, name, 2)
        t.fit(data()[0], data()[1], rounds=1, mode="restart")
        assert t.model.predict(data()[0][:3]).shape == (3,)
    clf = xgb.XGBClassifier()
    warmfit.Trainer(clf, verbose=0)
    with pytest.raises(NotFittedError):
        clf.predict(data()[0][:3])


# -- the conformance suite --------------------------------------------------------------------
def boosting_warm_state(trained: Mapping[str, Any], never_trained: Mapping[str, Any]) -> dict:
    """The state a ``warm`` call starts from, by hand from docs/boosting.md: the trees
    kept; the learning rate the parameters give (a fresh "optimizer"); the schedule and
    callbacks started again."""
    state = dict(trained["state"])
    fresh_lr = never_trained["state"]["backend"]["learning_rate"]
    state["backend"] = {**state["backend"], "learning_rate": fresh_lr}
    return warmfit.testing.restart_schedule_and_callbacks(
        {"tensors": trained["tensors"], "state": state}, never_trained
    )


def case(name: str) -> Case:
    def build() -> tuple[Any, dict[str, Any]]:
        return MODELS[name](), dict(schedule=schedule(), seed=7, verbose=0)

    def arrays() -> tuple[np.ndarray, np.ndarray]:
        return data()[0], target(name)

    def validation() -> dict[str, Any]:
        return {"validation_data": (data()[0][:150], target(name)[:150])}

    return Case(f"{name}-rounds", build, arrays, validation, unit="rounds", total=5, cut=2,
                steps_per_epoch=1, warm_state=boosting_warm_state)  # fmt: skip


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", ["XGBClassifier", "LightGBM-native-regression"])
def test_conformance(name, check, tmp_path):
    check_backend(case(name), tmp_path, checks=[check])


# -- refusals, each before anything changes ---------------------------------------------------
@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: xgb.XGBClassifier(booster="dart"),
         "XGBoost parameter booster='dart' is refused: only the tree booster (booster='gbtree') "
         "is made exact by warmfit: dart drops trees at random and gblinear shuffles its "
         "coordinates with a generator its saved model does not hold."),
        (lambda: warmfit.boosting.XGBoost({"objective": "binary:logistic", "updater": "prune"}),
         "XGBoost parameter updater='prune' is refused: warmfit rebuilds XGBoost's tree updater "
         "every round through tree_method; set tree_method instead of updater."),
        (lambda: warmfit.boosting.XGBoost({"objective": "rank:pairwise"}),
         "XGBoost objective 'rank:pairwise' is not supported by warmfit yet: it evaluates "
         "['binary:logistic', 'multi:softprob', 'reg:absoluteerror', 'reg:squarederror'] (for "
         "multi:softmax, use multi:softprob; the predicted labels are the same)."),
        (lambda: warmfit.boosting.XGBoost({"objective": "binary:logistic", "num_boost_round": 9}),
         "num_boost_round / n_estimators is not a parameter here: warmfit adds rounds with "
         "fit(x, y, rounds=n). Remove it."),
        (lambda: xgb.XGBClassifier(early_stopping_rounds=5),
         "XGBoost's early_stopping_rounds stops inside one call and its count starts again "
         "with the next; use warmfit.EarlyStopping(patience=...) with validation_data=(x_val, "
         "y_val), whose state is carried across calls, and remove early_stopping_rounds."),
        (lambda: xgb.XGBRegressor(callbacks=[xgb.callback.EvaluationMonitor()]),
         "XGBRegressor(callbacks=...) is refused: XGBoost callbacks run inside one xgb.train "
         "call; use warmfit callbacks (warmfit.Callback), whose state is carried across "
         "calls. Remove callbacks."),
        (lambda: warmfit.boosting.LightGBM({"objective": "binary", "early_stopping_round": 5}),
         "LightGBM's early_stopping_round stops inside one call and its count starts again "
         "with the next; use warmfit.EarlyStopping(patience=...) with validation_data=(x_val, "
         "y_val), whose state is carried across calls, and remove early_stopping_round."),
        (lambda: lgb.LGBMClassifier(boosting_type="dart"),
         "LightGBM boosting='dart' is refused: only gbdt is made exact by warmfit (dart drops "
         "trees at random with a generator its saved model does not hold; use "
         "data_sample_strategy='goss' for GOSS)."),
        (lambda: lgb.LGBMClassifier(class_weight="balanced"),
         "LGBMClassifier(class_weight=...) is refused: warmfit passes no sample weights to "
         "LightGBM. Remove class_weight."),
        (lambda: warmfit.boosting.LightGBM({"objective": "lambdarank"}),
         "LightGBM objective 'lambdarank' is not supported by warmfit yet: it evaluates "
         "['binary', 'multiclass', 'regression', 'regression_l1']."),
    ],
)  # fmt: skip
def test_parameters_that_cannot_be_made_exact_are_refused(model, message):
    with pytest.raises(ValueError) as err:
        warmfit.Trainer(model(), verbose=0)
    assert str(err.value) == message


def test_bad_data_and_calls_are_refused_before_anything_changes():
    x, y, _ = data()
    t = trainer("LGBMClassifier")
    fit(t, "LGBMClassifier", 2)
    before = t.state_dict()
    cases = [
        (lambda: t.fit(x, np.where(y == 1, 2, y), rounds=1),
         "fit: y has classes [2] that LGBMClassifier was not trained with (its classes are "
         "[0, 1]). Trees cannot add classes; fit with mode='restart' on data with every class."),
        (lambda: t.fit(x[:, :5], y, rounds=1, mode="warm"),
         "fit: x has 5 features, but LGBMClassifier was trained on 8. Pass data with the same "
         "features, or fit with mode='restart'."),
        (lambda: t.fit(x, y, rounds=1, validation_split=0.2),
         "validation_split is not available for LGBMClassifier (a round fits on the whole data "
         "at once). Pass validation_data=(x_val, y_val)."),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    assert_same_state(before, t, ledger=True)
    xg = trainer("XGBClassifier")
    with pytest.raises(ValueError) as err:
        xg.fit(x, y + 3, rounds=1)
    assert str(err.value) == (
        "fit: XGBClassifier expects the classes 0..1, got [3, 4], as its own fit does. Encode "
        "y first (e.g. np.unique(y, return_inverse=True)[1]), or use warmfit.boosting.XGBoost, "
        "whose predict returns your labels."
    )
    assert xg.global_step == 0 and len(xg.ledger) == 0


def test_a_torch_option_or_an_optimizer_is_refused_for_a_booster():
    with pytest.raises(TypeError) as err:
        warmfit.Trainer(xgb.XGBRegressor(), optimizer=lambda p: None)
    assert str(err.value) == (
        "XGBRegressor is a xgboost model: its objective and its learning rate are its "
        "parameters (set them there; a warmfit schedule sets the learning rate per round). "
        "Do not pass 'optimizer' to Trainer."
    )
    with pytest.raises(ValueError) as err:
        warmfit.Trainer(lgb.LGBMRegressor(), precision="bf16")
    assert str(err.value) == (
        "precision= is an option of the PyTorch training step; warmfit does not offer it for "
        "LightGBM models yet. Remove it."
    )


# -- the checkpoint: the libraries' own formats, no code runs on load -------------------------
@pytest.mark.parametrize("name", ["XGBClassifier", "LGBMClassifier"])
def test_a_hostile_booster_entry_is_refused_without_running_code(name, tmp_path):
    import pickle

    from warmfit.checkpoint import read_checkpoint, write_checkpoint

    t = trainer(name)
    fit(t, name, 2)
    t.save(tmp_path / "ck")
    tensors, state = read_checkpoint(tmp_path / "ck")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    tensors["model/booster"] = np.frombuffer(pickle.dumps(Payload()), np.uint8)
    write_checkpoint(tmp_path / "bad", tensors, state)
    with pytest.raises(warmfit.errors.StateMismatchError) as err:
        warmfit.Trainer.load(tmp_path / "bad", MODELS[name](), verbose=0)
    library = "XGBoost" if name.startswith("XGB") else "LightGBM"
    assert f"model/booster is not a{'n' * (library == 'XGBoost')} {library} model (" in str(err.value)
    assert str(err.value).endswith(
        f"The checkpoint is damaged or was not written by warmfit's {library} backend."
    )
    assert not marker.exists()


# -- the tabular demo -------------------------------------------------------------------------
def test_the_tabular_demo_holds_its_checks(tmp_path, capsys):
    from warmfit import demo_tabular

    demo_tabular.main(str(tmp_path / "demo"))
    out = capsys.readouterr().out
    assert "Check: three calls == one call, bit for bit: True" in out
    assert "Check: killed and resumed == the reference, bit for bit: True" in out
    assert "child 1: killed by SIGKILL; the newest checkpoint: ckpt-" in out


def test_the_wrappers_missing_value_marker_is_used_in_training_and_prediction():
    """XGBClassifier(missing=-1.0): -1.0 entries are missing, as in the wrapper's own fit."""
    x, y, _ = data()
    holes = np.where(np.random.default_rng(2).random(x.shape) < 0.2, -1.0, x)
    t = warmfit.Trainer(xgb.XGBClassifier(missing=-1.0, n_jobs=1, max_depth=3), verbose=0)
    t.fit(holes, y, rounds=4)
    own = xgb.XGBClassifier(missing=-1.0, n_jobs=1, max_depth=3, n_estimators=4)
    own.fit(holes, y)
    as_nan = np.where(holes == -1.0, np.nan, holes)
    assert np.array_equal(t.model.predict_proba(holes), own.predict_proba(as_nan))
    plain = warmfit.Trainer(xgb.XGBClassifier(n_jobs=1, max_depth=3), verbose=0)
    plain.fit(holes, y, rounds=4)  # -1.0 a value like any other: other trees
    assert not np.array_equal(plain.model.predict_proba(holes), t.model.predict_proba(holes))
