"""Factories for ``xgboost_tabular.toml``: an ``XGBClassifier`` on scikit-learn's bundled
breast-cancer data (569 rows, 30 features), with row and column subsampling.

One epoch is one boosting round: ``warmfit train examples/xgboost_tabular.toml --epochs
10`` adds 10 rounds, and run again adds 10 more, with the learning rate of each round
taken from the schedule at that *global* round — bit for bit what one 20-round command
gives (XGBoost's own continuation is not exact with subsampling: docs/boosting.md).
"""

from __future__ import annotations

import numpy as np
import xgboost as xgb
from sklearn.datasets import load_breast_cancer

import warmfit


def model() -> xgb.XGBClassifier:
    """n_estimators is not set: warmfit adds rounds (``--epochs``). One thread, so that
    the trees are the same on any machine with this XGBoost."""
    return xgb.XGBClassifier(max_depth=3, subsample=0.7, colsample_bytree=0.7, n_jobs=1)


def schedule() -> warmfit.schedules.Schedule:
    """The learning rate of each global round: a cosine from 0.3 to 0.02 over 60 rounds."""
    return warmfit.schedules.cosine(0.3, horizon=60, min_lr=0.02)


def data() -> tuple[np.ndarray, ...]:
    """(x, y, x_val, y_val): 449 rows to train on, 120 held out."""
    d = load_breast_cancer()
    perm = np.random.default_rng(0).permutation(len(d.target))
    val, train = perm[:120], perm[120:]
    return d.data[train], d.target[train], d.data[val], d.target[val]
