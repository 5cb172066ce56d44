"""Framework adapters behind one protocol (:class:`~warmfit.backends.base.Backend`).

:func:`select` picks the backend from the model's type; frameworks are imported only
when a model of theirs is given, so the core never imports one it does not need.
"""

from __future__ import annotations

import sys
from typing import Any

from .base import Backend, NonFiniteLoss

__all__ = ["Backend", "NonFiniteLoss", "select"]


def select(model: Any, **kwargs: Any) -> Backend:
    """The backend for ``model``: a torch ``nn.Module`` (or a factory of one), a Keras
    model, or a scikit-learn estimator."""
    if "sklearn" in sys.modules and _is_sklearn(model):
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
