"""Framework adapters behind one protocol (:class:`~warmfit.backends.base.Backend`).

:func:`select` picks the backend from the model's type; frameworks are imported only
when a model of theirs is given, so the core never imports one it does not need.
"""

from __future__ import annotations

import sys
from typing import Any

from .base import Backend, NonFiniteLoss

__all__ = ["Backend", "NonFiniteLoss", "select"]


FRAMEWORKS = ("torch", "keras", "sklearn")


def select(model: Any, framework: str | None = None, **kwargs: Any) -> Backend:
    """The backend for ``model``: a torch ``nn.Module`` (or a factory of one), a Keras
    model, or a scikit-learn estimator. A factory of a Keras model cannot be recognised
    before it is called: name its ``framework`` ("keras")."""
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(
            f"The 'framework' parameter of Trainer must be one of {set(FRAMEWORKS)} or None "
            f"(inferred from the model). Got {framework!r} instead."
        )
    if framework == "keras":
        from .keras import KerasBackend

        return KerasBackend(model, **kwargs)
    if framework == "torch":
        from .torch import TorchBackend

        return TorchBackend(model, **kwargs)
    if framework == "sklearn" or ("sklearn" in sys.modules and _is_sklearn(model)):
        from .sklearn import SklearnBackend

        return SklearnBackend(model, **kwargs)
    if "keras" in sys.modules and _is_keras(model):
        from .keras import KerasBackend

        return KerasBackend(model, **kwargs)
    from .torch import TorchBackend

    return TorchBackend(model, **kwargs)


def _is_sklearn(model: Any) -> bool:
    from sklearn.base import BaseEstimator

    return isinstance(model, BaseEstimator)


def _is_keras(model: Any) -> bool:
    import keras

    return isinstance(model, keras.Model)
