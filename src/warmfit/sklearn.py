"""scikit-learn estimators around a PyTorch module and a warmfit Trainer.

:class:`NeuralNetClassifier` and :class:`NeuralNetRegressor` follow scikit-learn's
conventions, not warmfit's defaults (``docs/sklearn.md``):

- ``fit`` starts over (a new Trainer seeded from ``random_state``) unless
  ``warm_start=True``; then it trains ``max_epochs`` more epochs in ``continue`` mode.
- ``partial_fit`` trains one more epoch in ``continue`` mode (the optimizer state, the
  learning rate and the random streams go on).
- ``get_params``/``set_params``/``clone`` work; the estimators pass
  ``sklearn.utils.estimator_checks.check_estimator`` with the checks in
  :data:`EXPECTED_FAILED_CHECKS` declared.

The network computes in float64 on float64 input (float32 on float32 input), so row-wise
predictions equal whole-batch ones. Everything the estimator keeps is picklable.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from .errors import check_int
from .trainer import Trainer

#: Checks of ``check_estimator`` these estimators do not pass, with the reason.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}

_ARCHITECTURE = ("module", "hidden_layer_sizes")


class _MLP:
    """Default module factory: ``hidden_layer_sizes`` Linear+ReLU layers, then a Linear."""

    def __init__(self, hidden_layer_sizes: tuple[int, ...]) -> None:
        # operator.index: NumPy integers become plain ints, a float is refused.
        self.hidden_layer_sizes = tuple(operator.index(h) for h in hidden_layer_sizes)

    def __call__(self, n_features: int, n_outputs: int) -> Any:
        from torch import nn

        layers: list[Any] = []
        width = n_features
        for h in self.hidden_layer_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        return nn.Sequential(*layers)


def _build(factory: Any, n_features: int, n_outputs: int, dtype: Any) -> Any:
    """The Trainer's model factory (a module-level function: picklable with partial)."""
    from torch import nn

    module = factory(n_features, n_outputs)
    if not isinstance(module, nn.Module):
        raise TypeError(
            "The 'module' parameter must be a callable (n_features, n_outputs) -> "
            f"torch.nn.Module. It returned {module!r} instead."
        )
    return module.to(dtype)


def _adam(params: Any, lr: float) -> Any:
    import torch

    return torch.optim.Adam(params, lr=lr)


def _mse(pred: Any, target: Any) -> Any:
    import torch

    return torch.nn.functional.mse_loss(pred, target)


