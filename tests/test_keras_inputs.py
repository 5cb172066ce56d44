"""Keras models with several inputs (issue 18): ``x`` as ``model.fit`` takes it — a dict
``{input name: array}``, a list or tuple of arrays, nested as the model's inputs — with
the same exactness as one array (split calls, save and load, the conformance suite, bit
for bit), validation, ``evaluate`` and ``predict`` on the same structures, and every
refusal before anything changes, with its message."""

from __future__ import annotations

import copy
import warnings
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

from conftest import assert_same_state, make_data, require

keras = require("keras", reason="keras 3 is not installed: the Keras backend cannot be tested")

import warmfit  # noqa: E402
from warmfit import schedules  # noqa: E402
from warmfit.data import fingerprint  # noqa: E402
from warmfit.testing import CHECKS, Case, check_backend  # noqa: E402

N = 200  # samples; batches of 16: 13 steps an epoch


def two_inputs(seed: int = 3) -> keras.Model:
    """A functional model of two named inputs, ``a`` (8 features) and ``b`` (4), with an
    unseeded Dropout (on torch: torch's global stream)."""
    keras.utils.set_random_seed(seed)  # the instance's initial weights
    a, b = keras.Input((8,), name="a"), keras.Input((4,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(a), b])
    return keras.Model([a, b], keras.layers.Dense(3)(keras.layers.Dropout(0.3)(h)))


def settings() -> dict[str, Any]:
    return dict(
        optimizer=lambda: keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        schedule=schedules.warmup(5, schedules.cosine(1e-2, horizon=60)),
        batch_size=16,
        seed=7,
        verbose=0,
    )


def trainer(model: keras.Model | None = None, **kwargs: Any) -> warmfit.Trainer:
    return warmfit.Trainer(model or two_inputs(), **{**settings(), **kwargs})


@cache
def arrays(n: int = N, seed: int = 123) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x, y = make_data(n, d=12, seed=seed)
    return {"a": x[:, :8], "b": x[:, 8:]}, y


