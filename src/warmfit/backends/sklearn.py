"""scikit-learn backend: estimators that learn through ``partial_fit`` or grow by rounds.

Two kinds of estimator, one contract (``docs/sklearn.md``):

- **partial_fit estimators** (SGD*, Perceptron, PassiveAggressive*, MLP*, the naive Bayes
  family, MiniBatchKMeans, IncrementalPCA, ...): one epoch is one pass of ``partial_fit``
  over warmfit's seeded batches, one call per batch (``classes=`` on the first call).
- **round estimators** (RandomForest*/ExtraTrees*, GradientBoosting*,
  HistGradientBoosting*, Bagging*): one round (one epoch of the loop, one step) is one
  ``fit`` with ``warm_start=True`` that grows ``estimators_per_round`` more estimators
  (``n_estimators``; ``max_iter`` for HistGradientBoosting).

Internal stopping rules: an estimator whose own early stopping (or another rule of its
``fit`` that watches the loss: SGD's and MLP's ``learning_rate='adaptive'``) warmfit's loop
would silently change is refused before anything changes, by :meth:`SklearnBackend.check_data`
(see :func:`_stopping_rule` and ``docs/sklearn.md``); the message names the parameter to set
and points to ``warmfit.EarlyStopping`` / ``warmfit.ReduceLROnPlateau``.

Owns: the estimator, its modes (``warm`` resets SGD's ``t_``/averages and MLP's
optimizer; round estimators and estimators without optimizer state refuse ``warm``),
and its state, which travels as one array: the estimator in skops' secure format
(``model/skops``, uint8). Loading never unpickles; only skops' default-trusted types and
:data:`TRUSTED_TYPES` are accepted. The dump is canonical (object ids renumbered, no
identity for immutable values, padding bytes zeroed, fixed zip timestamps), so equal
estimators give identical bytes.

Pipelines (``sklearn_pipeline.py``): a ``Pipeline`` trains its final step as above, on
the rows its transformers (every other step) give; they are fitted on the training rows
at the start of a run (the first call, every ``restart``) and kept by ``continue`` and
``warm``, unless ``refit_transformers='new_data'``. Everything said here of "the
estimator" (modes, stopping rules, rounds) is said of the final step; the state is the
whole Pipeline, one skops entry, and ``model/transformers_data`` (the fingerprint of the
rows its transformers were fitted on).

Randomness: an estimator draws from its ``random_state``. An int or a RandomState
instance is part of the estimator (and of its skops state); ``None`` means NumPy's global
generator, which the Trainer swaps for its own seeded stream during fit. Forests and
Bagging re-draw their tree seeds on every warm-start ``fit``; for them a non-int
``random_state`` is replaced, for the duration of each round, by a generator rebuilt
from a fixed state, so that rounds add up exactly.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..data import fingerprint
from ..errors import CheckpointError, StateMismatchError
from ..state import derive_seed
from .base import Backend, jsonable, named_metrics
from .sklearn_pipeline import (
    REFIT_CHOICES,
    adopt,
    check_pipeline,
    dataframe_refusal,
    describe_params,
    final_step,
    fit_transformers,
    head,
    install,
    is_dataframe,
    is_pipeline,
    n_features_in,
    seeded_global_stream,
    signature,
    transform,
)

#: Types beyond skops' defaults that a checkpoint may contain. Anything else is refused.
TRUSTED_TYPES = [
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ArrayData:
    """Training rows as numpy arrays; ``len`` is the number of rows. ``xt``: for a
    Pipeline, the rows its transformers give (set by the call's preflight)."""

    def __init__(self, x: Any, y: np.ndarray | None) -> None:
        self.x, self.y = x, y
        self.xt: Any = None

    @property
    def rows(self) -> Any:
        """What the estimator that trains (a Pipeline's final step) is fitted on."""
        return self.x if self.xt is None else self.xt

    def __len__(self) -> int:
        return self.x.shape[0]


class RoundData(ArrayData):
    """The whole data set as one indivisible unit: a round fits on all of it, so its
    length (the Trainer's samples per epoch) is 1 and one epoch is one step."""

    def __len__(self) -> int:
        return 1


def _ensemble_key(est: Any) -> str | None:
    """``"n_estimators"``/``"max_iter"`` for estimators that grow with warm_start."""
    from sklearn.ensemble import BaseEnsemble
    from sklearn.ensemble._gb import BaseGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import (
        BaseHistGradientBoosting,
    )

    if isinstance(est, BaseHistGradientBoosting):
        return "max_iter"
    if isinstance(est, (BaseGradientBoosting, BaseEnsemble)) and "warm_start" in est.get_params():
        return "n_estimators"
    return None


#: scikit-learn's threshold for ``HistGradientBoosting*(early_stopping='auto')``: early
#: stopping is on when the training data has more rows than this.
HIST_GB_AUTO_ROWS = 10_000

_INSTEAD = "use warmfit.EarlyStopping(...) with validation_data=(x_val, y_val) instead."
_INSTEAD_LR = (
    "use warmfit.ReduceLROnPlateau(factor=0.2, ...) with validation_data=(x_val, y_val) instead."
)


def _stopping_rule(est: Any, kind: str, n_rows: int, step: str = "") -> str | None:
    """Why warmfit would silently change ``est``'s own stopping rule (the refusal message),
    or ``None`` when there is none to change. ``kind`` is how warmfit drives it
    (``"rounds"`` or ``"partial_fit"``), ``n_rows`` the training rows a round fits on,
    ``step`` the name of the Pipeline step ``est`` is (its parameters are then named
    ``<step>__...``, and the message names the step), or ``""`` for a bare estimator.

    - Round estimators grow by one warm-start ``fit`` a round; a stop inside one round
      does not stop the next. Refused: ``HistGradientBoosting*`` with early stopping on
      (``early_stopping=True``, or ``'auto'`` above :data:`HIST_GB_AUTO_ROWS` rows, as
      scikit-learn decides), ``GradientBoosting*`` with ``n_iter_no_change`` set. Forests,
      ExtraTrees and Bagging have no such rule (Bagging's own estimators are each fitted
      whole by a plain ``fit``, as without warmfit: their rules apply unchanged).
    - partial_fit estimators: the rules of ``fit`` (``max_iter``/``tol``/
      ``n_iter_no_change`` convergence, ``early_stopping``) are not part of
      ``partial_fit``. Defaults that merely go unused are not refused (warmfit's
      ``epochs`` take ``max_iter``'s place); a rule the user turned on is:
      ``early_stopping=True`` (SGD*, Perceptron, PassiveAggressive*, MLP*) and
      ``learning_rate='adaptive'`` (SGD*; MLP* with ``solver='sgd'``). The estimators a
      meta-estimator drives through its ``partial_fit`` (``MultiOutput*``,
      ``OneVsRest``/``OneVsOne``, ``SelectFromModel``) are judged the same way.
    """
    path, owner = (f"{step}__", f"the final step {step!r} of the Pipeline") if step else ("", "")
    where = f", {owner}," if step else ""
    if kind == "rounds":
        return _round_rule(est, n_rows, path, where)
    return _partial_fit_rule(est, path, owner or type(est).__name__, where)


def _round_rule(est: Any, n_rows: int, path: str, where: str) -> str | None:
    from sklearn.ensemble._gb import BaseGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import (
        BaseHistGradientBoosting,
    )

    name = type(est).__name__
    grows = (
        "but warmfit grows it round by round (each round a warm-start fit with {key} raised "
        "by estimators_per_round), and a stop inside one round does not stop the next: "
        "training would silently go on."
    )
    if isinstance(est, BaseHistGradientBoosting):
        es = est.early_stopping
        auto = isinstance(es, str) and es == "auto"
        if (auto and n_rows > HIST_GB_AUTO_ROWS) or (not auto and bool(es)):
            rows = (
                f" (scikit-learn turns it on above {HIST_GB_AUTO_ROWS} training rows; this "
                f"fit has {n_rows})"
                if auto
                else ""
            )
            return (
                f"{name}(early_stopping={es!r}){where} stops early{rows}: it stops adding "
                f"iterations once its score stops improving, {grows.format(key='max_iter')} "
                f"Set {path}early_stopping=False and {_INSTEAD}"
            )
    elif isinstance(est, BaseGradientBoosting) and est.n_iter_no_change is not None:
        return (
            f"{name}(n_iter_no_change={est.n_iter_no_change!r}){where} stops early: it stops "
            f"adding estimators once its validation score stops improving, "
            f"{grows.format(key='n_estimators')} Set {path}n_iter_no_change=None and {_INSTEAD}"
        )
    return None


def _partial_fit_rule(est: Any, path: str, owner: str, where: str) -> str | None:
    """The rule of ``est`` (or of an estimator it drives) that ``partial_fit`` would
    silently change; ``path`` is its parameter prefix in the estimator the Trainer trains,
    ``owner`` names ``est`` (its class, or its place in that estimator) and ``where`` is
    the phrase the message puts after its class (empty for the estimator itself)."""
    from sklearn.base import BaseEstimator
    from sklearn.linear_model._stochastic_gradient import BaseSGD
    from sklearn.neural_network._multilayer_perceptron import BaseMultilayerPerceptron

    name = type(est).__name__
    how = f"warmfit trains {name} with partial_fit (one call per batch)"
    if isinstance(est, BaseSGD):
        if getattr(est, "early_stopping", False):
            return (
                f"{name}(early_stopping=True){where} stops early only in fit; {how}, where "
                "scikit-learn never stops early (it refuses early_stopping=True on the first "
                "call and on later calls only holds validation_fraction of each batch out of "
                f"training). Set {path}early_stopping=False and {_INSTEAD}"
            )
        if getattr(est, "learning_rate", None) == "adaptive":
            return (
                f"{name}(learning_rate='adaptive'){where} divides its step size by 5 whenever "
                f"its loss stops improving by tol, a rule of fit; {how}, where that never "
                "happens: the step size would silently stay eta0. Set "
                f"{path}learning_rate='constant' and {_INSTEAD_LR}"
            )
    if isinstance(est, BaseMultilayerPerceptron):
        if est.early_stopping:
            return (
                f"{name}(early_stopping=True){where} stops early only in fit; {how}, which "
                "scikit-learn refuses with early_stopping=True. Set "
                f"{path}early_stopping=False and {_INSTEAD}"
            )
        if est.solver == "sgd" and est.learning_rate == "adaptive":
            return (
                f"{name}(solver='sgd', learning_rate='adaptive'){where} divides its step size "
                "by 5 whenever its training loss stops improving by tol over n_iter_no_change "
                f"epochs, a rule of fit; {how}, where the rule would count batches and compare "
                f"batch losses instead: silently another rule. Set {path}learning_rate="
                f"'constant' and {_INSTEAD_LR}"
            )
    for key, value in est.get_params(deep=False).items():
        if isinstance(value, BaseEstimator):  # a meta-estimator's partial_fit drives it
            inner = f"the {key} of {owner}"
            found = _partial_fit_rule(value, f"{path}{key}__", inner, f", {inner},")
            if found is not None:
                return found
    return None


def _reseeds_each_fit(est: Any) -> bool:
    """Forests and Bagging draw their seeds from ``check_random_state(random_state)`` on
    every warm-start fit (skipping one draw per existing estimator)."""
    from sklearn.ensemble import BaseEnsemble
    from sklearn.ensemble._gb import BaseGradientBoosting

    return isinstance(est, BaseEnsemble) and not isinstance(est, BaseGradientBoosting)


class SklearnBackend(Backend):
    framework = "sklearn"

    def __init__(
        self,
        model: Any,
        *,
        device: str = "cpu",
        optimizer: Any = None,
        loss: Any = None,
        metrics: Any = (),
        num_workers: int = 0,
        estimators_per_round: int = 1,
        refit_transformers: str | None = None,
        step: Any = None,
    ) -> None:
        name = type(model).__name__
        if step is not None:
            raise ValueError(
                "The 'step' parameter of Trainer is for torch models only: a scikit-learn "
                f"estimator trains with its own partial_fit or fit (set {name}'s parameters "
                f"instead). Got step={step!r}."
            )
        if optimizer is not None or loss is not None:
            given = [n for n, v in (("optimizer", optimizer), ("loss", loss)) if v is not None]
            raise TypeError(
                f"{name} is a scikit-learn estimator: it has its own optimizer and loss (set "
                f"them through its parameters, e.g. {name}(learning_rate_init=...)). Do not pass "
                f"{' or '.join(repr(g) for g in given)} to Trainer."
            )
        if str(device) != "cpu":
            raise ValueError(
                f"The 'device' parameter of Trainer must be 'cpu' for scikit-learn estimators. "
                f"Got {device!r} instead."
            )
        if num_workers:
            raise ValueError(
                "The 'num_workers' parameter of Trainer has no meaning for scikit-learn "
                f"estimators (use the estimator's n_jobs). Got {num_workers!r} instead."
            )
        if (
            isinstance(estimators_per_round, bool)
            or not isinstance(estimators_per_round, int)
            or (estimators_per_round < 1)
        ):
            raise ValueError(
                "The 'estimators_per_round' parameter of SklearnBackend must be an int >= 1. "
                f"Got {estimators_per_round!r} instead."
            )
        self.pipeline = is_pipeline(model)
        if refit_transformers is not None and not self.pipeline:
            raise ValueError(
                "The 'refit_transformers' parameter of SklearnBackend is for a Pipeline's "
                f"transformers; {name} is not a Pipeline. Remove it."
            )
        if refit_transformers is not None and refit_transformers not in REFIT_CHOICES:
            raise ValueError(
                "The 'refit_transformers' parameter of SklearnBackend must be one of "
                f"{{{', '.join(map(repr, REFIT_CHOICES))}}}. Got {refit_transformers!r} "
                "instead."
            )
        if self.pipeline:
            check_pipeline(model)
        self.model = model
        self.refit_transformers = refit_transformers or "restart"
        final = self.final
        self.round_key = _ensemble_key(final)
        if self.round_key is None and not hasattr(final, "partial_fit"):
            who = self._who
            raise TypeError(
                f"{who[0].upper()}{who[1:]} has no partial_fit and does not grow with "
                "warm_start, so warmfit "
                "cannot give its fit calls a continue/warm/restart meaning. Supported: "
                "estimators with partial_fit (SGDClassifier, MLPClassifier, GaussianNB, "
                "MiniBatchKMeans, IncrementalPCA, ...) and RandomForest/ExtraTrees, "
                "GradientBoosting, HistGradientBoosting and Bagging estimators."
            )
        self.kind = "rounds" if self.round_key is not None else "partial_fit"
        if self.kind == "partial_fit" and estimators_per_round != 1:
            raise ValueError(
                f"estimators_per_round={estimators_per_round!r} is for estimators that grow "
                f"by rounds (forests, boosting, bagging); {name} trains with partial_fit, "
                "one call per batch. Remove estimators_per_round."
            )
        self.estimators_per_round = estimators_per_round
        self.metrics = _resolve_metrics(metrics)
        self.classes: np.ndarray | None = None
        self._pristine: Any = None
        self._round_rng: Any = None
        self._fresh = True
        self._pending_warm = False
        self._global_rng_attrs: list[str] = []
        self._global_rng_paths: list[list[list[Any]]] = []
        # A Pipeline: the fingerprint of the rows its transformers were fitted on (None:
        # not fitted in this run), and those fitted by a call's preflight, with that
        # fingerprint, for its first step to install.
        self._transformers_data: str | None = None
        self._staged: tuple[list[Any], str] | None = None

    @property
    def final(self) -> Any:
        """The estimator that trains: the model, or a Pipeline's final step."""
        return final_step(self.model)[1] if self.pipeline else self.model

    @property
    def _pristine_final(self) -> Any:
        return final_step(self._pristine)[1] if self.pipeline else self._pristine

    @property
    def _step(self) -> str:
        """The name of a Pipeline's final step ("" for a bare estimator)."""
        return final_step(self.model)[0] if self.pipeline else ""

    @property
    def _who(self) -> str:
        """The estimator that trains, as messages name it."""
        name = type(self.final).__name__
        return f"the Pipeline's final step {self._step!r} ({name})" if self.pipeline else name

    # -- modes ---------------------------------------------------------------------
    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this estimator can honour."""
        if self.kind == "partial_fit" and self._optimizer_kind() is not None:
            return ("continue", "warm", "restart")
        return ("continue", "restart")

    def _optimizer_kind(self) -> str | None:
        from sklearn.linear_model._stochastic_gradient import BaseSGD
        from sklearn.neural_network._multilayer_perceptron import BaseMultilayerPerceptron

        if isinstance(self.final, BaseSGD):
            return "sgd"
        if isinstance(self.final, BaseMultilayerPerceptron):
            return "mlp"
        return None

    def check_mode(self, mode: str) -> None:
        """Refuse a mode this estimator cannot honour (before anything changes)."""
        self._check_supported(mode)

    def _check_supported(self, mode: str) -> None:
        if mode not in self.modes:
            why = (
                "it grows by rounds and has no optimizer state to reset"
                if self.kind == "rounds"
                else "its partial_fit state is sufficient statistics, not weights plus an optimizer"
            )
            raise ValueError(
                f"mode={mode!r} is not supported for {self._who}: {why}. "
                f"Supported modes: {self.modes}."
            )

    # -- construction, warm and restart --------------------------------------------
    def init_model(self, seed: int, *, first: bool) -> None:
        from sklearn.base import clone

        self.seed = seed
        if first:
            self._pristine = clone(self.model)
        else:
            adopt(self.model, clone(self._pristine))
        self.classes = None
        self._transformers_data = None  # a Pipeline's are fitted by the run's first call
        pristine = self._pristine_final
        rs: Any = pristine.random_state if hasattr(pristine, "random_state") else 0
        if self.kind == "rounds" and _reseeds_each_fit(self.final) and not _is_int(rs):
            base = (
                np.random.RandomState(derive_seed(seed, "init", 1) % (1 << 32))
                if rs is None
                else rs
            )
            self._round_rng = base.get_state(legacy=True)
        else:
            self._round_rng = None
        self._fresh = True

    def init_optimizer(self, schedule: Any) -> None:
        if schedule is not None and not callable(schedule):
            raise TypeError(f"A schedule must be a function of the global step. Got {schedule!r}.")
        if self._fresh:  # right after init_model: nothing to reset
            self._fresh = False
            return
        self._check_supported("warm")
        self._pending_warm = True  # applied by batches(), once the data is checked

    def _factory_lr(self) -> tuple[str, Any] | None:
        """The estimator's own learning-rate parameter and its constructor value (what a
        warm call's fresh optimizer starts from, as torch's factory; warmfit's schedule
        and ReduceLROnPlateau write the parameter while training), or None."""
        kind = self._optimizer_kind()
        name = "eta0" if kind == "sgd" else "learning_rate_init" if kind == "mlp" else None
        return None if name is None else (name, getattr(self._pristine_final, name))

    def _reset_optimizer(self) -> None:
        self._pending_warm = False
        est = self.final
        factory = self._factory_lr()
        if factory is not None:
            setattr(est, *factory)  # the rate warmfit wrote is the old optimizer's
        if self._optimizer_kind() == "sgd" and hasattr(est, "coef_"):
            # What SGD's own warm-start fit resets: the step counter and the averages.
            est.t_ = 1.0
            if est.average and getattr(est, "_standard_coef", None) is not None:
                est.coef_, est.intercept_ = est._standard_coef, est._standard_intercept
                est._average_coef = np.zeros_like(est.coef_)
                est._average_intercept = np.zeros_like(est.intercept_)
        elif self._optimizer_kind() == "mlp" and hasattr(est, "_optimizer"):
            del est._optimizer  # rebuilt by the next partial_fit (fresh Adam moments)

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        return {}  # estimators draw from random_state or NumPy's global (host) stream

    def capture_rng(self) -> dict[str, np.ndarray]:
        return {}

    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        pass

    # -- data ------------------------------------------------------------------------
    def prepare(self, x: Any, y: Any) -> ArrayData:
        name = type(self.model).__name__
        self._pending_warm = False  # a warm call that failed its data check is over
        self._staged = None  # so are transformers fitted for a call that was refused
        if self.pipeline and is_dataframe(x):
            raise dataframe_refusal("x")
        xa = x if _is_sparse(x) else np.asarray(x)
        if xa.ndim != 2:
            raise ValueError(
                f"x must be a 2-D array (samples, features) for {name}. Got shape {xa.shape}."
            )
        if xa.shape[0] == 0:
            raise ValueError("x has no samples: nothing to train on.")
        if not _is_sparse(xa) and (xa.dtype == object or xa.dtype.kind in "USV"):
            hint = (
                " Encode string categories as integer codes (np.unique(column, "
                "return_inverse=True)) and let a OneHotEncoder inside the Pipeline one-hot them."
                if self.pipeline
                else ""
            )
            raise TypeError(f"x must be numeric for {name}. Got dtype {xa.dtype}.{hint}")
        ya = None if y is None else np.asarray(y)
        if ya is not None and len(ya) != xa.shape[0]:
            raise ValueError(
                f"x and y must have the same number of samples. Got {xa.shape[0]} rows in x "
                f"and {len(ya)} in y."
            )
        from sklearn.base import is_classifier

        if is_classifier(self.final) and self.kind == "partial_fit" and ya is None:
            raise ValueError(f"{name} is a classifier: pass the labels y.")
        cls = RoundData if self.kind == "rounds" else ArrayData
        return cls(xa, ya)

    def _check_training_data(self, data: ArrayData) -> None:
        """Before the first step of a call (after the mode is applied): the estimator can
        go on with these features and classes (:meth:`_known_classes`), which it is
        given on its first ``partial_fit``. Nothing has changed yet when it raises."""
        self.classes = self._known_classes(data)

    def _known_classes(self, data: ArrayData) -> np.ndarray | None:
        """Refuse features and classes the estimator that trains cannot go on with (for a
        Pipeline also in its preflight, so before anything changes); else its classes
        (None where it has none), changing nothing."""
        from sklearn.base import is_classifier

        self._known_features(data)
        est, name = self.final, self._who
        if not is_classifier(est) or data.y is None:
            return self.classes
        seen = np.unique(data.y)
        known = getattr(est, "classes_", None)
        if known is None:
            known = self.classes if self.classes is not None else seen
        new = np.setdiff1d(seen, known)
        if len(new):
            raise ValueError(
                f"y has classes {new.tolist()} that {name} was not trained with (its classes "
                f"are {np.asarray(known).tolist()}). partial_fit cannot add classes; fit with "
                "mode='restart' on data with every class."
            )
        return np.asarray(known)

    def _known_features(self, data: ArrayData) -> None:
        """Refuse rows whose number of features is not the one the estimator that trains
        was trained on."""
        est, name = self.final, self._who
        n_in, width = getattr(est, "n_features_in_", None), data.rows.shape[1]
        if n_in is not None and width != n_in and self.pipeline:
            again = (
                " again on this call's data (refit_transformers='new_data')"
                if self.refit_transformers == "new_data"
                else " on this call's data"
            )
            raise ValueError(
                f"The Pipeline's transformers, fitted{again}, turn x into {width} features, "
                f"but {name} was trained on {n_in}. Make the transformers give the same "
                "features (e.g. OneHotEncoder(categories=[...]) listing every category), or "
                "fit with mode='restart'."
            )
        if n_in is not None and width != n_in:
            raise ValueError(
                f"x has {width} features, but {name} was trained on {n_in}. Pass "
                "data with the same features, or fit with mode='restart'."
            )

    def preflight(
        self,
        mode: str,
        data: Any,
        val_data: Any,
        *,
        batch_size: int,
        schedule: Any,
        sets_lr: bool,
    ) -> None:
        """:meth:`Backend.preflight`, and: refuse an estimator whose own stopping rule
        warmfit's loop would silently change (:func:`_stopping_rule`). The estimator judged
        is the one this call trains: the current one, or for ``mode='restart'`` the fresh
        clone it starts from. The decision depends only on its parameters and the number
        of training rows, so a resumed run decides as the straight run did.

        A Pipeline's transformers are made ready here (:meth:`_stage_transformers`): the
        rows the final step trains on are computed once for the call, and every refusal
        (data they cannot transform, features the final step was not trained on) comes
        before anything changes."""
        super().preflight(
            mode, data, val_data, batch_size=batch_size, schedule=schedule, sets_lr=sets_lr
        )
        restart = mode == "restart" and self._pristine is not None
        est = self._pristine_final if restart else self.final
        why = _stopping_rule(est, self.kind, data.x.shape[0], self._step)
        if why is not None:
            raise ValueError(why)
        if self.pipeline:
            self._stage_transformers(data, val_data, restart=restart)
            if not restart and self.kind == "partial_fit":  # a restart: a fresh final step
                self._known_classes(data)
            elif not restart:  # a round estimator: its features (classes are its own)
                self._known_features(data)

    def _stage_transformers(self, data: ArrayData, val_data: Any, *, restart: bool) -> None:
        """The transformers this call trains with, and the rows they give (``data.xt``).
        Fitted anew (clones, installed by the call's first step) at the start of a run —
        the first call, or ``restart``, from the Trainer's pristine clone — and, with
        ``refit_transformers='new_data'``, when this call's training rows are not those
        they were fitted on; else the fitted ones are kept. Fitting and transforming run
        under a NumPy stream derived from the seed (the caller's is put back)."""
        fp = self.fingerprint(data)[0]
        source = self._pristine if restart else self.model
        refit = (
            restart
            or self._transformers_data is None
            or (self.refit_transformers == "new_data" and fp != self._transformers_data)
        )
        fitted: list[Any] = []
        with seeded_global_stream(self.seed):
            if refit:
                fitted, data.xt = fit_transformers(head(source), data.x, data.y)
                steps = [(n, s) for (n, _), s in zip(head(source), fitted, strict=True)]
            else:
                n_in = n_features_in(self.model)
                if n_in is not None and data.x.shape[1] != n_in:
                    raise ValueError(
                        f"x has {data.x.shape[1]} features, but the Pipeline's transformers "
                        f"were fitted on {n_in}. Pass data with the same features, or fit "
                        "with mode='restart'."
                    )
                steps = head(self.model)
                data.xt = transform(steps, data.x, "this call's training data")
            if val_data is not None:
                transform(steps, val_data.x, "the validation data")
        self._staged = (fitted, fp) if refit else None

    def _install_transformers(self) -> None:
        """Put the transformers a call's preflight fitted into the Pipeline (its first
        step; after the mode, so after a restart's fresh clone)."""
        if self._staged is not None:
            fitted, fp = self._staged
            install(self.model, fitted)
            self._transformers_data, self._staged = fp, None

    def check_validation_split(self, data: Any) -> None:
        if isinstance(data, RoundData):
            self.subset(data, np.zeros(0, dtype=np.int64))

    def subset(self, data: Any, rows: np.ndarray) -> Any:
        if isinstance(data, RoundData):
            raise ValueError(
                f"validation_split is not available for {self._who}: a round fits on the "
                "whole data at once. Pass validation_data=(x_val, y_val)."
            )
        return ArrayData(data.x[rows], None if data.y is None else data.y[rows])

    def fingerprint(self, data: Any) -> tuple[str, list[int]]:
        x = data.x.toarray() if _is_sparse(data.x) else data.x
        return fingerprint(x, data.y), list(data.x.shape)

    def batches(
        self, data: Any, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        if isinstance(data, RoundData):
            self._install_transformers()
            if offset == 0:
                yield (data.rows, data.y)
            return
        self._check_training_data(data)
        self._install_transformers()
        if self._pending_warm:
            self._reset_optimizer()
        x, y = data.rows, data.y
        for start in range(offset, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield (x[idx], None if y is None else y[idx])

    # -- training --------------------------------------------------------------------
    def train_mode(self, training: bool) -> None:
        pass

    def learning_rate(self) -> float:
        """The step size the estimator would use next (nan if it has none)."""
        est, kind = self.final, self._optimizer_kind()
        factory = self._factory_lr() if self._pending_warm else None  # after the reset
        if kind == "sgd":
            t = 1.0 if self._pending_warm else getattr(est, "t_", 1.0)
            eta0 = est.eta0 if factory is None else factory[1]
            if est.learning_rate == "optimal":
                return float("nan")  # needs sklearn's private optimal_init; not reported
            if est.learning_rate == "invscaling":
                return float(eta0 / math.pow(t, est.power_t))
            return float(eta0)
        if kind == "mlp":
            opt = getattr(est, "_optimizer", None)
            if factory is not None:
                return float(factory[1])
            if est.solver == "sgd" and opt is not None:
                return float(opt.learning_rate)
            return float(est.learning_rate_init)
        lr = getattr(est, "learning_rate", None)
        return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else math.nan

    def set_learning_rate(self, lr: float) -> None:
        est, kind = self.final, self._optimizer_kind()
        if kind == "sgd" and est.learning_rate == "constant":
            est.eta0 = lr
        elif kind == "mlp" and est.solver in ("adam", "sgd"):
            est.learning_rate_init = lr
            opt = getattr(est, "_optimizer", None)
            if opt is not None:
                opt.learning_rate_init = lr
                opt.learning_rate = lr
        else:
            raise ValueError(
                f"A warmfit schedule or ReduceLROnPlateau needs a learning rate it can set; "
                f"{self._who} has none warmfit can set (SGD estimators need "
                "learning_rate='constant'; MLP estimators need solver='adam' or 'sgd'). "
                "Use the estimator's own schedule instead."
            )

    def train_step(self, batch: Any) -> Any:
        xb, yb = batch
        if self.kind == "rounds":
            self._grow(xb, yb)
            return None
        est = self.final
        kwargs = {}
        if self.classes is not None and not hasattr(est, "classes_"):
            kwargs["classes"] = self.classes
        if yb is None:
            est.partial_fit(xb, **kwargs)
        else:
            est.partial_fit(xb, yb, **kwargs)
        loss = getattr(est, "loss_", None)  # MLP: the loss of this batch, already computed
        return float(loss) if loss is not None else None

    def _grow(self, x: Any, y: Any) -> None:
        est, key = self.final, self.round_key
        assert key is not None
        if key == "max_iter":
            done = getattr(est, "n_iter_", 0)
        elif hasattr(est, "estimators_"):
            done = est.n_estimators_ if hasattr(est, "n_estimators_") else len(est.estimators_)
        else:
            done = 0
        saved = {"warm_start": est.warm_start, "random_state": est.random_state}
        params: dict[str, Any] = {"warm_start": True, key: done + self.estimators_per_round}
        if self._round_rng is not None:
            rng = np.random.RandomState()
            rng.set_state(self._round_rng)
            params["random_state"] = rng
        est.set_params(**params)
        try:
            est.fit(x, y)
        finally:
            est.set_params(**saved)

    def end_epoch(self) -> None:
        pass

    def read_losses(self, handles: list[Any]) -> np.ndarray | None:
        if not handles or any(h is None for h in handles):
            return None
        return np.asarray(handles, dtype=np.float64)

    def evaluate(self, data: Any, batch_size: int) -> dict[str, float]:
        from sklearn import metrics as skm
        from sklearn.base import is_classifier, is_regressor

        est, x, y = self.model, data.x, data.y
        if self.pipeline and (y is None or not (is_classifier(est) or is_regressor(est))):
            # A transformer or a clusterer last: its own score, on the rows it sees.
            est, x = self.final, transform(head(self.model), x, "the evaluation data")
        out: dict[str, float] = {}
        if is_classifier(est) and y is not None:
            pred = est.predict(x)
            if hasattr(est, "predict_proba"):
                out["loss"] = float(skm.log_loss(y, est.predict_proba(x), labels=est.classes_))
            else:
                out["loss"] = float(skm.zero_one_loss(y, pred))
            out["accuracy"] = float(skm.accuracy_score(y, pred))
        elif is_regressor(est) and y is not None:
            pred = est.predict(x)
            out["loss"] = float(skm.mean_squared_error(y, pred))
        elif hasattr(est, "inverse_transform"):  # IncrementalPCA: reconstruction error
            pred = None
            rec = est.inverse_transform(est.transform(x))
            out["loss"] = float(np.mean((np.asarray(x) - rec) ** 2))
        else:  # clusterers: mean distance to the closest centre, squared
            pred = est.predict(x) if hasattr(est, "predict") else None
            out["loss"] = float(-est.score(x) / x.shape[0])
        for name, fn in self.metrics.items():
            out[name] = float(fn(y, pred))
        return out

    def predict(self, x: Any, batch_size: int) -> Any:
        if self.pipeline and is_dataframe(x):
            raise dataframe_refusal("x")
        est = self.model
        return est.predict(x) if hasattr(est, "predict") else est.transform(x)

    # -- state -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        # An attribute holding NumPy's global generator (random_state=None: MLP's and
        # MiniBatchKMeans' ``_random_state``) is stored as None and restored as the global
        # generator, which the Trainer's host stream drives; a copy would diverge. So is
        # one of a sub-estimator (GradientBoosting's trees get its ``_rng`` as their
        # ``random_state``): as a copy, the loaded trees would hold another generator than
        # the trees grown after the load, and the dump would not be the straight run's.
        est = self.model
        glob = np.random.mtrand._rand
        refs = _global_rng_refs(est, glob)
        self._global_rng_attrs = sorted(p[0][1] for p in refs if len(p) == 1)
        self._global_rng_paths = [p for p in refs if len(p) > 1]
        for path in refs:
            _set_at(est, path, None)
        try:
            blob = dumps(est)
        finally:
            for path in refs:
                _set_at(est, path, glob)
        out = {"model/skops": np.frombuffer(blob, dtype=np.uint8)}
        if self.pipeline:  # what its transformers were fitted on ("" if not yet)
            fitted_on = (self._transformers_data or "").encode()
            out["model/transformers_data"] = np.frombuffer(fitted_on, dtype=np.uint8)
        return out

    def state_meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "estimator": _qualname(self.model),
            **({"steps": signature(self.model)} if self.pipeline else {}),
            "classes": None if self.classes is None else self.classes.tolist(),
            "round_rng": None if self._round_rng is None else _rng_to_json(self._round_rng),
            "global_rng_attrs": list(self._global_rng_attrs),
            "global_rng_paths": [list(p) for p in self._global_rng_paths],
        }

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("estimator") != _qualname(self.model):
            raise StateMismatchError(
                f"the checkpoint holds a {meta.get('estimator')}, this Trainer trains a "
                f"{_qualname(self.model)}. Pass an estimator of the class that wrote it."
            )
        if self.pipeline:
            self._check_steps(meta.get("steps"))
        self._global_rng_attrs = list(meta.get("global_rng_attrs", []))
        self._global_rng_paths = list(meta.get("global_rng_paths", []))
        self.load_weights(tensors)
        classes = meta.get("classes")
        self.classes = None if classes is None else np.asarray(classes)
        rr = meta.get("round_rng")
        self._round_rng = None if rr is None else _rng_from_json(rr)
        self._fresh = False
        self._pending_warm = False
        self._staged = None

    def _check_steps(self, saved: Any) -> None:
        """Refuse a checkpoint's Pipeline whose steps (names, classes) are not this one's."""
        own = signature(self.model)
        if saved != own:
            raise StateMismatchError(
                f"the checkpoint's Pipeline has the steps {saved}, this Trainer's has {own}. "
                "Pass a Pipeline with the steps of the run that wrote the checkpoint."
            )

    def load_weights(self, tensors: Mapping[str, np.ndarray], dtypes: Any = None) -> None:
        """Make the estimator the one stored in ``tensors['model/skops']``."""
        if "model/skops" not in tensors:
            raise StateMismatchError(
                "the checkpoint has no 'model/skops' entry: it was not written by the "
                "scikit-learn backend. Resume it with the backend that wrote it."
            )
        loaded = loads(np.asarray(tensors["model/skops"], dtype=np.uint8).tobytes())
        if type(loaded) is not type(self.model):
            raise StateMismatchError(
                f"the checkpoint holds a {_qualname(loaded)}, this Trainer trains a "
                f"{_qualname(self.model)}. Pass an estimator of the class that wrote it."
            )
        if self.pipeline:
            self._check_steps(signature(loaded))
            if "model/transformers_data" not in tensors:
                raise StateMismatchError(
                    "the checkpoint has no 'model/transformers_data' entry: it holds a Pipeline "
                    "saved without the record of what its transformers were fitted on. Resume "
                    "it with the warmfit that wrote it, or fit with mode='restart'."
                )
            fitted_on = np.asarray(tensors["model/transformers_data"], dtype=np.uint8).tobytes()
            if not re.fullmatch(rb"[0-9a-f]*", fitted_on):
                raise StateMismatchError(
                    f"the checkpoint's 'model/transformers_data' is {fitted_on[:40]!r}, not a "
                    "data fingerprint (hexadecimal digits): the file is damaged. Resume from "
                    "another checkpoint."
                )
        adopt(self.model, loaded)
        if self.pipeline:
            self._transformers_data = fitted_on.decode() or None
        for k in self._global_rng_attrs:
            setattr(self.model, k, np.random.mtrand._rand)
        for path in self._global_rng_paths:
            try:
                _set_at(self.model, path, np.random.mtrand._rand)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                raise StateMismatchError(
                    f"the checkpoint's estimator has no slot {path!r} for NumPy's global "
                    "generator: its state record does not match its estimator."
                ) from None

    def describe(self) -> dict[str, Any]:
        managed = ("learning_rate_init", "eta0", "warm_start", self.round_key)
        if self.pipeline:  # deep: the steps' parameters, estimators by class
            step = self._step
            params = describe_params(self.model, {f"{step}__{k}" for k in managed if k})
        else:
            params = {
                k: jsonable(v)
                for k, v in self.model.get_params(deep=False).items()
                if k not in managed
            }
        out = {
            "framework": "sklearn",
            "model": _qualname(self.model),
            "estimator": _qualname(self.model),
            "params": params,
            "estimators_per_round": self.estimators_per_round if self.kind == "rounds" else None,
        }
        if self.pipeline:
            out["refit_transformers"] = self.refit_transformers
        return out


# -- skops: secure, canonical -----------------------------------------------------------
def dumps(est: Any) -> bytes:
    """``est`` in skops' format, canonical: equal estimators give identical bytes.

    skops' own output is not: it numbers objects (and names their files) by Python ``id``,
    records which nodes are the same object, and copies arrays' bytes as they lie in
    memory. So: object ids are renumbered in document order and files renamed after them;
    immutable values (str, int, float, bool, None, types, functions, bytes, dtypes,
    slices, tuples) get a number per occurrence, so whether two equal ones happened to be
    one object (CPython caches small ints and interns strings; a loaded estimator shares
    what a fitted one did not) leaves no trace (loading gives equal values); the padding
    bytes of structured arrays (sklearn's Tree node records: 57 bytes of fields in 64),
    uninitialised memory, are zeroed; and zip timestamps are fixed. The identity of
    mutable objects (arrays, lists, dicts, estimators, generators) is kept as it is.
    """
    import skops.io as sio

    raw = zipfile.ZipFile(io.BytesIO(sio.dumps(est)))
    schema = json.loads(raw.read("schema.json"))
    ids: dict[int, int] = {}  # skops' id of a mutable object -> its number
    files: dict[str, bytes] = {}  # new name -> content
    count = 0

    def number(node: dict) -> int:
        nonlocal count
        old = node["__id__"]
        if not _is_value_node(node):
            if old not in ids:
                ids[old] = count
                count += 1
            return ids[old]
        count += 1
        return count - 1

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "__loader__" in node and isinstance(node.get("__id__"), int):
                num = node["__id__"] = number(node)
                f = node.get("file")
                if isinstance(f, str):  # skops names them <id>.npy, <id>.npz, <uuid>.bin
                    ext = posixpath.splitext(f)[1]
                    name = f"{num}{ext}"
                    if name not in files:
                        files[name] = _canonical_member(raw.read(f), ext)
                    node["file"] = name
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("schema.json", _ZIP_DATE), json.dumps(schema, indent=1))
        for name in sorted(files, key=_member_order):
            z.writestr(zipfile.ZipInfo(name, _ZIP_DATE), files[name])
    return out.getvalue()


#: skops nodes whose objects are immutable values: which of them are one object is no
#: part of the estimator (loading rebuilds equal values), so it is not recorded.
_VALUE_LOADERS = frozenset(
    {"JsonNode", "TypeNode", "FunctionNode", "BytesNode", "DTypeNode", "SliceNode", "TupleNode"}
)


def _is_value_node(node: dict) -> bool:
    if node.get("__loader__") not in _VALUE_LOADERS:
        return False
    content = node.get("content")  # a JsonNode holding a JSON list or object: not a scalar
    return not (node["__loader__"] == "JsonNode" and str(content).lstrip()[:1] in ("[", "{"))


def _member_order(name: str) -> tuple[int, str]:
    m = re.match(r"^(\d+)", name)
    return (int(m.group(1)) if m else -1, name)


def _canonical_member(blob: bytes, ext: str) -> bytes:
    """A file of the skops zip with its undefined bytes fixed: the padding of structured
    ``.npy`` arrays is zeroed; anything else is kept as it is."""
    return _zero_npy_padding(blob) if ext == ".npy" else blob


def _zero_npy_padding(blob: bytes) -> bytes:
    """``blob`` (an ``.npy`` file) with the bytes of its records that belong to no field
    zeroed; header and field bytes untouched. Never unpickles."""
    fmt = np.lib.format
    fp = io.BytesIO(blob)
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fp)
        else:  # 3.0 (non-latin-1 field names): no public header reader
            fp.seek(0)
            arr = fmt.read_array(fp, allow_pickle=False)
            shape, dtype = arr.shape, arr.dtype
    except (ValueError, TypeError, OSError):
        return blob
    if (dtype.fields is None and dtype.subdtype is None) or dtype.hasobject:
        return blob
    mask = _field_bytes(dtype)
    n = math.prod(shape)
    size = n * dtype.itemsize
    if mask.all() or size == 0 or len(blob) < size:
        return blob
    buf = np.frombuffer(bytearray(blob), dtype=np.uint8)  # writable copy
    buf[len(blob) - size :].reshape(n, dtype.itemsize)[:, ~mask] = 0  # data runs to the end
    return buf.tobytes()


def _field_bytes(dtype: np.dtype) -> np.ndarray:
    """Which of the ``itemsize`` bytes of one ``dtype`` item belong to a field."""
    if dtype.fields is None:
        if dtype.subdtype is not None:
            base, shape = dtype.subdtype
            return np.tile(_field_bytes(base), math.prod(shape))
        return np.ones(dtype.itemsize, dtype=bool)
    mask = np.zeros(dtype.itemsize, dtype=bool)
    for field in dtype.fields.values():
        sub, offset = field[0], field[1]
        mask[offset : offset + sub.itemsize] |= _field_bytes(sub)
    return mask


def loads(data: bytes, trusted: list[str] | None = None) -> Any:
    """The estimator in ``data`` (skops format). Refuses any type that is neither in
    skops' defaults nor in ``trusted`` (default :data:`TRUSTED_TYPES`); never unpickles."""
    import skops.io as sio

    allowed = TRUSTED_TYPES if trusted is None else trusted
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as err:  # a damaged or foreign file
        raise CheckpointError("model/skops", f"not a readable skops file: {err}") from None
    refused = sorted(set(untrusted) - set(allowed))
    if refused:
        raise CheckpointError(
            "model/skops",
            f"the estimator contains untrusted types {refused}; refusing to load them (they "
            "could run code). If you trust this checkpoint, add the type names to "
            "warmfit.backends.sklearn.TRUSTED_TYPES.",
        )
    return sio.loads(data, trusted=list(untrusted))


# -- helpers ------------------------------------------------------------------------------
def _global_rng_refs(est: Any, glob: Any) -> list[list[list[Any]]]:
    """The slots of ``est`` that hold ``glob`` (NumPy's global generator), as JSON paths
    of steps ``["attr", name]``, ``["item", index]`` (list, tuple or object array) and
    ``["key", name]`` (dict), in document order; the search goes through attributes of
    estimators, lists, tuples, dicts and object arrays, so into sub-estimators (a forest's
    or boosting's trees, a Pipeline's steps).
    """
    from sklearn.base import BaseEstimator

    out: list[list[list[Any]]] = []
    seen: set[int] = set()

    def visit(obj: Any, path: list[list[Any]]) -> None:
        if id(obj) in seen:
            return
        if isinstance(obj, BaseEstimator):
            children = [(["attr", k], v) for k, v in vars(obj).items()]
        elif isinstance(obj, tuple):  # a Pipeline's (name, step): no slot of its own
            children = [(["item", [i]], v) for i, v in enumerate(obj) if v is not glob]
        elif isinstance(obj, list):
            children = [(["item", [i]], v) for i, v in enumerate(obj)]
        elif isinstance(obj, dict):
            children = [(["key", k], v) for k, v in obj.items() if isinstance(k, str)]
        elif isinstance(obj, np.ndarray) and obj.dtype == object:
            children = [(["item", list(i)], obj[i]) for i in np.ndindex(obj.shape)]
        else:
            return
        seen.add(id(obj))
        for step, value in children:
            if value is glob:
                out.append([*path, step])
            else:
                visit(value, [*path, step])

    visit(est, [])
    return out


def _set_at(root: Any, path: list[list[Any]], value: Any) -> None:
    """Put ``value`` in the slot of ``root`` that ``path`` (see :func:`_global_rng_refs`)
    names."""
    obj = root
    for i, (kind, key) in enumerate(path):
        last = i == len(path) - 1
        if kind == "attr":
            if last:
                setattr(obj, key, value)
            else:
                obj = getattr(obj, key)
        elif kind == "item":
            parts = tuple(int(k) for k in key)
            index: int | tuple[int, ...] = parts
            if isinstance(obj, (list, tuple)):
                (index,) = parts
            if last:
                obj[index] = value
            else:
                obj = obj[index]
        elif kind == "key":
            if last:
                obj[key] = value
            else:
                obj = obj[key]
        else:
            raise ValueError(f"unknown step {kind!r}")


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_sparse(x: Any) -> bool:
    return hasattr(x, "tocsr") and hasattr(x, "nnz")


def _rng_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _rng_from_json(obj: list) -> tuple:
    name, keys, pos, has_gauss, cached = obj
    return (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def _resolve_metrics(metrics: Any) -> dict[str, Any]:
    from sklearn import metrics as skm

    named = {"accuracy": skm.accuracy_score, "r2": skm.r2_score, "mse": skm.mean_squared_error}
    return named_metrics(metrics, named)
