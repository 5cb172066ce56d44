"""LightGBM's engine for :mod:`.boosting`: one ``Booster.update`` per round, exact.

LightGBM seeds its bagging generators when their configuration changes (not when
``bagging_seed`` alone does) and its feature sampler when ``feature_fraction_seed``
changes; both then go on from there, and a booster rebuilt from its model text starts
them afresh. Before each round :meth:`LightGBMEngine.boost_round` resets the parameters
twice — first to another bagging fraction and other seeds, then back with the round's
seeds — so every generator restarts from that round's seed (measured exact for bagging
with any ``bagging_freq``, ``feature_fraction``, ``feature_fraction_bynode``,
``extra_trees`` and GOSS, with cuts after 1, 4 and 7 of 10 rounds).

A booster is bound to its training ``Dataset``: a fit call opens it on the call's data,
from the previous trees (LightGBM's own continued training: the old trees merged in, the
data's initial scores predicted from them), which gives the same trees as going on in
one booster. ``deterministic=True`` and ``force_col_wise=True`` are set unless given
(LightGBM otherwise picks row- or column-wise histograms by timing them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import StateMismatchError
from .boosting import BoosterEngine, Rounds

#: The objectives whose loss warmfit computes (evaluation), with LightGBM's default
#: metric for them.
METRICS = {"binary": "binary_logloss", "multiclass": "multi_logloss", "regression": "l2",
           "regression_l1": "l1"}  # fmt: skip
_OBJECTIVE_ALIASES = {"regression_l2": "regression", "l2": "regression", "mse": "regression",
                      "mean_squared_error": "regression", "l1": "regression_l1",
                      "mae": "regression_l1", "softmax": "multiclass"}  # fmt: skip
_BAGGING_FRACTION = ("bagging_fraction", "sub_row", "subsample", "bagging")
_SEEDS = ("seed", "random_seed", "random_state")
_NUM_ROUNDS = ("num_iterations", "num_iteration", "n_iter", "num_tree", "num_trees",
               "num_round", "num_rounds", "nrounds", "num_boost_round", "n_estimators",
               "max_iter")  # fmt: skip
_WRAPPER_ONLY = ("n_estimators", "importance_type", "class_weight", "silent")
_EARLY_STOPPING = ("early_stopping_round", "early_stopping_rounds", "early_stopping",
                   "n_iter_no_change")  # fmt: skip


def from_model(model: Any) -> tuple[LightGBMEngine, bool, int]:
    """(engine, is a classifier, random_state) for an ``LGBMModel`` wrapper or a
    :class:`warmfit.boosting.LightGBM` holder."""
    import lightgbm as lgb

    from ..boosting import LightGBM

    if isinstance(model, LightGBM):
        params, wrapper = dict(model.params), False
    else:
        params = {k: v for k, v in model.get_params().items() if v is not None}
        if model.get_params().get("class_weight") is not None:
            raise ValueError(
                "LGBMClassifier(class_weight=...) is refused: warmfit passes no sample "
                "weights to LightGBM. Remove class_weight."
            )
        for key in _WRAPPER_ONLY:
            params.pop(key, None)
        wrapper = True
    stopping = [k for k in _EARLY_STOPPING if k in params]
    if stopping:
        raise ValueError(
            f"LightGBM's {stopping[0]} stops inside one call and its count starts again "
            "with the next; use warmfit.EarlyStopping(patience=...) with validation_data="
            f"(x_val, y_val), whose state is carried across calls, and remove {stopping[0]}."
        )
    given = [k for k in _NUM_ROUNDS if k in params]
    if given:
        raise ValueError(
            f"{given[0]} is not a parameter here: warmfit adds rounds with "
            "fit(x, y, rounds=n). Remove it."
        )
    random_state = 0
    for key in _SEEDS:
        if key in params:
            random_state = int(params.pop(key))
    if "n_jobs" in params:
        params["num_threads"] = params.pop("n_jobs")
    if "boosting_type" in params:
        params["boosting"] = params.pop("boosting_type")
    objective = params.get("objective", params.get("application"))
    if isinstance(objective, str):
        params["objective"] = _OBJECTIVE_ALIASES.get(objective, objective)
    if wrapper:
        classifier = isinstance(model, lgb.LGBMClassifier)
    else:
        classifier = params.get("objective") in ("binary", "multiclass", "multiclassova")
    params.setdefault("objective", "binary" if classifier else "regression")
    params.setdefault("verbose", -1)
    params.setdefault("deterministic", True)
    if not params.get("force_row_wise"):
        params.setdefault("force_col_wise", True)
    return LightGBMEngine(params, wrapper=wrapper), classifier, random_state


class _Opened(Exception):
    """Carries the booster ``lightgbm.train`` built, out of it, before its first round."""

    def __init__(self, booster: Any) -> None:
        self.booster = booster


class LightGBMEngine(BoosterEngine):
    library = "lightgbm"
    lr_key = "learning_rate"
    default_lr = 0.1
    binary_objective, multi_objective = "binary", "multiclass"
    positive_lr = True

    def __init__(self, params: dict[str, Any], *, wrapper: bool) -> None:
        super().__init__(params)
        self.wrapper = wrapper
        self.bound: Any = None  # the Dataset the training booster is bound to
        self.text: str | None = None  # the trees, where no training booster holds them
        for alias in ("shrinkage_rate", "eta"):
            if alias in params:
                params["learning_rate"] = params.pop(alias)
        self.bagging_fraction = float(next(
            (params[k] for k in _BAGGING_FRACTION if k in params), 1.0))  # fmt: skip

    def check_params(self) -> None:
        p = self.params
        boosting = p.get("boosting", "gbdt")
        if boosting not in ("gbdt", "gbrt"):
            raise ValueError(
                f"LightGBM boosting={boosting!r} is refused: only gbdt is made exact by "
                "warmfit (dart drops trees at random with a generator its saved model does "
                "not hold; use data_sample_strategy='goss' for GOSS)."
            )
        if str(p.get("device_type", p.get("device", "cpu"))) != "cpu":
            raise ValueError(
                "LightGBM device_type other than 'cpu' is refused: warmfit has verified its "
                "round-by-round exactness on the CPU only."
            )
        if p["objective"] not in METRICS:
            raise ValueError(
                f"LightGBM objective {p['objective']!r} is not supported by warmfit yet: it "
                f"evaluates {sorted(METRICS)}."
            )
        if self.loss_name() not in METRICS.values():
            raise ValueError(
                f"LightGBM metric {self.loss_name()!r} is not one warmfit computes for "
                f"validation; the first metric must be one of {sorted(METRICS.values())}."
            )

    def matrix(self, x: np.ndarray, y: np.ndarray) -> Any:
        import lightgbm as lgb

        return lgb.Dataset(x, label=y, params=self.params, free_raw_data=False)

    def _open(self, dataset: Any, seed: int) -> None:
        """A training booster on ``dataset``, holding the trees so far."""
        import lightgbm as lgb

        params = {**self.params, "bagging_seed": seed, "feature_fraction_seed": seed}
        if self.rounds() == 0:
            self.booster = lgb.Booster(params=params, train_set=dataset)
        else:
            previous = lgb.Booster(model_str=self._text())

            def opened(env: Any) -> None:
                raise _Opened(env.model)

            opened.before_iteration = True  # type: ignore[attr-defined]
            try:
                lgb.train(params, dataset, num_boost_round=1, init_model=previous,
                          keep_training_booster=True, callbacks=[opened])  # fmt: skip
            except _Opened as done:
                self.booster = done.booster
        self.bound, self.text = dataset, None

    def _text(self) -> str:
        return self.text if self.text is not None else self.booster.model_to_string()

    def boost_round(self, data: Rounds, round_index: int, seed: int, lr: float) -> float:
        if self.booster is None or self.bound is not data.matrix:
            self._open(data.matrix, seed)
        b, bf = self.booster, self.bagging_fraction
        other, mask = (0.5 if bf != 0.5 else 0.25), (1 << 31) - 1
        seeds = [(seed + i) % mask + 1 for i in range(4)]
        b.reset_parameter({"bagging_fraction": other, "bagging_seed": seeds[3],
                           "feature_fraction_seed": seeds[3], "extra_seed": seeds[3]})  # fmt: skip
        b.reset_parameter({"bagging_fraction": bf, "bagging_seed": seeds[0],
                           "feature_fraction_seed": seeds[1], "extra_seed": seeds[2],
                           "learning_rate": lr})  # fmt: skip
        b.update()
        return float(b.eval_train()[0][2])

    def rounds(self) -> int:
        return 0 if self.booster is None else int(self.booster.current_iteration())

    def n_features(self) -> int:
        return int(self.booster.num_feature())

    def reset(self) -> None:
        self.booster, self.bound, self.text = None, None, None

    def to_bytes(self) -> bytes:
        """The model text as LightGBM reads it back: a booster rebuilt from text prints
        its trees' internal values rounded, so the text goes through one load (then two
        boosters with the same trees print the same); the parameters block (the last
        round's seeds) is left out."""
        import lightgbm as lgb

        text = lgb.Booster(model_str=self._text()).model_to_string()
        head, sep, rest = text.partition("\nparameters:\n")
        if sep:
            text = head + rest.partition("end of parameters\n")[2]
        return text.encode("utf-8")

    def from_bytes(self, blob: bytes) -> None:
        import lightgbm as lgb

        try:
            text = blob.decode("utf-8")
            booster = lgb.Booster(model_str=text)
        except (UnicodeDecodeError, lgb.basic.LightGBMError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
            raise StateMismatchError(
                f"model/booster is not a LightGBM model ({first[:200]}). The checkpoint is "
                "damaged or was not written by warmfit's LightGBM backend."
            ) from None
        self.booster, self.bound, self.text = booster, None, text

    def raw_predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(x, num_threads=self.params.get("num_threads", 0)))

    def loss_name(self) -> str:
        metric = self.params.get("metric")
        if isinstance(metric, (list, tuple)) and metric:
            metric = metric[0]
        if metric in (None, "", "None"):
            return METRICS[self.params["objective"]]
        return {"mse": "l2", "mae": "l1", "regression": "l2", "regression_l1": "l1",
                "binary": "binary_logloss", "multiclass": "multi_logloss"}.get(
                    str(metric), str(metric))  # fmt: skip

    def publish(self, model: Any, classes: np.ndarray | None) -> None:
        if not self.wrapper:
            model.booster = self.booster
            return
        names = ("_Booster", "fitted_", "_n_features", "n_features_in_", "_n_classes",
                 "_classes", "_le", "_objective")  # fmt: skip
        if self.booster is None:  # restart: the wrapper is unfitted again
            for key in names:
                if key in vars(model):
                    delattr(model, key)
            return
        # What LGBMModel.fit leaves for predict (LightGBM 4.x), without copying the trees.
        model._Booster, model.fitted_ = self.booster, True
        model._n_features = model.n_features_in_ = self.n_features()
        model._objective = self.params["objective"]
        if classes is not None:
            from sklearn.preprocessing import LabelEncoder

            model._le = LabelEncoder().fit(classes)
            model._classes, model._n_classes = model._le.classes_, len(classes)
