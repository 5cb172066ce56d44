"""Gradient-boosted trees (XGBoost, LightGBM) under the contract: one round is one epoch.

A boosting round adds one tree (one per class) fitted on the whole training set, so the
loop sees the data as one indivisible unit (:class:`Rounds`, length 1): one epoch is one
round is one step, and ``fit(x, y, rounds=n)`` (``epochs=n``) adds ``n`` rounds. A
warmfit schedule is a function of the global step, so the learning rate of round ``r``
is the same whether the rounds came in one call or in five.

Exactness. Each library keeps random state that its saved model does not hold (XGBoost's
column sampler lives in its tree updater, seeded once; LightGBM's bagging and feature
samplers are seeded when a booster is built): a booster loaded from its bytes goes on
differently from the one that wrote them. So the random state of every round is made a
function of (the Trainer's seed, the model's ``random_state``, the round): before each
round the library's samplers are rebuilt from that round's seeds
(:meth:`BoosterEngine.boost_round`). Then one call, five calls, a booster that went
through its bytes, or a new process give the same trees, bit for bit, with row and
column subsampling and bagging on. The library-specific part is an *engine*
(:mod:`.xgboost_rounds`, :mod:`.lightgbm_rounds`); this module is the part they share.

Modes: ``continue`` keeps the trees and the schedule's position; ``warm`` keeps the trees
and starts the schedule and the callbacks again (trees have no optimizer state: the
"optimizer" of boosting is the learning rate, which the schedule sets); ``restart`` drops
the trees. State: the booster in the library's own safe format (XGBoost UBJSON, LightGBM
model text) as one uint8 array ``model/booster``; never pickle.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..data import fingerprint
from ..errors import StateMismatchError
from ..schedules import Schedule
from ..state import derive_seed
from .base import Backend, check_samples, jsonable, named_metrics


class Rounds:
    """The training set as one unit: a round fits on all of it (``len`` 1)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.matrix: Any = None  # the library's data object, built once per handle

    def __len__(self) -> int:
        return 1


