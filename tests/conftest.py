"""Shared fixtures: small real models and data, the one comparison of training states
(:func:`assert_same_state`, from :mod:`warmfit.testing`, on
:func:`warmfit.check.compare_states`), and :func:`require` for optional frameworks."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

# Keras reads its backend once, at its first import: set it before anything imports keras
# (a plain `pytest` then tests Keras on torch, as scripts/test.sh does; unset or empty).
if not os.environ.get("KERAS_BACKEND"):
    os.environ["KERAS_BACKEND"] = "torch"

import numpy as np
import pytest
import torch
from torch import nn

import warmfit
from warmfit.testing import assert_same_state, fresh_optimizer_state, state_of  # noqa: F401

torch.set_num_threads(1)

#: In CI every framework is installed: a missing one fails there instead of skipping.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str, reason: str | None = None) -> ModuleType:
    """Import ``module`` for the tests that need it (``pytest.importorskip`` where it is
    missing on a developer's machine), but fail in CI (``CI`` set), where a skip would
    pass a whole framework's suite silently. Works at module level."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        why = f"{reason or f'{module} cannot be imported'} ({type(err).__name__}: {err})"
        if IN_CI:
            pytest.fail(f"{why}; CI installs every framework: not a skip", pytrace=False)
        pytest.skip(why, allow_module_level=True)


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


# The one comparison of two training states, and the state a warm call starts from, are
# the public conformance suite's (warmfit.testing): every test uses them from there.
with_fresh_optimizer = fresh_optimizer_state


def assert_latest_checkpoint_is_the_state(t: warmfit.Trainer) -> None:
    """The run dir's newest checkpoint holds the trainer's whole state, bit for bit."""
    assert_same_state(t.run_dir.latest(), t, ledger=True)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


LONG = os.environ.get("WARMFIT_LONG") == "1"


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures plot_history draws, kept as they are saved, to read back what they show."""
    from matplotlib.figure import Figure

    kept, save = [], Figure.savefig

    def keep(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kept.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return kept
