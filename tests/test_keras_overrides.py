"""Keras models that customise training by overriding a method of ``keras.Model``
(https://keras.io/guides/custom_train_step_in_torch/): ``train_step``, ``test_step``,
``predict_step``, ``compute_loss``, and losses added with ``add_loss`` or regularizers.

Each either trains exactly as Keras does (bit for bit the weights of ``model.fit`` over
the same batches, and split calls and a save/load resume bit for bit the straight run)
or is refused with a message before anything changes (issue 15, item 6: warmfit used to
train a model with its own ``train_step`` by Keras's default step, never calling it)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from conftest import assert_same_state, make_data, require

keras = require("keras", "keras 3 is not installed: the Keras backend cannot be tested")
torch = require("torch")
if keras.backend.backend() != "torch":  # the steps below are written for torch
    pytest.skip("these tests run with KERAS_BACKEND=torch", allow_module_level=True)

import warmfit  # noqa: E402
from test_keras import keras_settings, xent  # noqa: E402

CALLS = {"train_step": 0, "test_step": 0, "predict_step": 0}  # kept off the models


@pytest.fixture(autouse=True)
def _count_calls():
    for k in CALLS:
        CALLS[k] = 0


def _apply(model: keras.Model, loss: Any, clip: float | None = None) -> None:
    """The guide's update: backward, then model.optimizer on the (clipped) gradients."""
    loss.backward()
    weights = model.trainable_weights[:]
    grads = [v.value.grad for v in weights]
    if clip is not None:
        grads = [keras.ops.clip(g, -clip, clip) for g in grads]
    with torch.no_grad():
        model.optimizer.apply(grads, weights)


class GuideStep(keras.Sequential):
    """The guide's first ``train_step`` (compiled loss and metrics, ``self.metrics``),
    with a penalty on the logits and clipped gradients: not Keras's default step; and
    its ``test_step`` with one more tracker, ``margin``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.margin = keras.metrics.Mean(name="margin")

    def train_step(self, data: Any) -> dict[str, Any]:
        CALLS["train_step"] += 1
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self.compute_loss(y=y, y_pred=y_pred) + 0.1 * keras.ops.mean(y_pred**2)
        _apply(self, loss, clip=0.05)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            elif metric.name != "margin":
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data: Any) -> dict[str, Any]:
        CALLS["test_step"] += 1
        x, y = data
        y_pred = self(x, training=False)
        loss = self.compute_loss(y=y, y_pred=y_pred)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            elif metric.name == "margin":
                metric.update_state(keras.ops.max(y_pred, axis=-1))
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class OwnLossStep(keras.Sequential):
    """The guide's lower-level ``train_step``: compiled without a loss, its own loss
    function and trackers (a ``metrics`` property), which Keras resets per epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.acc = keras.metrics.SparseCategoricalAccuracy(name="acc")
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train_step(self, data: Any) -> dict[str, Any]:
        CALLS["train_step"] += 1
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self.loss_fn(y, y_pred) + 0.1 * keras.ops.mean(y_pred**2)
        _apply(self, loss)
        self.loss_tracker.update_state(loss)
        self.acc.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "acc": self.acc.result()}

    @property
    def metrics(self) -> list[Any]:
        return [self.loss_tracker, self.acc]


def layers(dropout: bool) -> list[Any]:
    out = [keras.Input((8,)), keras.layers.Dense(16, activation="relu")]
    if dropout:  # unseeded: torch's global stream
        out.append(keras.layers.Dropout(0.3))
    return [*out, keras.layers.Dense(3)]


def build(cls: type, dropout: bool = True) -> keras.Model:
    keras.utils.set_random_seed(3)
    return cls(layers(dropout))


def compile_args(cls: type) -> dict[str, Any]:
    """What Keras's own fit is compiled with; warmfit gets the same."""
    if cls is OwnLossStep:
        return {"optimizer": keras.optimizers.Adam(1e-2)}
    return {"optimizer": keras.optimizers.Adam(1e-2), "loss": xent(), "metrics": ["accuracy"]}


def settings(cls: type, **kwargs: Any) -> dict[str, Any]:
    """The Keras tests' reference settings; no loss for a model that brings its own."""
    out = keras_settings()
    if cls is OwnLossStep:
        out.update(loss=None, metrics=())
    out.update(kwargs)
    return out