class EvalData:
    """Rows to evaluate or predict on (``len``: the rows)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]


class BoosterEngine(abc.ABC):
    """One library's booster: its parameters, its trees and its data objects.

    ``params`` are the library's own training parameters (the wrapper's translated), the
    ones every round uses; warmfit sets the learning rate and the seeds per round."""

    library: str = ""
    #: The parameter that holds the learning rate, and the library's default for it.
    lr_key: str = "learning_rate"
    default_lr: float = 0.1
    #: Whether every round needs a learning rate > 0 (the library refuses 0).
    positive_lr: bool = False
    #: The library's binary and multi-class objectives (a wrapper picks by the classes).
    binary_objective: str = ""
    multi_objective: str = ""
    #: Whether the model is a scikit-learn wrapper (else a warmfit.boosting holder).
    wrapper: bool = False

    def __init__(self, params: dict[str, Any]) -> None:
        self.given = dict(params)  # the user's parameters, as recorded
        self.params = dict(params)  # with what the classes decide (configure)
        self.booster: Any = None  # None: no trees yet

    @abc.abstractmethod
    def check_params(self) -> None:
        """Refuse parameters that cannot be made exact (ValueError with the reason)."""

    @abc.abstractmethod
    def matrix(self, x: np.ndarray, y: np.ndarray) -> Any:
        """The library's training data object for (x, y)."""

    @abc.abstractmethod
    def boost_round(self, data: Rounds, round_index: int, seed: int, lr: float) -> float:
        """Add one round on ``data`` with every random choice drawn from ``seed``;
        returns the training loss the library computed for the round (its default
        metric on the training set, from its cached predictions)."""

    @abc.abstractmethod
    def rounds(self) -> int:
        """The rounds in the booster (0 without one)."""

    @abc.abstractmethod
    def to_bytes(self) -> bytes:
        """The booster in the library's safe format, canonical: two boosters with the
        same trees give identical bytes (whether or not one went through its bytes)."""

    @abc.abstractmethod
    def from_bytes(self, blob: bytes) -> None:
        """Make the booster the one in ``blob`` (validated by the library's parser)."""

    @abc.abstractmethod
    def raw_predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (rows, classes) for a classifier, values (rows,) otherwise,
        computed from every tree (no cache: the same numbers in any process)."""

    @abc.abstractmethod
    def loss_name(self) -> str:
        """The library's default metric for the objective: what ``loss`` is."""

    def configure(self, classes: int | None) -> None:
        """The parameters for a classifier of ``classes`` classes (None: a regressor):
        the user's, completed where they left the objective to the wrapper."""
        self.params = self.given if classes is None else self.for_classes(classes)
        self.params = dict(self.params)

    def for_classes(self, classes: int) -> dict[str, Any]:
        """The user's parameters completed for ``classes`` classes (a ValueError where
        they contradict them): a wrapper's binary objective becomes the multi-class one
        for more than two classes, as its own ``fit`` does, with ``num_class``."""
        p, multi = dict(self.given), self.multi_objective
        if classes > 2 and p["objective"] == self.binary_objective and self.wrapper:
            p["objective"] = multi
        if p["objective"] == multi:
            given = p.setdefault("num_class", classes)
            if given != classes:
                raise ValueError(
                    f"num_class={given} but y has {classes} classes. Pass num_class={classes}."
                )
        elif classes > 2:
            raise ValueError(
                f"objective {p['objective']!r} is binary but y has {classes} classes. Use "
                f"objective={multi!r}."
            )
        return p

    @abc.abstractmethod
    def n_features(self) -> int:
        """The number of features the trees were grown on (only with trees)."""

    @abc.abstractmethod
    def publish(self, model: Any, classes: np.ndarray | None) -> None:
        """Make the user's model object hold the current trees: a
        :mod:`warmfit.boosting` holder's ``booster``, or a scikit-learn wrapper fitted
        (its ``predict`` works), without copying the trees."""

    def reset(self) -> None:
        """No trees (``restart``); the parameters as the user gave them."""
        self.booster = None
        self.params = dict(self.given)

    def classes_problem(self, classes: np.ndarray) -> str | None:
        """Why the user's model object cannot hold these class labels (None: it can)."""
        return None  # the default: any labels go