def as_list(x: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [x["a"], x["b"]]


# -- exactness -----------------------------------------------------------------------------
def test_split_calls_equal_one_call_with_a_dict_of_inputs():
    x, y = arrays()
    straight = trainer()
    straight.fit(x, y, epochs=2, validation_split=0.2)
    parts = trainer()
    parts.fit(x, y, epochs=1, validation_split=0.2)
    parts.fit(x, y, epochs=1, validation_split=0.2)
    assert_same_state(straight, parts)
    assert [r["segment"] for r in parts.history] == [0, 1]
    assert "val_loss" in parts.history[-1] and parts.global_step == 2 * 10  # 160 rows


def test_save_load_into_a_fresh_trainer_then_continue_equals_straight(tmp_path):
    x, y = arrays()
    straight = trainer()
    straight.fit(x, y, epochs=3)
    first = trainer()
    first.fit(x, y, steps=5)  # inside an epoch
    path = first.save(tmp_path / "ckpt")
    resumed = warmfit.Trainer.load(path, two_inputs(), **settings())
    assert_same_state(first, resumed)
    resumed.fit(x, y, until_epoch=3)
    assert_same_state(straight, resumed)


def test_a_list_of_arrays_trains_as_the_dict_does():
    """The same model fed ``[a, b]`` (the model's order) and ``(a, b)``: the same batches,
    so the same bits; only the fingerprint differs (the paths ``x[0]`` and ``x['a']``
    are part of it)."""
    x, y = arrays()
    by_name = trainer()
    by_name.fit(x, y, epochs=2)
    by_position = trainer()
    by_position.fit(as_list(x), y, epochs=1)
    by_position.fit(as_list(x), y, epochs=1)
    assert_same_state(by_name, by_position, differ=["data.fingerprint"])
    as_tuple = trainer()
    as_tuple.fit(tuple(as_list(x)), y, epochs=2)
    assert_same_state(by_position, as_tuple)
    tensors = trainer()  # leaves as tensors: the same arrays, the same fingerprint
    tensors.fit({k: torch.from_numpy(v) for k, v in x.items()}, torch.from_numpy(y), epochs=2)
    assert_same_state(by_name, tensors)


def test_a_dict_in_another_key_order_is_the_same_data():
    x, y = arrays()
    t = trainer()
    t.fit(x, y, epochs=1)
    fp = t.state_dict()["state"]["data"]["fingerprint"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the training data changed"
        t.fit({"b": x["b"], "a": x["a"]}, y, epochs=1)
    assert t.state_dict()["state"]["data"]["fingerprint"] == fp
    other = trainer()
    other.fit(x, y, epochs=2)
    assert_same_state(t, other)


def test_the_fingerprint_of_one_array_has_not_changed():
    """One array: the hash of the arrays, as before structures (a checkpoint's record
    still matches); a dict: its paths are hashed too, so renaming an input changes it."""
    x, y = make_data()
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    t = trainer(model)
    t.fit(x, y, epochs=1)
    record = t.state_dict()["state"]["data"]
    assert record["fingerprint"] == fingerprint(x, y) and record["shape"] == [200, 8]
    xd, yd = arrays()
    d = trainer()
    d.fit(xd, yd, epochs=1)
    record = d.state_dict()["state"]["data"]
    names = ["x['a']", "x['b']", "y"]
    assert record["fingerprint"] == fingerprint(xd["a"], xd["b"], yd, names=names)
    assert record["shape"] == [200, 8]  # the rows, and the first input's other dimensions


# -- the conformance suite -----------------------------------------------------------------
@cache
def validation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    return arrays(60, seed=9)


DICT_CASE = Case(
    "keras-torch-dict-inputs",
    lambda: (two_inputs(), settings()),
    arrays,
    fit_kwargs=lambda: {"validation_data": validation()},
    total=3,
    steps_per_epoch=13,
)


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance_with_a_dict_of_inputs(check, tmp_path):
    check_backend(DICT_CASE, tmp_path, checks=[check])


# -- validation, evaluate, predict ---------------------------------------------------------
def test_validation_evaluate_and_predict_take_the_same_structures():
    x, y = arrays()
    t = trainer()
    t.fit(x, y, epochs=2, validation_split=0.25)
    rows = t.state_dict()["tensors"]["data/val_rows"]
    val = t.evaluate({k: v[rows] for k, v in x.items()}, y[rows])
    last = t.history[-1]
    assert (val["loss"], val["accuracy"]) == (last["val_loss"], last["val_accuracy"])
    assert t.evaluate(x, y) == t.evaluate(as_list(x), y) == t.evaluate(tuple(as_list(x)), y)
    out = t.predict(x, batch_size=N)
    expected = keras.ops.convert_to_numpy(t.model(x, training=False))
    assert out.shape == (N, 3) and np.array_equal(out, expected)
    assert np.array_equal(t.predict(as_list(x), batch_size=N), out)
    assert np.array_equal(t.predict(x, batch_size=7), out)
    with_val = trainer()
    with_val.fit(x, y, epochs=1, validation_data=validation())
    assert with_val.history[-1]["val_loss"] == with_val.evaluate(*validation())["loss"]


def test_a_model_with_several_outputs_takes_a_dict_of_targets():
    """``y`` may be a structure too (the model's outputs): split calls are exact, and
    ``predict`` returns the outputs' structure, as ``model.predict`` does."""
    x, y = arrays()
    ys = {"cls": y, "reg": x["a"][:, :1] * 2.0}

    def two_outputs() -> keras.Model:
        keras.utils.set_random_seed(3)
        a, b = keras.Input((8,), name="a"), keras.Input((4,), name="b")
        h = keras.layers.Dropout(0.3)(keras.layers.Concatenate()([a, b]))
        cls, reg = keras.layers.Dense(3, name="cls")(h), keras.layers.Dense(1, name="reg")(h)
        return keras.Model({"a": a, "b": b}, {"cls": cls, "reg": reg})

    loss = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}
    straight = trainer(two_outputs(), loss=loss, metrics=None)
    straight.fit(x, ys, epochs=2, validation_split=0.2)
    parts = trainer(two_outputs(), loss=loss, metrics=None)
    parts.fit(x, ys, epochs=1, validation_split=0.2)
    parts.fit(x, ys, epochs=1, validation_split=0.2)
    assert_same_state(straight, parts)
    assert {"val_cls_loss", "val_reg_loss"} <= set(parts.history[-1])
    out = parts.predict(x, batch_size=64)
    assert {k: v.shape for k, v in out.items()} == {"cls": (N, 3), "reg": (N, 1)}


def test_nested_inputs_as_the_model_was_built():
    """A model built from ``{"a": a, "pair": [b, c]}`` takes the same nesting."""
    keras.utils.set_random_seed(3)
    a, b, c = (keras.Input((n,), name=k) for n, k in ((8, "a"), (2, "b"), (2, "c")))
    h = keras.layers.Concatenate()([a, b, c])
    model = keras.Model({"a": a, "pair": [b, c]}, keras.layers.Dense(3)(h))
    x, y = arrays()
    nested = {"a": x["a"], "pair": [x["b"][:, :2], x["b"][:, 2:]]}
    t = trainer(model)
    t.fit(nested, y, epochs=1)
    assert t.predict(nested).shape == (N, 3)
    with pytest.raises(ValueError) as err:
        t.fit({"a": x["a"], "pair": [x["b"]]}, y, epochs=1)
    assert str(err.value) == (
        "x['pair'] is a list of 1 array, but the model takes at x['pair'] 2 inputs ['b', "
        "'c']: expected one array per input, in the model's order. Pass 2 arrays, or a dict "
        "keyed by the input names."
    )


def test_an_own_train_step_gets_the_dict_as_model_fit_passes_it():
    """A functional model whose class overrides ``train_step`` receives ``(x, y)`` with
    ``x`` the dict, as ``model.fit`` passes it; split calls stay exact."""

    class Stepper(keras.Model):
        def train_step(self, data: Any) -> Any:
            x, y = data
            assert isinstance(x, dict) and sorted(x) == ["a", "b"]
            y_pred = self(x, training=True)
            self.zero_grad()
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            loss.backward()
            weights = self.trainable_weights
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in weights], weights)
            return {"loss": loss}

    def model() -> keras.Model:
        base = two_inputs()
        return Stepper(base.inputs, base.outputs)

    x, y = arrays()
    straight = trainer(model())
    straight.fit(x, y, epochs=2)
    parts = trainer(model())
    parts.fit(x, y, steps=5)
    parts.fit(x, y, until_epoch=2)
    assert_same_state(straight, parts)


