"""Callbacks act on training through a public control object (``trainer.control``),
which built-in and user callbacks use alike; the Trainer special-cases no callback
class (issue 17). A user's callback that adjusts the learning rate, restores weights and
stops is exact across split calls and a resume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

import warmfit
from conftest import make_data, make_trainer
from warmfit.check import compare_states


class HalveAndRollBack(warmfit.Callback):
    """Halves the learning rate after any epoch whose val_loss got worse, and then puts
    back the weights of the best epoch; stops after ``budget`` halvings."""

    adjusts_lr = True

    def __init__(self, budget: int = 2) -> None:
        self.budget = budget
        self.reset()

    def reset(self) -> None:
        self.factor, self.best, self.halvings = 1.0, None, 0
        self.weights: dict[str, np.ndarray] | None = None

    def adjust_lr(self, lr: float) -> float:
        return lr * self.factor

    def on_epoch_end(self, trainer: warmfit.Trainer, logs: dict[str, Any]) -> bool:
        value = logs["val_loss"]
        if self.best is None or value < self.best:
            self.best, self.weights = value, trainer.control.snapshot_weights()
            return False
        self.factor *= 0.5
        self.halvings += 1
        trainer.control.apply_learning_rate()
        trainer.control.restore_weights(self.weights, scored=("val_loss", self.best))
        if self.halvings >= self.budget:
            trainer.control.stop("HalveAndRollBack budget")
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "best": self.best, "halvings": self.halvings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor, self.best, self.halvings = state["factor"], state["best"], state["halvings"]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.weights or {})

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = {k: np.array(v) for k, v in arrays.items()} or None


def _fit(trainer: warmfit.Trainer, **kw: Any) -> None:
    x, y = make_data(200)
    trainer.fit(x, y, validation_data=make_data(60, seed=9), **kw)


def test_a_user_callback_adjusts_restores_and_stops_exactly(tmp_path):
    settings = {"schedule": warmfit.schedules.constant(0.2), "metrics": []}  # overshoots
    straight = make_trainer(callbacks=[HalveAndRollBack()], **settings)
    _fit(straight, epochs=12)
    assert straight.ledger[-1]["stopped_by"] == "HalveAndRollBack budget"
    stopped_at = straight.epoch
    lrs = [r["lr"] for r in straight.history]
    assert 0.2 in lrs and 0.1 in lrs  # the factor took effect in the steps
    split = make_trainer(callbacks=[HalveAndRollBack()], **settings)
    _fit(split, epochs=2)
    split.save(tmp_path / "ckpt")
    resumed = warmfit.Trainer.load(
        tmp_path / "ckpt", split.model.__class__,
        **{**_settings(), **settings, "callbacks": [HalveAndRollBack()]},
    )  # fmt: skip
    _fit(resumed, epochs=12)
    assert resumed.epoch == stopped_at
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []


def _settings() -> dict:
    from conftest import trainer_settings

    return trainer_settings()


def test_no_callback_reaches_into_the_trainer_and_the_trainer_names_no_callback_class():
    src = Path(warmfit.__file__).resolve().parent
    callbacks = (src / "callbacks.py").read_text() + (src / "monitor.py").read_text()
    assert re.findall(r"trainer\._\w+", callbacks) == []
    trainer = (src / "trainer.py").read_text()
    for name in ("EarlyStopping", "ReduceLROnPlateau", "OverfittingMonitor"):
        assert f"isinstance(cb, {name})" not in trainer