def loss_value(name: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The value of the library metric ``name`` on (y, pred), as the libraries define
    it: log loss (probabilities clipped at 1e-15), root mean squared error, mean squared
    error (LightGBM's ``l2``), or mean absolute error."""
    if name in ("logloss", "binary_logloss", "mlogloss", "multi_logloss"):
        p = pred if pred.ndim == 2 else np.stack([1 - pred, pred], axis=1)
        picked = np.clip(p[np.arange(len(y)), y.astype(np.int64)], 1e-15, 1.0)
        return float(-np.mean(np.log(picked)))
    err = np.asarray(pred, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    if name == "rmse":
        return float(math.sqrt(np.mean(err**2)))
    if name in ("l2", "mse"):
        return float(np.mean(err**2))
    if name in ("mae", "l1"):
        return float(np.mean(np.abs(err)))
    raise ValueError(f"warmfit cannot compute the library metric {name!r} itself.")


NAMED_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, p: float(np.mean(y == p)),
    "mse": lambda y, p: float(np.mean((np.asarray(p, float) - y) ** 2)),
    "r2": lambda y, p: float(1 - np.sum((y - p) ** 2) / np.sum((y - np.mean(y)) ** 2)),
}


class BoostingBackend(Backend):
    """The backend of a boosted-trees model: an engine plus warmfit's rounds, seeds,
    classes, evaluation and state. ``model`` is what the user passed (a scikit-learn
    wrapper, kept fitted after every call where its library allows, or a
    :class:`warmfit.boosting.XGBoost` / :class:`~warmfit.boosting.LightGBM` holder)."""

    framework = "boosting"

    def __init__(
        self,
        model: Any,
        engine: BoosterEngine,
        *,
        classifier: bool,
        random_state: int,
        device: str = "cpu",
        optimizer: Any = None,
        loss: Any = None,
        metrics: Any = (),
        num_workers: int = 0,
        step: Any = None,
    ) -> None:
        name = type(model).__name__
        pairs = (("optimizer", optimizer), ("loss", loss), ("step", step))
        given = [k for k, v in pairs if v is not None]
        if given:
            raise TypeError(
                f"{name} is a {engine.library} model: its objective and its learning rate are "
                f"its parameters (set them there; a warmfit schedule sets the learning rate "
                f"per round). Do not pass {' or '.join(map(repr, given))} to Trainer."
            )
        if str(device) != "cpu":
            raise ValueError(
                f"The 'device' parameter of Trainer must be 'cpu' for {engine.library} models "
                f"(choose the library's device in its parameters). Got {device!r} instead."
            )
        if num_workers:
            raise ValueError(
                f"The 'num_workers' parameter of Trainer has no meaning for {engine.library} "
                f"models (set the library's thread count). Got {num_workers!r} instead."
            )
        engine.check_params()
        self.model, self.engine = model, engine
        self.framework = engine.library
        self.classifier = classifier
        self.random_state = random_state
        self.metrics = named_metrics(metrics, NAMED_METRICS)
        self.classes: np.ndarray | None = None
        self.lr = float(engine.params.get(engine.lr_key, engine.default_lr))
        self._lr0 = self.lr

    # -- construction, warm and restart ----------------------------------------------
    def init_model(self, seed: int, *, first: bool) -> None:
        self.seed = seed
        self.engine.reset()
        self.classes = None
        self._publish()

    def init_optimizer(self, schedule: Any) -> None:
        if schedule is not None and not callable(schedule):
            raise TypeError(f"A schedule must be a function of the global step. Got {schedule!r}.")
        self.lr = self._lr0  # warm: the learning rate the parameters give, as a new optimizer

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        return {}  # every round's randomness comes from its own seed (round_seed)

    def capture_rng(self) -> dict[str, np.ndarray]:
        return {}

    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        pass

    def round_seed(self, round_index: int) -> int:
        """The seed of round ``round_index``: a function of the Trainer's seed, the model's
        ``random_state`` and the round, in [1, 2**31) (the libraries' int range)."""
        s = derive_seed(self.seed, "boost", self.random_state, round_index)
        return 1 + s % ((1 << 31) - 2)

    def check_schedule(self, schedule: Any) -> None:
        """:meth:`Backend.check_schedule`, and: a library that needs a learning rate > 0
        in every round (LightGBM) refuses a schedule that gives one <= 0 in its first
        10,000 steps (a warm-up from 0) before anything changes."""
        super().check_schedule(schedule)
        if self.engine.positive_lr and callable(schedule):
            if isinstance(schedule, Schedule) and schedule.needs_plan():
                schedule = schedule.planned(10_000)  # a plan that long, as a fit call's
            for step in range(10_000):
                lr = schedule(step)
                if not lr > 0:
                    raise ValueError(
                        f"{self.engine.library} needs a learning rate > 0 in every round; "
                        f"this schedule gives {lr!r} at step {step} (a warm-up from 0?). Start "
                        "it above 0, e.g. schedules.warmup(n, then, start_factor=0.1)."
                    )

    # -- data ------------------------------------------------------------------------
    def _arrays(self, x: Any, y: Any, *, what: str) -> tuple[np.ndarray, np.ndarray | None]:
        name = type(self.model).__name__
        if hasattr(x, "iloc") or hasattr(x, "to_pandas"):
            raise TypeError(
                f"{what} x is a data frame; warmfit's {self.engine.library} backend takes a "
                f"2-D numeric array (x.to_numpy(), with categories encoded as numbers) so "
                "that its fingerprint and its rows are exact. Pass a NumPy array."
            )
        xa = np.asarray(x)
        if xa.ndim != 2:
            raise ValueError(
                f"x must be a 2-D array (samples, features) for {name}. Got shape {xa.shape}."
            )
        if xa.dtype == object or xa.dtype.kind not in "biuf":
            raise TypeError(f"x must be numeric for {name}. Got dtype {xa.dtype}.")
        ya = None if y is None else np.asarray(y)
        check_samples(x, xa.shape[0], None if ya is None else len(ya))
        return xa, ya

    def prepare(self, x: Any, y: Any) -> Rounds:
        xa, ya = self._arrays(x, y, what="fit:")
        if ya is None:
            raise ValueError(f"{type(self.model).__name__} learns from targets: pass y.")
        return Rounds(xa, ya)

    def check_validation_split(self, data: Any) -> None:
        self.subset(data, np.zeros(0, dtype=np.int64))

    def subset(self, data: Any, rows: np.ndarray) -> Any:
        raise ValueError(
            f"validation_split is not available for {type(self.model).__name__} (a round "
            "fits on the whole data at once). Pass validation_data=(x_val, y_val)."
        )

    def fingerprint(self, data: Any) -> tuple[str, list[int]]:
        return fingerprint(data.x, data.y), list(data.x.shape)

    def check_data(self, data: Any, *, with_target: bool, what: str) -> None:
        """Classes a continuing classifier has not seen, or a change in the number of
        features, are refused before anything changes."""
        name = type(self.model).__name__
        if isinstance(data, EvalData) and with_target and data.y is None:
            raise ValueError(f"{what} pass y to evaluate {name}.")
        n_features = self.engine.n_features() if self.engine.rounds() else None
        if n_features is not None and data.x.shape[1] != n_features:
            raise ValueError(
                f"{what} x has {data.x.shape[1]} features, but {name} was trained on "
                f"{n_features}. Pass data with the same features, or fit with mode='restart'."
            )
        if not self.classifier or data.y is None or not with_target:
            return
        seen = np.unique(data.y)
        if isinstance(data, Rounds):
            known = self.classes if self.classes is not None and self.engine.rounds() else seen
        else:
            known = self.classes if self.classes is not None else seen
        new = np.setdiff1d(seen, known)
        if len(new):
            raise ValueError(
                f"{what} y has classes {new.tolist()} that {name} was not trained with (its "
                f"classes are {np.asarray(known).tolist()}). Trees cannot add classes; fit "
                "with mode='restart' on data with every class."
            )
        if isinstance(data, Rounds) and len(known) < 2:
            raise ValueError(
                f"{what} y has one class ({known.tolist()}); a classifier needs two or more."
            )
        if not isinstance(data, Rounds):
            return
        problem = self.engine.classes_problem(np.asarray(known))
        if problem is not None:
            raise ValueError(f"{what} {problem}")
        try:
            self.engine.for_classes(len(known))
        except ValueError as err:
            raise ValueError(f"{what} {err}") from None

    def batches(
        self, data: Any, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        if offset == 0:
            yield data

    # -- training ----------------------------------------------------------------------
    def train_mode(self, training: bool) -> None:
        pass

    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)

    def learning_rate(self) -> float:
        return self.lr

    def train_step(self, batch: Any) -> Any:
        data: Rounds = batch
        if self.classifier and (self.classes is None or not self.engine.rounds()):
            self.classes = np.unique(data.y)
            self._publish()
        if data.matrix is None:
            y = self._encoded(data.y) if self.classifier else data.y
            self.engine.configure(None if self.classes is None else len(self.classes))
            data.matrix = self.engine.matrix(data.x, y)
        r = self.engine.rounds()
        loss = self.engine.boost_round(data, r, self.round_seed(r), self.lr)
        return loss

    def _encoded(self, y: np.ndarray) -> np.ndarray:
        assert self.classes is not None
        return np.searchsorted(self.classes, y).astype(np.float64)

    def end_epoch(self) -> None:
        self._publish()

    def read_losses(self, handles: list[Any]) -> np.ndarray | None:
        if not handles or any(h is None for h in handles):
            return None
        return np.asarray(handles, dtype=np.float64)

    def _publish(self) -> None:
        """Make the user's model object hold the current trees."""
        self.engine.publish(self.model, self.classes)

    def evaluate(self, data: Any, batch_size: int) -> dict[str, float]:
        if self.engine.rounds() == 0:
            raise ValueError(
                f"{type(self.model).__name__} has no trees yet: fit it before evaluating."
            )
        prob = self.engine.raw_predict(data.x)
        y = data.y
        out: dict[str, float] = {}
        if self.classifier:
            assert self.classes is not None
            yi = np.searchsorted(self.classes, y)
            out["loss"] = loss_value(self.engine.loss_name(), yi, prob)
            pred = self._labels(prob)
            out["accuracy"] = float(np.mean(pred == y))
        else:
            pred = prob
            out["loss"] = loss_value(self.engine.loss_name(), y, prob)
        for name, fn in self.metrics.items():
            out[name] = float(fn(y, pred))
        return out

    def _labels(self, prob: np.ndarray) -> np.ndarray:
        assert self.classes is not None
        idx = prob.argmax(axis=1) if prob.ndim == 2 else (prob > 0.5).astype(np.int64)
        return self.classes[idx]

    def predict(self, x: Any, batch_size: int) -> Any:
        xa, _ = self._arrays(x, None, what="predict:")
        if self.engine.rounds() == 0:
            raise ValueError(
                f"{type(self.model).__name__} has no trees yet: fit it before predicting."
            )
        self.check_data(EvalData(xa, None), with_target=False, what="predict:")
        prob = self.engine.raw_predict(xa)
        return self._labels(prob) if self.classifier else prob

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities (rows, classes), in the order of ``classes``."""
        xa, _ = self._arrays(x, None, what="predict_proba:")
        prob = self.engine.raw_predict(xa)
        return prob if prob.ndim == 2 else np.stack([1 - prob, prob], axis=1)

    # -- state -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        if self.engine.rounds() == 0:
            return {"model/booster": np.zeros(0, dtype=np.uint8)}
        return {"model/booster": np.frombuffer(self.engine.to_bytes(), dtype=np.uint8)}

    def state_meta(self) -> dict[str, Any]:
        return {
            "library": self.engine.library,
            "rounds": self.engine.rounds(),
            "classes": None if self.classes is None else self.classes.tolist(),
            "learning_rate": self.lr,
        }

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("library") != self.engine.library:
            raise StateMismatchError(
                f"the checkpoint holds a {meta.get('library')} model, this Trainer trains a "
                f"{self.engine.library} model. Resume it with the library that wrote it."
            )
        classes = meta.get("classes")
        if self.classifier and classes is None and int(meta.get("rounds", 0)):
            raise StateMismatchError(
                "the checkpoint's classifier has trees but no classes: its state is malformed."
            )
        lr = meta.get("learning_rate")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr):
            raise StateMismatchError(f"learning_rate must be a finite number: {lr!r}")
        self.classes = None if classes is None else np.asarray(classes)
        self.engine.configure(None if self.classes is None else len(self.classes))
        self.load_weights(tensors)
        if self.engine.rounds() != int(meta.get("rounds", -1)):
            raise StateMismatchError(
                f"the checkpoint's booster has {self.engine.rounds()} rounds, its record "
                f"says {meta.get('rounds')!r}: the checkpoint is inconsistent."
            )
        self.lr = float(lr)

    def load_weights(self, tensors: Mapping[str, np.ndarray], dtypes: Any = None) -> None:
        """Make the booster the one in ``tensors['model/booster']`` (empty: no trees)."""
        if "model/booster" not in tensors:
            raise StateMismatchError(
                "the checkpoint has no 'model/booster' entry: it was not written by the "
                f"{self.engine.library} backend. Resume it with the backend that wrote it."
            )
        blob = np.asarray(tensors["model/booster"], dtype=np.uint8).tobytes()
        if blob:
            self.engine.from_bytes(blob)
        else:
            self.engine.reset()
        self._publish()

    def describe(self) -> dict[str, Any]:
        params = {k: jsonable(v) for k, v in self.engine.given.items() if k != self.engine.lr_key}
        return {
            "framework": self.engine.library,
            "model": type(self.model).__name__,
            "params": params,
            "random_state": self.random_state,
        }