# -- refusals, before anything changes -----------------------------------------------------
XA, Y = arrays()[0]["a"], arrays()[1]
XB = arrays()[0]["b"]
WRONG_KEYS = (
    "The keys of x are not the model's input names: expected ['a', 'b'], got ['a', 'c'] "
    "(missing ['b']; not inputs ['c']). Pass x as a dict with exactly these keys, one array "
    "per input (the names given to keras.Input(name=...), or the keys of the dict the model "
    "was built with)."
)
SPEC = "expected x {'a': (None, 8) float32, 'b': (None, 4) float32} (the model's inputs)"
REFUSED: dict[str, tuple[Any, type[Exception], str]] = {
    "a key that is no input": (
        lambda t: t.fit({"a": XA, "c": XB}, Y, epochs=1, mode="restart"),
        ValueError,
        WRONG_KEYS,
    ),
    "a key too many": (
        lambda t: t.fit({"a": XA, "b": XB, "c": XB}, Y, epochs=1),
        ValueError,
        "The keys of x are not the model's input names: expected ['a', 'b'], got ['a', 'b', "
        "'c'] (not inputs ['c']). Pass x as a dict with exactly these keys, one array per "
        "input (the names given to keras.Input(name=...), or the keys of the dict the model "
        "was built with).",
    ),
    "a list of one array": (
        lambda t: t.fit([XA], Y, epochs=1),
        ValueError,
        "x is a list of 1 array, but the model has 2 inputs ['a', 'b']: expected one array "
        "per input, in the model's order. Pass 2 arrays, or a dict keyed by the input names.",
    ),
    "a tuple of three arrays": (
        lambda t: t.fit((XA, XB, XB), Y, epochs=1),
        ValueError,
        "x is a tuple of 3 arrays, but the model has 2 inputs ['a', 'b']: expected one array "
        "per input, in the model's order. Pass 2 arrays, or a dict keyed by the input names.",
    ),
    "one array for two inputs": (
        lambda t: t.fit(XA, Y, epochs=1),
        ValueError,
        "x is one array (200, 8) float32, but the model has 2 inputs ['a', 'b']: pass a dict "
        "keyed by the input names, or a list of 2 arrays in the model's order.",
    ),
    "inputs of different lengths": (
        lambda t: t.fit({"a": XA, "b": XB[:150]}, Y, epochs=1),
        ValueError,
        "Every array of x must have the same number of samples (its first dimension): "
        "x['a'] has 200, x['b'] has 150. Pass one row per sample in each.",
    ),
    "y of another length": (
        lambda t: t.fit({"a": XA, "b": XB}, Y[:150], epochs=1),
        ValueError,
        "x and y must have the same number of samples. Got 200 rows in x and 150 in y.",
    ),
    "an input of strings": (
        lambda t: t.fit({"a": XA, "b": np.full((N, 4), "x")}, Y, epochs=1),
        TypeError,
        "x['b'] must be numeric (a NumPy array or tensor). Got dtype <U1.",
    ),
    "an input with a scalar": (
        lambda t: t.fit([XA, np.float32(1.0)], Y, epochs=1),
        ValueError,
        "x[1] must have at least one dimension (samples first). Got a scalar 1.0.",
    ),
    "an empty dict": (
        lambda t: t.fit({}, Y, epochs=1),
        ValueError,
        "The keys of x are not the model's input names: expected ['a', 'b'], got [] (missing "
        "['a', 'b']). Pass x as a dict with exactly these keys, one array per input (the "
        "names given to keras.Input(name=...), or the keys of the dict the model was built "
        "with).",
    ),
    "validation data with a key that is no input": (
        lambda t: t.fit({"a": XA, "b": XB}, Y, epochs=1, validation_data=({"a": XA, "c": XB}, Y)),
        ValueError,
        WRONG_KEYS,
    ),
    "an input with 3 features": (
        lambda t: t.fit({"a": XA, "b": XB[:, :3]}, Y, epochs=1, mode="restart"),
        ValueError,
        f"The data does not fit the model or the loss: fit: {SPEC}, got x {{'a': (200, 8) "
        "float32, 'b': (200, 3) float32}, y (200,) int64. On its first rows ValueError: ",
    ),
    "evaluate with a key that is no input": (
        lambda t: t.evaluate({"a": XA, "c": XB}, Y),
        ValueError,
        WRONG_KEYS,
    ),
    "predict with a list of one array": (
        lambda t: t.predict([XA]),
        ValueError,
        "x is a list of 1 array, but the model has 2 inputs ['a', 'b']: expected one array "
        "per input, in the model's order. Pass 2 arrays, or a dict keyed by the input names.",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_refusal_names_the_problem_and_changes_nothing(case):
    call, kind, message = REFUSED[case]
    t = trainer()
    t.fit({"a": XA, "b": XB}, Y, epochs=1)
    before, calls = copy.deepcopy(t.state_dict()), len(t.ledger)
    with pytest.raises(kind) as err:
        call(t)
    if message.endswith("On its first rows ValueError: "):  # then Keras's own words
        assert str(err.value).startswith(message)
    else:
        assert str(err.value) == message
    assert_same_state(before, t, ledger=True)
    assert len(t.ledger) == calls and t.epoch == 1


def test_a_subclassed_model_taking_a_dict_is_left_to_the_probe():
    """A subclassed model has no symbolic inputs to compare keys with: it trains on the
    dict it reads, and a missing key is the probe's refusal, with Keras's reason."""

    class ByKey(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x: Any) -> Any:
            return self.dense(keras.ops.concatenate([x["a"], x["b"]], axis=-1))

    keras.utils.set_random_seed(3)
    model = ByKey()
    x, y = arrays()
    model({k: v[:1] for k, v in x.items()})  # builds its layers
    t = trainer(model)
    t.fit(x, y, epochs=1)
    with pytest.raises(ValueError) as err:
        t.fit({"a": x["a"]}, y, epochs=1)
    assert str(err.value).startswith(
        "The data does not fit the model or the loss: fit: x {'a': (200, 8) float32}, y "
        "(200,) int64. On its first rows KeyError: b. Check"
    )
