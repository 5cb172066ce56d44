"""Factories for ``sklearn_sgd.toml``: a scikit-learn ``Pipeline`` — a ``StandardScaler``
then an ``SGDClassifier`` — on the bundled 8x8 digits.

warmfit fits the scaler once per run (on the first call's training rows) and trains the
classifier one ``partial_fit`` per batch of its seeded data order, so an epoch is one
pass over the rows, and ``warmfit train`` run again continues exactly (the scaler is
kept; ``t_``, the step size and the data order go on). No torch is imported.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


def model() -> Pipeline:
    """The estimator has its own optimizer and loss: the spec names none. Its own early
    stopping stays off (warmfit would refuse it; use warmfit's EarlyStopping)."""
    sgd = SGDClassifier(
        loss="log_loss", alpha=1e-4, learning_rate="constant", eta0=0.01, random_state=0
    )
    return Pipeline([("scale", StandardScaler()), ("sgd", sgd)])


def data() -> tuple[np.ndarray, ...]:
    """(x, y, x_val, y_val): 1437 digits to train on and 360 to validate on (the
    pipeline's scaler is fitted on the training rows only)."""
    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.data))
    val, train = perm[:360], perm[360:]
    x, y = digits.data, digits.target
    return x[train], y[train], x[val], y[val]