class _NeuralNet:
    """Shared implementation; the public classes add the scikit-learn mixins."""

    _loss: Any = "cross_entropy"

    if TYPE_CHECKING:  # what the public classes and BaseEstimator provide
        n_outputs_: int

        def _encode_target(self, y: Any, *, first: bool, classes: Any) -> Any: ...
        def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def __init__(
        self,
        module: Any = None,
        *,
        hidden_layer_sizes: tuple[int, ...] = (100,),
        max_epochs: int = 10,
        batch_size: int = 32,
        lr: float = 1e-3,
        warm_start: bool = False,
        random_state: Any = None,
    ) -> None:
        self.module = module
        self.hidden_layer_sizes = hidden_layer_sizes
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.warm_start = warm_start
        self.random_state = random_state

    # -- public API ------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> Any:
        """Train ``max_epochs`` epochs: from scratch, or more epochs if ``warm_start``."""
        epochs = self._checked_params()["max_epochs"]
        if self.warm_start and hasattr(self, "trainer_"):
            return self._train(X, y, epochs, first=False)
        return self._train(X, y, epochs, first=True)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> Any:
        """Train one more epoch on (X, y) in ``continue`` mode (the first call builds the
        network; ``classes`` lists every class a classifier will ever see)."""
        self._checked_params()
        return self._train(X, y, 1, first=not hasattr(self, "trainer_"), classes=classes)

    def _train(self, X: Any, y: Any, epochs: int, *, first: bool, classes: Any = None) -> Any:
        import torch
        from sklearn.utils.validation import validate_data

        X, y = validate_data(
            self, X, y, reset=first, dtype=(np.float64, np.float32), multi_output=True
        )
        if first:
            self._dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        target = self._encode_target(y, first=first, classes=classes)
        if first:
            self._build_trainer(X.shape[1])
        else:
            self._check_changed_params()
        xt = torch.from_numpy(np.array(X, dtype=_np_dtype(self._dtype), copy=True))
        trainer = self.trainer_
        # scikit-learn's continuation may use new data (partial_fit on the next chunk):
        # whole epochs only, so the cursor is always at an epoch boundary.
        trainer.fit(xt, target, epochs=epochs, mode="continue", verbose=0, new_data=True)
        self.n_epochs_ = trainer.epoch
        return self

    def _build_trainer(self, n_features: int) -> None:
        """A new Trainer (and network) from the current parameters. The numbers are
        passed on as plain ``int``/``float`` (a NumPy scalar from a parameter grid would
        reach torch and the checkpoint's JSON otherwise)."""
        from sklearn.utils import check_random_state

        plain = self._checked_params()
        factory = self.module if self.module is not None else _MLP(self.hidden_layer_sizes)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self.trainer_ = Trainer(
            functools.partial(_build, factory, n_features, self.n_outputs_, self._dtype),
            optimizer=functools.partial(_adam, lr=plain["lr"]),
            loss=self._loss,
            batch_size=plain["batch_size"],
            seed=seed,
            verbose=0,
        )
        self.module_ = self.trainer_.model
        params = self.get_params()
        self.built_params_ = {
            **{k: params[k] for k in _ARCHITECTURE},
            "lr": plain["lr"],
            "batch_size": plain["batch_size"],
        }

    def _checked_params(self) -> dict[str, Any]:
        """Check the parameters (scikit-learn's convention: at fit, not in ``__init__``,
        which stores them as given) and return the numeric ones as plain Python numbers:
        ``max_epochs`` and ``batch_size`` as ``int``, ``lr`` as ``float``.

        NumPy scalars are accepted (``np.integer`` for the ints; ``np.integer`` and
        ``np.floating`` for ``lr``), bools never. A bad value raises ``ValueError``; a
        ``module`` that is not a callable, or is an ``nn.Module`` instance (callable, but
        its ``forward`` is not a factory), raises ``TypeError``."""
        name = type(self).__name__
        plain: dict[str, Any] = {}
        for key in ("max_epochs", "batch_size"):
            plain[key] = check_int(key, getattr(self, key), name, minimum=1)
        lr = self.lr
        real = isinstance(lr, (int, float, np.integer, np.floating)) and not isinstance(lr, bool)
        if not real or not math.isfinite(lr) or lr <= 0:
            raise ValueError(
                f"The 'lr' parameter of {name} must be a finite float > 0. Got {lr!r} instead."
            )
        plain["lr"] = float(lr)
        self._check_module(name)
        return plain

    def _check_module(self, name: str) -> None:
        """``module`` must be None or a factory ``(n_features, n_outputs) -> nn.Module``."""
        module = self.module
        if module is None:
            return
        expected = (
            f"The 'module' parameter of {name} must be a callable (n_features, n_outputs) "
            "-> torch.nn.Module, or None."
        )
        from torch import nn

        if isinstance(module, nn.Module):
            cls = type(module).__name__
            raise TypeError(
                f"{expected} Got an instance of {cls} (a network already built) instead. Pass "
                f"the class (module={cls}) or a factory such as functools.partial({cls}, "
                "...): fit builds a new network from it for the data's shape."
            )
        if not callable(module):
            raise TypeError(f"{expected} Got {module!r} instead.")

    def _check_changed_params(self) -> None:
        """Guardrails for set_params between continued calls: an architecture change is
        an error; a new lr or batch_size is applied to the running optimizer/Trainer
        (its state is kept, never silently reset) with a warning. ``lr`` and
        ``batch_size`` are compared and applied as plain ``float``/``int``."""
        name = type(self).__name__
        now = {**self.get_params(), **self._checked_params()}
        for key in _ARCHITECTURE:
            if now[key] is not self.built_params_[key] and now[key] != self.built_params_[key]:
                raise ValueError(
                    f"{key} changed from {self.built_params_[key]!r} to {now[key]!r} since the "
                    f"network was built; {name} cannot continue training a different "
                    "architecture. Set warm_start=False and call fit to start over."
                )
        if now["lr"] != self.built_params_["lr"]:
            for group in self.trainer_.optimizer.param_groups:
                group["lr"] = now["lr"]
            warnings.warn(
                f"lr changed from {self.built_params_['lr']} to {now['lr']} between continued "
                f"calls of {name}: the optimizer keeps its state (Adam moments) and uses the "
                "new learning rate from now on. Call fit with warm_start=False to start over.",
                UserWarning,
                stacklevel=4,
            )
            self.built_params_["lr"] = now["lr"]
        if now["batch_size"] != self.built_params_["batch_size"]:
            self.trainer_.batch_size = now["batch_size"]
            warnings.warn(
                f"batch_size changed from {self.built_params_['batch_size']} to "
                f"{now['batch_size']} between continued calls of {name}; the optimizer keeps "
                "its state. Call fit with warm_start=False to start over.",
                UserWarning,
                stacklevel=4,
            )
            self.built_params_["batch_size"] = now["batch_size"]

    def _forward(self, X: Any) -> np.ndarray:
        import torch
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "trainer_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        xt = torch.from_numpy(np.array(X, dtype=_np_dtype(self._dtype), copy=True))
        return self.trainer_.predict(xt, batch_size=max(len(X), 1)).numpy()