def trainer(model: keras.Model, **kwargs: Any) -> warmfit.Trainer:
    return warmfit.Trainer(model, **settings(type(model), **kwargs))


def arrays(variables: list[Any]) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def assert_same_variables(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for va, vb, x, y in zip(a, b, arrays(a), arrays(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, (va.path, vb.path)
        assert np.array_equal(x, y), f"{va.path} differs"


def keras_fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int) -> Any:
    """Keras's own fit over warmfit's batches of a shuffle=False run."""
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)


def own_settings(model: keras.Model) -> dict[str, Any]:
    """The Trainer arguments that match ``compile_args``: a constant rate, in order."""
    if isinstance(model, OwnLossStep):
        return dict(optimizer=lambda: keras.optimizers.Adam(1e-2), schedule=None)
    return dict(optimizer=lambda: keras.optimizers.Adam(1e-2), loss=xent(), schedule=None)


# -- train_step: trained through it, exactly ------------------------------------------------
@pytest.mark.parametrize("cls", [GuideStep, OwnLossStep], ids=["compiled loss", "own loss"])
def test_own_train_step_trains_as_model_fit(cls):
    """warmfit calls the model's own train_step once per batch (and once to probe it):
    the weights and optimizer state are bit for bit those of Keras's model.fit over the
    same batches; the epoch loss is the steps' logs['loss']."""
    x, y = make_data(192)  # 12 full batches: Keras's per-batch mean is warmfit's mean
    ref = build(cls, dropout=False)
    ref.compile(**compile_args(cls))
    history = keras_fit(ref, x, y, epochs=2)
    assert CALLS["train_step"] == 24
    model = build(cls, dropout=False)
    t = trainer(model, **own_settings(model))
    t.fit(x, y, epochs=2, shuffle=False)
    assert_same_variables(ref.variables, model.variables)
    assert_same_variables(ref.optimizer.variables, model.optimizer.variables)
    assert CALLS["train_step"] == 24 + 24 + 1  # every step, and the probe
    assert [r["loss"] for r in t.history] == pytest.approx(history.history["loss"], rel=1e-6)


@pytest.mark.parametrize("cls", [GuideStep, OwnLossStep], ids=["compiled loss", "own loss"])
def test_own_train_step_split_and_resume_equal_straight(cls, tmp_path):
    """With an unseeded Dropout (torch's stream), warmfit's schedule and validation: split
    calls (one in the middle of an epoch) and a save/load into another model are bit for
    bit the straight run: weights, optimizer state, every stream, history."""
    x, y = make_data()
    # Keras's default test_step needs a compiled loss, as in model.evaluate
    val = {"validation_data": make_data(60, seed=9)} if cls is GuideStep else {}
    straight = trainer(build(cls))
    straight.fit(x, y, epochs=3, **val)
    assert CALLS["train_step"] == 3 * 13 + 1
    parts = trainer(build(cls))
    parts.fit(x, y, epochs=1, **val)
    parts.fit(x, y, steps=5, **val)
    parts.fit(x, y, until_epoch=3, **val)
    assert_same_state(straight, parts)
    first = trainer(build(cls))
    first.fit(x, y, epochs=1, **val)
    first.fit(x, y, steps=4, **val)
    first.save(tmp_path / "ck")
    keras.utils.set_random_seed(99)
    other = cls(layers(True))  # other initial values: the checkpoint overwrites them
    resumed = warmfit.Trainer.load(tmp_path / "ck", other, **settings(cls))
    resumed.fit(x, y, until_epoch=3, **val)
    assert_same_state(straight, resumed)
    if cls is GuideStep:  # validated through its own test_step: its margin is reported
        assert {"val_loss", "val_accuracy", "val_margin"} <= set(straight.history[-1])


NO_LOSS_MSG = (
    "The Keras model's own train_step ({name}.train_step) {problem}. warmfit trains "
    "through it and takes each step's loss from its logs: return a dict with a scalar "
    "'loss' entry (e.g. {{m.name: m.result() for m in self.metrics}}, with a tracker named "
    "'loss'), as keras.Model.train_step does."
)


class NoLossLogs(keras.Sequential):
    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        _apply(self, self.compute_loss(y=y, y_pred=y_pred))
        return {
            "accuracy": keras.ops.mean(
                keras.ops.cast(y == keras.ops.argmax(y_pred, axis=-1), "float32")
            )
        }


class LossTensor(keras.Sequential):
    def train_step(self, data: Any) -> Any:
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self.compute_loss(y=y, y_pred=y_pred)
        _apply(self, loss)
        return loss


class PerSampleLoss(keras.Sequential):
    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        losses = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        _apply(self, keras.ops.mean(losses))
        return {"loss": losses}


class ByHand(keras.Sequential):
    """Plain SGD by hand: warmfit's schedule and optimizer state would not apply."""

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self.compute_loss(y=y, y_pred=y_pred)
        loss.backward()
        with torch.no_grad():
            for v in self.trainable_weights:
                v.assign(v.value - 0.01 * v.value.grad)
        return {"loss": loss}


class Counting(GuideStep):
    """Keeps a Python counter on the model: state no checkpoint holds."""

    def train_step(self, data: Any) -> dict[str, Any]:
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        return super().train_step(data)


class BadTestStep(GuideStep):
    def test_step(self, data: Any) -> dict[str, Any]:
        x, _ = data
        return {"pred": self(x, training=False)}


BAD_STEPS = {
    "logs without loss": (NoLossLogs, NO_LOSS_MSG.format(
        name="NoLossLogs", problem="returned logs without 'loss': ['accuracy']")),
    "logs not a dict": (LossTensor, NO_LOSS_MSG.format(
        name="LossTensor", problem="returned Tensor, not a dict of logs")),
    "loss not a scalar": (PerSampleLoss, NO_LOSS_MSG.format(
        name="PerSampleLoss", problem="returned a 'loss' of shape (2,)")),
    "no model.optimizer": (ByHand, (
        "The Keras model's own train_step (ByHand.train_step) did not apply "
        "model.optimizer (its iterations stayed 0). warmfit saves, schedules and rebuilds "
        "model.optimizer only, so updates by other means would neither follow the schedule "
        "nor resume exactly: apply the gradients with self.optimizer.apply(grads, "
        "self.trainable_variables).")),
    "a Python counter": (Counting, (
        "The Keras model's own train_step (Counting.train_step) changed the model's "
        "Python attributes ['steps_taken']. warmfit saves Keras variables only, so that "
        "state would be lost on resume and a resumed run would differ: keep it in a "
        "variable (self.add_weight(..., trainable=False), updated with .assign) instead.")),
    "test_step logs not scalars": (BadTestStep, (
        "The Keras model's own test_step (BadTestStep.test_step) returned 'pred' of shape "
        "(2, 3), not a scalar. warmfit validates and evaluates through it and reports the "
        "logs of its last batch: return a dict of scalars (e.g. {m.name: m.result() for m "
        "in self.metrics}), as keras.Model.test_step does.")),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_STEPS, ids=list(BAD_STEPS))
def test_own_step_that_cannot_be_exact_is_refused_before_anything_changes(case):
    """The probe runs the model's own step once on the first rows, puts every variable,
    stream and Python attribute back, and refuses what warmfit could not train or
    resume exactly, before the first step."""
    import random

    cls, message = BAD_STEPS[case]
    x, y = make_data()
    t = trainer(build(cls), loss=xent())
    before = t.state_dict()
    caller = (random.getstate(), torch.get_rng_state())
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        t.fit(x, y, epochs=1, validation_data=(x[:50], y[:50]))
    assert_same_state(t.state_dict(), before, ledger=True)
    assert t.global_step == 0 and not t.ledger and not hasattr(t.model, "steps_taken")
    assert random.getstate() == caller[0] and torch.equal(torch.get_rng_state(), caller[1])
    assert all(v.value.grad is None for v in t.model.trainable_weights)


class TwoOptimizers(keras.Sequential):
    """A GAN-like model: a second optimizer of its own, which warmfit would not save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_optimizer = keras.optimizers.SGD(1e-2)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self.compute_loss(y=y, y_pred=y_pred)
        loss.backward()
        weights = self.trainable_weights
        with torch.no_grad():
            self.optimizer.apply([v.value.grad for v in weights[:2]], weights[:2])
            self.head_optimizer.apply([v.value.grad for v in weights[2:]], weights[2:])
        return {"loss": loss}


def test_own_train_step_with_another_optimizer_is_refused_at_construction():
    with pytest.raises(ValueError) as err:
        trainer(build(TwoOptimizers))
    assert str(err.value) == (
        "The Keras model TwoOptimizers has its own train_step and holds optimizers besides "
        "model.optimizer: ['head_optimizer']. warmfit saves, schedules and rebuilds "
        "model.optimizer only: the state of the others would be lost on resume, and a "
        "resumed run would differ. Step with model.optimizer alone "
        "(self.optimizer.apply(grads, self.trainable_variables) in train_step), or train "
        "the model with model.fit."
    )


def test_nan_in_own_train_step_stops_with_the_state_before_it():
    """Keras's default step is checked before the update; an own step updates first, so
    on the CPU warmfit copies the variables before each step and puts them back on a
    NaN: the trainer holds the state after the last good step, as the error says."""
    x, y = make_data()
    x[100:] = np.nan  # in order: the 7th batch is the first with a NaN
    t = trainer(build(GuideStep), schedule=None)
    with pytest.raises(warmfit.NonFiniteLossError) as err:
        t.fit(x, y, epochs=1, shuffle=False)
    assert err.value.step == 7 and "stopped before that step's update" in str(err.value)
    ref = trainer(build(GuideStep), schedule=None)
    ref.fit(x, y, steps=6, shuffle=False)
    assert_same_variables(ref.model.variables, t.model.variables)
    assert_same_variables(ref.optimizer.variables, t.optimizer.variables)
    assert t.global_step == err.value.step - 1
    assert CALLS["train_step"] == 1 + err.value.step + 1 + err.value.step - 1


# -- test_step and predict_step --------------------------------------------------------------
class OwnPredictStep(GuideStep):
    def predict_step(self, data: Any) -> Any:
        CALLS["predict_step"] += 1
        return keras.ops.softmax(self(data, training=False))


def test_own_test_step_and_predict_step_are_what_evaluate_and_predict_use():
    """Validation, evaluate and predict go through the model's own test_step and
    predict_step: the same numbers as Keras's model.evaluate and model.predict."""
    x, y = make_data()
    xv, yv = make_data(60, seed=9)
    model = build(OwnPredictStep)
    t = trainer(model)
    t.fit(x, y, epochs=1, validation_data=(xv, yv))
    CALLS["test_step"] = 0
    ours = t.evaluate(xv, yv)
    assert CALLS["test_step"] == 1 + 4  # the probe, then batches of 16
    theirs = model.evaluate(xv, yv, batch_size=16, verbose=0, return_dict=True)
    assert ours == theirs and set(ours) == {"loss", "accuracy", "margin"}
    assert {f"val_{k}" for k in ours} <= set(t.history[-1])
    assert np.array_equal(t.predict(x), model.predict(x, batch_size=16, verbose=0))
    assert CALLS["predict_step"] == 2 * 13


class DictPredictStep(GuideStep):
    def predict_step(self, data: Any) -> Any:
        return {"logits": self(data, training=False)}


def test_own_predict_step_that_returns_no_tensor_is_refused():
    t = trainer(build(DictPredictStep))
    with pytest.raises(TypeError) as err:
        t.predict(make_data()[0])
    assert str(err.value) == (
        "The Keras model's own predict_step (DictPredictStep.predict_step) returned dict; "
        "warmfit's predict returns one array: return a tensor, or call model.predict."
    )


def test_own_test_step_or_predict_step_off_torch_is_refused(monkeypatch):
    """Off the torch backend warmfit cannot call them: refused when the Trainer is built."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError) as err:
        trainer(build(OwnPredictStep))
    assert str(err.value) == (
        "The Keras model OwnPredictStep overrides test_step and predict_step: on the Keras "
        "'jax' backend warmfit evaluates with model.compute_loss and "
        "model.compute_metrics and predicts with model(x), so the override would be "
        "skipped. Use KERAS_BACKEND=torch, where warmfit calls the model's own test_step "
        "and predict_step, or remove the override."
    )


# -- compute_loss, compute_metrics, add_loss: Keras's default step, exactly ------------------
class OwnComputeLoss(keras.Sequential):
    """Keras's documented ``compute_loss`` override: ``sample_weight`` without a default,
    ``self.losses`` added, a tracker updated; and a ``compute_metrics`` with the same
    signature that reports one more value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalty = keras.metrics.Mean(name="penalty")

    def compute_loss(self, x, y, y_pred, sample_weight, training=True):
        penalty = 0.1 * keras.ops.mean(y_pred**2)
        self.penalty.update_state(penalty)
        xent_ = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        return keras.ops.mean(xent_) + penalty + keras.ops.sum(self.losses)

    def compute_metrics(self, x, y, y_pred, sample_weight):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        logs["top"] = keras.ops.mean(keras.ops.max(y_pred, axis=-1))
        return logs


class AddsLoss(keras.layers.Layer):
    def call(self, x: Any) -> Any:
        self.add_loss(1e-2 * keras.ops.mean(keras.ops.square(x)))
        return x


def regularised(cls: type = keras.Sequential, regularise: bool = True) -> keras.Model:
    keras.utils.set_random_seed(3)
    reg = dict(
        kernel_regularizer=keras.regularizers.L2(1e-2),
        activity_regularizer=keras.regularizers.L1(1e-3),
    )
    return cls(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", **(reg if regularise else {})),
            *([AddsLoss()] if regularise else []),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize(
    "cls", [OwnComputeLoss, keras.Sequential], ids=["compute_loss", "add_loss, regularizers"]
)
def test_default_step_with_own_loss_or_added_losses_trains_as_model_fit(cls, tmp_path):
    """Keras's default step, warmfit's copy of it: an own compute_loss (with Keras's
    documented signature) and the losses of add_loss and regularizers count as in
    model.fit, bit for bit; split calls and a resume equal the straight run."""
    x, y = make_data(192)
    ref = regularised(cls)
    ref.compile(optimizer=keras.optimizers.Adam(1e-2), loss=xent(), metrics=["accuracy"])
    keras_fit(ref, x, y, epochs=2)
    model = regularised(cls)
    t = trainer(model, optimizer=lambda: keras.optimizers.Adam(1e-2), schedule=None)
    t.fit(x, y, epochs=2, shuffle=False)
    assert_same_variables(ref.variables, model.variables)
    assert_same_variables(ref.optimizer.variables, model.optimizer.variables)
    plain = regularised(regularise=False)  # the added losses do change the weights
    assert np.array_equal(arrays(plain.variables)[0], arrays(regularised(cls).variables)[0])
    trainer(plain, optimizer=lambda: keras.optimizers.Adam(1e-2), schedule=None).fit(
        x, y, epochs=2, shuffle=False
    )
    assert not np.array_equal(arrays(plain.variables)[0], arrays(model.variables)[0])
    ours = t.evaluate(x, y)
    theirs = ref.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert ours.pop("loss") == pytest.approx(theirs.pop("loss"), rel=1e-6)
    assert ours == theirs and ("top" in ours) is (cls is OwnComputeLoss)

    straight = trainer(regularised(cls))
    straight.fit(x, y, epochs=2, validation_split=0.25)
    parts = trainer(regularised(cls))
    parts.fit(x, y, steps=5, validation_split=0.25)
    parts.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(tmp_path / "ck", regularised(cls), **settings(cls))
    resumed.fit(x, y, until_epoch=2, validation_split=0.25)
    assert_same_state(straight, resumed)


def test_fit_of_a_keras_model_under_torch_autocast_is_refused():
    """Keras on torch computes with torch's ops: an ambient autocast would reach them."""
    import torch

    from test_keras import make_keras_trainer

    x, y = make_data(64)
    trainer = make_keras_trainer()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as err:
        trainer.fit(x, y, epochs=1)
    assert str(err.value).startswith(
        "Trainer.fit was called inside torch.autocast (enabled for 'cpu', dtype "
        "torch.bfloat16). autocast keeps its casts of the weights for the whole block"
    )
    assert str(err.value).endswith(
        "for mixed precision, build the model under a Keras dtype policy "
        "(keras.mixed_precision), which casts at each layer call."
    )
    assert trainer.epoch == 0 and len(trainer.ledger) == 0
