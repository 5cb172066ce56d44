"""Boosted trees through the libraries' native APIs: a model is its parameters.

``Trainer(warmfit.boosting.XGBoost({"objective": "binary:logistic", ...}))`` trains an
``xgboost.Booster`` with those parameters (``warmfit.boosting.LightGBM`` a
``lightgbm.Booster``), round by round under the contract; after every round ``booster``
is the trained one. The scikit-learn wrappers (``XGBClassifier``, ``LGBMRegressor``, ...)
are taken as they are: ``Trainer(XGBClassifier(subsample=0.8))``.

The meaning of the library's own round counts next to warmfit's: ``docs/boosting.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LightGBM", "XGBoost"]


@dataclass
class XGBoost:
    """An XGBoost model given by its ``xgboost.train`` parameters (no
    ``num_boost_round``: rounds are what ``fit`` adds). ``booster`` is the trained
    ``xgboost.Booster`` (None before the first round)."""

    params: dict[str, Any] = field(default_factory=dict)
    booster: Any = None


@dataclass
class LightGBM:
    """A LightGBM model given by its ``lightgbm.train`` parameters (no
    ``num_iterations``). ``booster`` is the trained ``lightgbm.Booster`` (None before the
    first round)."""

    params: dict[str, Any] = field(default_factory=dict)
    booster: Any = None