def _np_dtype(torch_dtype: Any) -> Any:
    import torch

    return np.float32 if torch_dtype == torch.float32 else np.float64


class NeuralNetClassifier(ClassifierMixin, _NeuralNet, BaseEstimator):
    """A scikit-learn classifier around a PyTorch module trained by a warmfit Trainer.

    Parameters
    ----------
    module : callable (n_features, n_outputs) -> torch.nn.Module, default=None
        Builds the network (must be picklable: a class or ``functools.partial``, not
        a lambda). None: an MLP with ``hidden_layer_sizes`` and ReLU. A module
        instance (``nn.Linear(5, 2)``) is refused with a ``TypeError``: pass the
        class (``nn.Linear``).
    hidden_layer_sizes : tuple of int, default=(100,)
        Hidden widths of the default MLP (ignored when ``module`` is given).
    max_epochs : int, default=10
        Epochs per ``fit`` call (additional epochs when ``warm_start=True``).
    batch_size : int, default=32
    lr : float, default=1e-3
        Adam's learning rate, finite and > 0.
    warm_start : bool, default=False
        ``fit`` continues the previous training instead of starting over.
    random_state : int, RandomState instance or None, default=None
        Seeds the weights, the data order and every random stream of training.

    The parameters are checked at ``fit``/``partial_fit`` (``__init__`` stores them as
    given). NumPy scalars are accepted for the numbers (``np.int64``, ``np.float32``;
    bools never) and passed on to the Trainer as plain ``int``/``float``.

    Attributes
    ----------
    classes_, n_features_in_, n_outputs_, n_epochs_ (epochs trained in this run),
    trainer_ (the :class:`warmfit.Trainer`), module_ (the ``torch.nn.Module``).
    """

    _loss = "cross_entropy"

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

    def _encode_target(self, y: Any, *, first: bool, classes: Any) -> Any:
        import torch

        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if first:
            self.classes_ = np.unique(y) if classes is None else np.unique(classes)
            self.n_outputs_ = len(self.classes_)
        unknown = np.setdiff1d(y, self.classes_)
        if len(unknown):
            raise ValueError(
                f"y has classes {unknown.tolist()} that {type(self).__name__} was not "
                f"built for (classes_ is {self.classes_.tolist()}). Pass every class with "
                "partial_fit(..., classes=...) on the first call, or set warm_start=False "
                "and call fit to start over."
            )
        return torch.from_numpy(np.searchsorted(self.classes_, y).astype(np.int64))

    def predict_proba(self, X: Any) -> np.ndarray:
        logits = self._forward(X)
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        logits = self._forward(X)
        return self.classes_[np.argmax(logits, axis=1)]


class NeuralNetRegressor(RegressorMixin, _NeuralNet, BaseEstimator):
    """A scikit-learn regressor around a PyTorch module trained by a warmfit Trainer
    (mean squared error). Parameters and attributes as
    :class:`NeuralNetClassifier`, without ``classes_``; ``y`` may be 2-D
    (several outputs)."""

    _loss = staticmethod(_mse)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _encode_target(self, y: Any, *, first: bool, classes: Any) -> Any:
        import torch

        if classes is not None:
            raise ValueError("classes has no meaning for a regressor; do not pass it.")
        y = np.asarray(y, dtype=np.float64)
        y2 = y.reshape(-1, 1) if y.ndim == 1 else y
        if first:
            self._y_1d = y.ndim == 1
            self.n_outputs_ = y2.shape[1]
        elif y2.shape[1] != self.n_outputs_:
            raise ValueError(
                f"y has {y2.shape[1]} outputs, but {type(self).__name__} was built for "
                f"{self.n_outputs_}. Set warm_start=False and call fit to start over."
            )
        return torch.from_numpy(np.array(y2, dtype=_np_dtype(self._dtype)))

    def predict(self, X: Any) -> np.ndarray:
        out = self._forward(X)
        return out.ravel() if self._y_1d else out


__all__ = ["EXPECTED_FAILED_CHECKS", "NeuralNetClassifier", "NeuralNetRegressor"]
