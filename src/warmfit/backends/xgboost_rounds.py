"""XGBoost's engine for :mod:`.boosting`: one ``Booster.update`` per round, exact.

XGBoost keeps random state its saved model does not hold: the tree updater's column
sampler is seeded once, when the updater is built, and goes on from there; row
subsampling draws from a generator reseeded only when the ``seed`` parameter changes.
A booster loaded from its bytes therefore goes on differently from the one that wrote
them (measured: predictions apart by 0.33 after 4 + 6 rounds with subsampling). Before
each round :meth:`XGBoostEngine.boost_round` rebuilds the tree updater (it switches
``tree_method`` away and back, which XGBoost answers by building new updaters) and sets
that round's seed, so every round starts from a state that depends on the round's seed
alone — as ``xgb.train(..., num_boost_round=1, xgb_model=previous)`` per round would,
without that call's cost of copying the model and predicting every tree again (5.3x
``xgb.train`` at 100 rounds on 100k rows; this way ~1.0x, ``benchmarks/bench_boosting.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import StateMismatchError
from .boosting import BoosterEngine, Rounds

#: The objectives whose loss warmfit computes (evaluation), with the metric XGBoost
#: reports for them by default.
METRICS = {
    "binary:logistic": "logloss",
    "multi:softprob": "mlogloss",
    "reg:squarederror": "rmse",
    "reg:absoluteerror": "mae",
}

#: Parameters of the scikit-learn wrapper that are not training parameters.
_WRAPPER_ONLY = ("n_estimators", "importance_type", "kwargs")


def from_model(model: Any) -> tuple[XGBoostEngine, bool, int]:
    """(engine, is a classifier, random_state) for an ``XGBModel`` wrapper or a
    :class:`warmfit.boosting.XGBoost` holder."""
    import xgboost as xgb

    from ..boosting import XGBoost

    missing = float("nan")
    if isinstance(model, XGBoost):
        params = dict(model.params)
        wrapper = False
    else:
        _check_wrapper(model)
        params = {k: v for k, v in model.get_xgb_params().items() if v is not None}
        for key in _WRAPPER_ONLY:
            params.pop(key, None)
        wrapper = True
        missing = model.missing
    if "early_stopping_rounds" in params:
        raise ValueError(_EARLY_STOPPING)
    for alias in ("learning_rate",):
        if alias in params:
            params["eta"] = params.pop(alias)
    if "n_jobs" in params:
        params["nthread"] = params.pop("n_jobs")
    random_state = 0
    for key in ("seed", "random_state"):
        if key in params:
            value = params.pop(key)
            random_state = int(value) if value is not None else 0
    if "num_boost_round" in params or "n_estimators" in params:
        raise ValueError(
            "num_boost_round / n_estimators is not a parameter here: warmfit adds rounds "
            "with fit(x, y, rounds=n). Remove it."
        )
    if wrapper and isinstance(model, xgb.XGBClassifier):
        classifier = True
    elif wrapper:
        classifier = False
    else:
        objective = str(params.get("objective", "reg:squarederror"))
        classifier = objective.startswith(("binary:", "multi:"))
    params.setdefault("objective", "binary:logistic" if classifier else "reg:squarederror")
    engine = XGBoostEngine(params, wrapper=wrapper)
    engine.missing = missing
    return engine, classifier, random_state


_EARLY_STOPPING = (
    "XGBoost's early_stopping_rounds stops inside one call and its count starts again with "
    "the next; use warmfit.EarlyStopping(patience=...) with validation_data=(x_val, y_val), "
    "whose state is carried across calls, and remove early_stopping_rounds."
)


def _check_wrapper(model: Any) -> None:
    """Refuse the wrapper's settings warmfit would otherwise ignore silently."""
    p = model.get_params()
    name = type(model).__name__
    if p.get("early_stopping_rounds") is not None:
        raise ValueError(_EARLY_STOPPING)
    refused = {
        "callbacks": "XGBoost callbacks run inside one xgb.train call; use warmfit callbacks "
                     "(warmfit.Callback), whose state is carried across calls",
        "feature_weights": "warmfit does not pass feature weights to the column sampler",
        "feature_types": "warmfit takes numeric arrays only (encode categories as numbers)",
    }  # fmt: skip
    for key, why in refused.items():
        if p.get(key) is not None:
            raise ValueError(f"{name}({key}=...) is refused: {why}. Remove {key}.")
    if p.get("enable_categorical"):
        raise ValueError(
            f"{name}(enable_categorical=True) is refused: warmfit takes numeric arrays only "
            "(encode categories as numbers). Remove enable_categorical."
        )


