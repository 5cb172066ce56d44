"""The backend contract is declared (``warmfit.backends.base.Backend``): the Trainer
calls only what it declares, and a capability a backend lacks is refused before anything
changes, with a message (issue 17)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
from conftest import make_data
from warmfit.backends.base import Backend
from warmfit.check import compare_states

SRC = Path(warmfit.__file__).resolve().parent
FROM_TORCH = (
    "schedules.from_torch(...) builds a torch LR scheduler, which drives a torch optimizer "
    "only; this is a {framework} model. Pass a warmfit schedule (warmfit.schedules), a "
    "function step -> learning rate."
)


def _step_lr() -> warmfit.schedules.TorchScheduler:
    return warmfit.schedules.from_torch(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5))


def test_no_module_probes_the_backend_for_a_member():
    """No getattr/hasattr on a backend anywhere in src: every member is declared."""
    probe = re.compile(r"\b(getattr|hasattr)\(\s*(self\.)?_?backend\b")
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []


def test_every_backend_implements_the_declared_contract():
    from warmfit.backends.keras import KerasBackend
    from warmfit.backends.sklearn import SklearnBackend
    from warmfit.backends.torch import TorchBackend

    for cls in (TorchBackend, KerasBackend, SklearnBackend):
        assert issubclass(cls, Backend) and not cls.__abstractmethods__, cls


def test_a_torch_scheduler_on_a_scikit_learn_model_is_refused_before_anything_changes():
    from sklearn.linear_model import SGDClassifier

    x, y = make_data(64)
    with pytest.raises(TypeError) as err:
        warmfit.Trainer(SGDClassifier(random_state=0), schedule=_step_lr(), verbose=0)
    assert str(err.value) == FROM_TORCH.format(framework="sklearn")

    trainer = warmfit.Trainer(SGDClassifier(random_state=0), batch_size=16, verbose=0)
    trainer.fit(x, y, epochs=1)
    before, schedule = trainer.state_dict(), trainer.schedule
    with pytest.raises(TypeError) as err:
        trainer.fit(x, y, epochs=1, schedule=_step_lr())
    assert str(err.value) == FROM_TORCH.format(framework="sklearn")
    assert trainer.schedule is schedule and len(trainer.ledger) == 1
    assert compare_states(before, trainer.state_dict()) == []


def test_a_torch_scheduler_on_a_keras_model_is_refused():
    from test_keras import make_keras_trainer

    with pytest.raises(TypeError) as err:
        make_keras_trainer(schedule=_step_lr())
    assert str(err.value) == FROM_TORCH.format(framework="keras")
    trainer = make_keras_trainer()
    x, y = make_data(64)
    with pytest.raises(TypeError) as err:
        trainer.fit(x, y, epochs=1, schedule=_step_lr())
    assert str(err.value) == FROM_TORCH.format(framework="keras")
    assert trainer.epoch == 0 and len(trainer.ledger) == 0


class Minimal(Backend):
    """A third-party backend: a linear least-squares model in NumPy, written against the
    declared contract only (the abstract methods; every default left as it is)."""

    framework = "numpy"

    def __init__(self, model: np.ndarray, **_: object) -> None:
        self.model = model
        self.lr = 0.1

    def init_model(self, seed: int, *, first: bool) -> None:
        self.seed = seed
        self.model[...] = np.random.default_rng(seed).normal(size=self.model.shape)

    def init_optimizer(self, schedule: object) -> None:
        self.lr = 0.1

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        return {}

    def capture_rng(self) -> dict[str, np.ndarray]:
        return {}

    def install_rng(self, state: object) -> None:
        return None

    def prepare(self, x, y):  # type: ignore[no-untyped-def]
        return (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))

    class _Rows(tuple):
        def __len__(self) -> int:
            return len(self[0])

    def subset(self, data, rows):  # type: ignore[no-untyped-def]
        return (data[0][rows], data[1][rows])

    def fingerprint(self, data):  # type: ignore[no-untyped-def]
        return str(hash(data[0].tobytes())), list(data[0].shape)

    def batches(self, data, order, offset, batch_size, epoch):  # type: ignore[no-untyped-def]
        for start in range(offset, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield data[0][idx], data[1][idx]

    def train_mode(self, training: bool) -> None:
        return None

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr

    def learning_rate(self) -> float:
        return self.lr

    def train_step(self, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        err = x @ self.model - y
        self.model -= self.lr * x.T @ err / len(x)
        return float((err**2).mean())

    def end_epoch(self) -> None:
        return None

    def read_losses(self, handles):  # type: ignore[no-untyped-def]
        return np.asarray(handles, dtype=np.float64)

    def evaluate(self, data, batch_size):  # type: ignore[no-untyped-def]
        return {"loss": float(((data[0] @ self.model - data[1]) ** 2).mean())}

    def predict(self, x, batch_size):  # type: ignore[no-untyped-def]
        return np.asarray(x) @ self.model

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {"model/w": self.model}

    def state_meta(self) -> dict:
        return {"lr": self.lr}

    def load_state(self, tensors, meta) -> None:  # type: ignore[no-untyped-def]
        self.model[...] = tensors["model/w"]
        self.lr = meta["lr"]

    def load_weights(self, tensors, dtypes=None) -> None:  # type: ignore[no-untyped-def]
        self.model[...] = tensors["model/w"]

    def describe(self) -> dict:
        return {"framework": "numpy", "model": {"w": list(self.model.shape)}}


def test_a_backend_written_against_the_contract_alone_trains_exactly(monkeypatch):
    """Nothing undeclared is needed: split calls equal one call, bit for bit."""
    import warmfit.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "select", lambda model, **kw: Minimal(model, **kw))
    x, y = make_data(64)
    y = y.astype(np.float64)

    def fresh() -> warmfit.Trainer:
        return warmfit.Trainer(np.zeros(8), batch_size=16, seed=3, verbose=0)

    straight, split = fresh(), fresh()
    straight.fit(x, y, epochs=2)
    split.fit(x, y, epochs=1)
    split.fit(x, y, epochs=1)
    assert compare_states(straight.state_dict(), split.state_dict()) == []
    assert straight.epoch == 2 and straight.history[-1]["loss"] > 0
