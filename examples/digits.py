"""Factories for ``digits.toml``: an MLP on scikit-learn's bundled 8x8 digits.

The data ships with scikit-learn (no download). ``warmfit train examples/digits.toml``
imports these by ``module:function``; nothing in the spec is executed.
"""

from __future__ import annotations

import torch
from torch import nn

from warmfit import schedules
from warmfit.demo import load_digits_split

STEPS_PER_EPOCH = 18  # ceil(1437 * 0.8 / 64): the training rows after validation_split


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def data():
    """(x, y): the 1437 training digits; the spec's validation_split holds out 20%."""
    x, y, _x_test, _y_test = load_digits_split(seed=0)
    return x, y


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=3e-3)


def schedule() -> schedules.Schedule:
    """One warm-up epoch, then a cosine decay over 20 epochs (holds its last value after)."""
    return schedules.warmup(
        STEPS_PER_EPOCH, schedules.cosine(3e-3, horizon=20 * STEPS_PER_EPOCH, min_lr=1e-4)
    )