class XGBoostEngine(BoosterEngine):
    library = "xgboost"
    lr_key = "eta"
    default_lr = 0.3
    binary_objective, multi_objective = "binary:logistic", "multi:softprob"

    def __init__(self, params: dict[str, Any], *, wrapper: bool) -> None:
        super().__init__(params)
        self.wrapper = wrapper
        self.missing = float("nan")  # the value that marks a missing entry (the wrapper's)
        method = params.get("tree_method", "hist")
        self.method = "hist" if method in (None, "auto") else str(method)
        #: Whether a round draws random numbers (row or column subsampling): only then
        #: must its samplers be rebuilt from the round's seed (a configuration, ~0.5 ms).
        self.samples = any(
            params.get(key) not in (None, 1, 1.0)
            for key in ("subsample", "colsample_bytree", "colsample_bylevel", "colsample_bynode")
        )

    def check_params(self) -> None:
        p = self.params
        reasons = {
            "booster": (p.get("booster", "gbtree") != "gbtree",
                        "only the tree booster (booster='gbtree') is made exact by warmfit: "
                        "dart drops trees at random and gblinear shuffles its coordinates "
                        "with a generator its saved model does not hold"),
            "updater": ("updater" in p,
                        "warmfit rebuilds XGBoost's tree updater every round through "
                        "tree_method; set tree_method instead of updater"),
            "device": (str(p.get("device", "cpu")) != "cpu",
                       "warmfit has verified its round-by-round exactness on the CPU only"),
            "process_type": (p.get("process_type", "default") != "default",
                             "warmfit grows new trees each round"),
            "tree_method": (self.method not in ("hist", "approx", "exact"),
                            "tree_method must be 'hist', 'approx' or 'exact'"),
        }  # fmt: skip
        for key, (bad, why) in reasons.items():
            if bad:
                raise ValueError(f"XGBoost parameter {key}={p.get(key)!r} is refused: {why}.")
        objective = p.get("objective")
        if objective in METRICS and self.loss_name() not in METRICS.values():
            raise ValueError(
                f"XGBoost eval_metric {self.loss_name()!r} is not one warmfit computes for "
                f"validation; the first eval_metric must be one of {sorted(set(METRICS.values()))}."
            )
        if objective not in METRICS:
            raise ValueError(
                f"XGBoost objective {objective!r} is not supported by warmfit yet: it "
                f"evaluates {sorted(METRICS)} (for multi:softmax, use multi:softprob; the "
                "predicted labels are the same)."
            )

    def matrix(self, x: np.ndarray, y: np.ndarray) -> Any:
        import xgboost as xgb

        nthread = self.params.get("nthread")
        return xgb.DMatrix(x, label=y, missing=self.missing,
                           nthread=-1 if nthread is None else nthread)  # fmt: skip

    def boost_round(self, data: Rounds, round_index: int, seed: int, lr: float) -> float:
        import xgboost as xgb

        m = data.matrix
        if self.booster is None:
            self.booster = xgb.Booster({**self.params, "seed": seed}, [m])
        b = self.booster
        if self.samples:  # rebuild the samplers, so that they draw from this round's seed
            other = "approx" if self.method != "approx" else "hist"
            b.set_param({"tree_method": other, "seed": (seed + 1) % (1 << 31)})
            b.save_config()  # XGBoost configures here: the updaters are rebuilt
        b.set_param({"tree_method": self.method, "seed": seed, "eta": lr})
        b.update(m, round_index)
        report = b.eval_set([(m, "train")], iteration=round_index)
        return float(report.split("\t")[1].split(":")[1])

    def rounds(self) -> int:
        return 0 if self.booster is None else int(self.booster.num_boosted_rounds())

    def n_features(self) -> int:
        return int(self.booster.num_features())

    def to_bytes(self) -> bytes:
        return bytes(self.booster.save_raw("ubj"))

    def from_bytes(self, blob: bytes) -> None:
        import xgboost as xgb

        try:
            booster = xgb.Booster(dict(self.params), model_file=bytearray(blob))
        except xgb.core.XGBoostError as err:
            # XGBoost's message opens with "[time] source:line: "; the reason follows.
            first = (str(err).strip().splitlines() or ["unreadable"])[0]
            reason = first.split(": ", 1)[-1] if first.startswith("[") else first
            raise StateMismatchError(
                f"model/booster is not an XGBoost model ({reason[:200]}). The checkpoint is "
                "damaged or was not written by warmfit's XGBoost backend."
            ) from None
        self.booster = booster

    def raw_predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.inplace_predict(x, missing=self.missing))

    def loss_name(self) -> str:
        metric = self.params.get("eval_metric")
        if isinstance(metric, (list, tuple)) and metric:
            metric = metric[0]
        return str(metric) if metric else METRICS[self.params["objective"]]

    def classes_problem(self, classes: np.ndarray) -> str | None:
        if self.wrapper and not np.array_equal(classes, np.arange(len(classes))):
            return (
                f"XGBClassifier expects the classes 0..{len(classes) - 1}, got "
                f"{classes.tolist()}, as its own fit does. Encode y first (e.g. "
                "np.unique(y, return_inverse=True)[1]), or use warmfit.boosting.XGBoost, "
                "whose predict returns your labels."
            )
        return None

    def publish(self, model: Any, classes: np.ndarray | None) -> None:
        if not self.wrapper:
            model.booster = self.booster
            return
        if self.booster is None:  # restart: the wrapper is unfitted again
            for key in ("_Booster", "n_classes_"):
                if key in vars(model):
                    delattr(model, key)
            return
        model._Booster = self.booster  # the wrapper's predict reads it (XGBModel.get_booster)
        if classes is not None:
            model.n_classes_ = len(classes)
