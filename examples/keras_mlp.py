"""Factories for ``keras_mlp.toml``: a Keras 3 MLP on scikit-learn's bundled 8x8 digits.

Keras runs on its torch backend here (``KERAS_BACKEND=torch`` unless the environment
sets another before this module is imported): exact on the CPU, as warmfit promises for
Keras. ``warmfit train examples/keras_mlp.toml`` imports these by ``module:function``.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # read once, when keras is first imported

import keras
import numpy as np
from sklearn.datasets import load_digits

from warmfit import schedules

STEPS_PER_EPOCH = 18  # ceil(1437 * 0.8 / 64): the training rows after validation_split


def model() -> keras.Model:
    """Built with its input shape, so that warmfit can seed, save and restore its
    variables; the unseeded Dropout draws from a stream warmfit owns."""
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )


def data() -> tuple[np.ndarray, np.ndarray]:
    """(x, y): 1437 of the 1797 digits, scaled to [0, 1]; the spec's validation_split
    holds out 20% of them."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    train = np.random.default_rng(0).permutation(len(x))[360:]
    return x[train], y[train]


def adam() -> keras.optimizers.Optimizer:
    """No argument: Keras builds the optimizer's variables itself. ``warm`` and
    ``restart`` call it again for a fresh optimizer."""
    return keras.optimizers.Adam(3e-3)


def loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def schedule() -> schedules.Schedule:
    """The same warmfit schedule as the PyTorch example: one warm-up epoch, then a cosine
    decay over 20 epochs, a pure function of the global step."""
    return schedules.warmup(
        STEPS_PER_EPOCH, schedules.cosine(3e-3, horizon=20 * STEPS_PER_EPOCH, min_lr=1e-4)
    )
