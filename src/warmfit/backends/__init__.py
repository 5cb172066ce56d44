"""Framework adapters behind one protocol (:class:`~warmfit.backends.base.Backend`).

:func:`select` picks the backend from the model's type, or builds the one named by
``framework``: a built-in's name, or a third party's subclass of :class:`Backend`.
Frameworks are imported only when a model of theirs is given, so the core never imports
one it does not need.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeGuard

from .base import Backend, NonFiniteLoss

__all__ = ["Backend", "NonFiniteLoss", "select"]


FRAMEWORKS = ("torch", "keras", "sklearn", "xgboost", "lightgbm")
#: What the ``framework`` parameter of Trainer accepts, in the one message template (the
#: names in a fixed order: a set's order changes from one process to the next).
FRAMEWORK_TEXT = (
    "one of {" + ", ".join(map(repr, FRAMEWORKS)) + "}, a subclass of "
    "warmfit.backends.Backend or None (inferred from the model)"
)


def is_backend_class(framework: Any) -> TypeGuard[type[Backend]]:
    """Whether ``framework`` is a subclass of :class:`Backend` (a third-party backend)."""
    return isinstance(framework, type) and issubclass(framework, Backend)


def select(model: Any, framework: str | type[Backend] | None = None, **kwargs: Any) -> Backend:
    """The backend for ``model``: a torch ``nn.Module`` (or a factory of one), a Keras
    model, or a scikit-learn estimator. A factory of a Keras model cannot be recognised
    before it is called: name its ``framework`` ("keras").

    ``framework`` may also be a subclass of :class:`Backend` (a backend of one's own,
    or a built-in one's subclass): it is built as the built-ins are,
    ``framework(model, **kwargs)``, with the Trainer's ``device``, ``optimizer``,
    ``loss``, ``metrics``, ``num_workers`` (those given) and ``backend_options``."""
    if is_backend_class(framework):
        build: Callable[..., Backend] = framework  # a subclass: (model, **options)
        return build(model, **kwargs)
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(
            f"The 'framework' parameter of Trainer must be {FRAMEWORK_TEXT}. "
            f"Got {framework!r} instead."
        )
    booster = _boosting_library(model)
    if framework in ("xgboost", "lightgbm") or (framework is None and booster is not None):
        if booster is None or (framework is not None and framework != booster):
            raise TypeError(
                f"framework={framework!r} trains an {framework} scikit-learn wrapper "
                f"(e.g. {'XGBClassifier' if framework == 'xgboost' else 'LGBMClassifier'}) or "
                f"a warmfit.boosting.{'XGBoost' if framework == 'xgboost' else 'LightGBM'}"
                f"(params) holder; got {type(model).__name__}."
            )
        return _boosting_backend(model, booster, kwargs)
    if framework == "keras" or (framework is None and "keras" in sys.modules and _is_keras(model)):
        from .keras import KerasBackend

        return KerasBackend(model, **_not_torch_only(kwargs, "Keras"))
    if framework == "torch":
        from .torch import TorchBackend

        return TorchBackend(model, **kwargs)
    if framework == "sklearn" or ("sklearn" in sys.modules and _is_sklearn(model)):
        from .sklearn import SklearnBackend

        return SklearnBackend(model, **_not_torch_only(kwargs, "scikit-learn"))
    from .torch import TorchBackend

    return TorchBackend(model, **kwargs)


#: The training step's options, for PyTorch models only (for now).
TORCH_STEP_OPTIONS = ("precision", "accumulate", "clip_grad_norm", "ema", "ema_warmup", "use_ema")


def _not_torch_only(kwargs: dict[str, Any], framework: str) -> dict[str, Any]:
    """Refuse the torch step's options for another framework's model."""
    given = [k for k in TORCH_STEP_OPTIONS if k in kwargs]
    if given:
        raise ValueError(
            f"{given[0]}= is an option of the PyTorch training step; warmfit does not offer "
            f"it for {framework} models yet. Remove it."
        )
    return kwargs


def _boosting_library(model: Any) -> str | None:
    """"xgboost"/"lightgbm" for a model of theirs (a scikit-learn wrapper or a
    :mod:`warmfit.boosting` holder), else None. A library is imported only if the
    program already did."""
    from ..boosting import LightGBM, XGBoost

    if isinstance(model, XGBoost):
        return "xgboost"
    if isinstance(model, LightGBM):
        return "lightgbm"
    if "xgboost" in sys.modules:
        import xgboost

        if isinstance(model, xgboost.XGBModel):
            return "xgboost"
    if "lightgbm" in sys.modules:
        import lightgbm

        if isinstance(model, lightgbm.LGBMModel):
            return "lightgbm"
    return None


def _boosting_backend(model: Any, library: str, kwargs: dict[str, Any]) -> Backend:
    from .boosting import BoostingBackend

    if library == "xgboost":
        from .xgboost_rounds import from_model
    else:
        from .lightgbm_rounds import from_model  # type: ignore[assignment]
    engine, classifier, random_state = from_model(model)
    options = _not_torch_only(kwargs, "XGBoost" if library == "xgboost" else "LightGBM")
    return BoostingBackend(model, engine, classifier=classifier, random_state=random_state,
                           **options)  # fmt: skip


def _is_sklearn(model: Any) -> bool:
    from sklearn.base import BaseEstimator

    return isinstance(model, BaseEstimator)


def _is_keras(model: Any) -> bool:
    import keras

    return isinstance(model, keras.Model)
