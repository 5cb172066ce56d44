"""Shared fixtures: small real models and data, and bit-exact state comparison."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import warmfit

torch.set_num_threads(1)


def make_data(
    n: int = 200, d: int = 8, classes: int = 3, seed: int = 123
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, classes))
    y = (x @ w).argmax(axis=1).astype(np.int64)
    return x, y


class MLP(nn.Module):
    def __init__(self, d: int = 8, classes: int = 3, hidden: int = 16, p: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def trainer_settings() -> dict[str, Any]:
    """The Trainer arguments of every test's reference run (all but the model)."""
    return dict(
        optimizer=adam,
        loss="cross_entropy",
        schedule=warmfit.schedules.warmup(5, warmfit.schedules.cosine(1e-2, horizon=60)),
        batch_size=16,
        seed=7,
        metrics=["accuracy"],
        verbose=0,
    )


def make_trainer(**kwargs: Any) -> warmfit.Trainer:
    defaults = trainer_settings()
    defaults.update(kwargs)
    model = defaults.pop("model", MLP)
    return warmfit.Trainer(model, **defaults)


def assert_same_training_state(
    a: warmfit.Trainer, b: warmfit.Trainer, counters_may_differ: tuple[str, ...] = ("fit_calls",)
) -> None:
    """Bit-for-bit: weights, optimizer state, learning rate, RNG streams, counters, history."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa["tensors"]) == sorted(sb["tensors"])
    for name in sa["tensors"]:
        ta, tb = torch.from_numpy(sa["tensors"][name]), torch.from_numpy(sb["tensors"][name])
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"tensor {name} differs"
    ca, cb = dict(sa["state"]["counters"]), dict(sb["state"]["counters"])
    for key in counters_may_differ:  # e.g. the number of calls: what differs by design
        ca.pop(key), cb.pop(key)
    assert ca == cb
    for key in ("rng", "epoch_partial", "backend", "callbacks", "schedule"):
        assert sa["state"][key] == sb["state"][key], f"state[{key!r}] differs"
    lr_a, lr_b = a.learning_rate, b.learning_rate
    assert lr_a == lr_b or (math.isnan(lr_a) and math.isnan(lr_b))
    assert _history_values(a) == _history_values(b)


def assert_latest_checkpoint_is_the_state(t: warmfit.Trainer) -> None:
    """The run dir's newest checkpoint holds the trainer's state tensors, bit for bit."""
    written, _ = warmfit.checkpoint.read_checkpoint(t.run_dir.latest())
    tensors = t.state_dict()["tensors"]
    assert sorted(written) == sorted(tensors)
    for name, arr in tensors.items():
        assert written[name].dtype == arr.dtype and np.array_equal(written[name], arr), name


def _history_values(t: warmfit.Trainer) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("segment", "mode")} for r in t.history]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


LONG = os.environ.get("WARMFIT_LONG") == "1"
