"""Real training under the contract with structured batches and the user's own step
(issue 18): dicts, tuples and nested structures of arrays, Datasets whose items are
such structures, ``loss=None`` (the model's own ``.loss``, the Hugging Face convention),
``step=fn(model, batch) -> loss``, optimizer factories that see the parameters' names,
and the refusals of what cannot train. Every comparison is bit for bit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import warmfit
from conftest import MLP, adam, assert_same_state, make_data, make_trainer, trainer_settings
from warmfit import schedules
from warmfit.testing import Case, check_backend

N, BS = 64, 16  # 4 steps an epoch
SCHEDULE = schedules.warmup(3, schedules.cosine(1e-2, horizon=40))


def settings(**kwargs: Any) -> dict[str, Any]:
    return {"optimizer": adam, "schedule": SCHEDULE, "batch_size": BS, "seed": 7,
            "verbose": 0, **kwargs}  # fmt: skip


# -- a Hugging-Face-style model: a dict of inputs in, an output with .loss out --------------
@dataclasses.dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyLM(nn.Module):
    """``forward(input_ids, attention_mask, labels=None)`` returns ``Output(loss,
    logits)`` (or a dict, ``as_dict``), the loss only when given labels; with dropout."""

    def __init__(self, vocab: int = 11, d: int = 8, classes: int = 3, as_dict: bool = False):
        super().__init__()
        self.emb, self.drop = nn.Embedding(vocab, d), nn.Dropout(0.3)
        self.head, self.as_dict = nn.Linear(d, classes), as_dict

    def forward(self, input_ids, attention_mask, labels=None):  # type: ignore[no-untyped-def]
        h = self.drop(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if self.as_dict else Output(loss, logits)


def lm_data(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 11, size=(n, 6)).astype(np.int64)
    mask = (np.arange(6)[None, :] < rng.integers(2, 7, size=(n, 1))).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % 3).astype(np.int64)}


def lm_trainer(**kwargs: Any) -> warmfit.Trainer:
    as_dict = kwargs.pop("as_dict", False)
    return warmfit.Trainer(lambda: TinyLM(as_dict=as_dict), **settings(loss=None, **kwargs))


@pytest.mark.parametrize("as_dict", [False, True], ids=["output-with-.loss", "dict-with-loss"])
def test_a_hugging_face_style_model_trains_from_a_dict_exactly(tmp_path, as_dict):
    x = lm_data()
    straight = lm_trainer(as_dict=as_dict)
    straight.fit(x, epochs=2)
    split = lm_trainer(as_dict=as_dict)
    split.fit(x, epochs=1)
    split.save(tmp_path / "ck")
    split.fit(x, epochs=1)
    assert_same_state(straight, split)
    resumed = warmfit.Trainer.load(
        tmp_path / "ck", lambda: TinyLM(as_dict=as_dict), **settings(loss=None)
    )
    resumed.fit(x, epochs=1)
    assert_same_state(straight, resumed)
    assert straight.global_step == 8 and np.isfinite(straight.history[-1]["loss"])
    # dropout drew from the trainer's stream: another seed trains other weights
    other = lm_trainer(as_dict=as_dict, seed=8)
    other.fit(x, epochs=2)
    assert not torch.equal(other.model.head.weight, straight.model.head.weight)


# -- a two-input model from Datasets ----------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(3, 8)
        self.drop, self.out = nn.Dropout(p), nn.Linear(8, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.a(x1) + self.b(x2))))


class TwoInputsWithLoss(TwoInputs):
    """``forward(x1, x2, labels)`` returning ``{"loss", "logits"}``."""

    def forward(self, x1, x2, labels=None):  # type: ignore[no-untyped-def,override]
        logits = super().forward(x1, x2)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def two_inputs(n: int = N, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n, 5)).astype(np.float32)
    x2 = rng.normal(size=(n, 3)).astype(np.float32)
    return x1, x2, ((x1[:, 0] + x2[:, 0]) > 0).astype(np.int64) + (x1[:, 1] > 1)


class Items(torch.utils.data.Dataset):
    """A map-style Dataset of ``make(i)``."""

    def __init__(self, make: Any, n: int = N) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.make(i)


def two_trainer(**kwargs: Any) -> warmfit.Trainer:
    model = kwargs.pop("model", TwoInputs)
    return warmfit.Trainer(model, **settings(**{"loss": "cross_entropy", **kwargs}))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tuple_dataset_trains_like_the_arrays_with_any_number_of_workers(workers):
    x1, x2, y = two_inputs()
    arrays = two_trainer()
    arrays.fit((x1, x2), y, epochs=2)
    pairs = Items(lambda i: ((torch.from_numpy(x1[i]), torch.from_numpy(x2[i])), int(y[i])))
    from_dataset = two_trainer(num_workers=workers)
    from_dataset.fit(pairs, epochs=2)
    # the whole state; the fingerprint is another by design (arrays, a Dataset)
    assert_same_state(arrays, from_dataset, differ=("data.fingerprint",))


def test_a_dict_dataset_with_two_workers_equals_no_workers():
    x1, x2, y = two_inputs()
    items = Items(lambda i: {"x1": x1[i], "x2": x2[i], "labels": y[i]})
    runs = []
    for workers in (0, 2):
        t = two_trainer(model=TwoInputsWithLoss, loss=None, num_workers=workers)
        t.fit(items, epochs=1)
        t.fit(items, epochs=1)
        runs.append(t)
    assert_same_state(*runs)
    arrays = two_trainer(model=TwoInputsWithLoss, loss=None)
    arrays.fit({"x1": x1, "x2": x2, "labels": y}, epochs=2)
    assert_same_state(arrays, runs[0], differ=("data.fingerprint",))


# -- step=: the user's forward and loss ----------------------------------------------------
def smoothed(model: nn.Module, batch: Any) -> torch.Tensor:
    """A custom loss on a dict batch: label smoothing, the inputs by key."""
    x, y = batch
    return F.cross_entropy(model(x["x1"], x["x2"]), y, label_smoothing=0.1)


def test_a_step_with_a_custom_loss_on_a_dict_batch_splits_exactly(tmp_path):
    x1, x2, y = two_inputs()
    x = {"x1": x1, "x2": x2}
    seen: list[Any] = []

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(batch)
        return smoothed(model, batch)

    straight = two_trainer(loss=None, step=step)
    straight.fit(x, y, epochs=3)
    (xb, yb) = seen[-1]
    assert set(xb) == {"x1", "x2"} and xb["x1"].shape == (BS, 5) and yb.dtype == torch.int64
    split = two_trainer(loss=None, step=step)
    split.fit(x, y, epochs=1)
    split.fit(x, y, steps=3)  # stops inside epoch 2
    split.save(tmp_path / "ck")
    split.fit(x, y, until_epoch=3)
    assert_same_state(straight, split)
    resumed = warmfit.Trainer.load(tmp_path / "ck", TwoInputs, **settings(step=step))
    resumed.fit(x, y, until_epoch=3)
    assert_same_state(straight, resumed)
    # the step's loss is what the history and evaluate report
    assert straight.history[-1]["loss"] > 0
    with torch.no_grad():
        straight.model.eval()
        want = float(smoothed(straight.model, ({k: torch.from_numpy(v) for k, v in x.items()},
                                                torch.from_numpy(y))))  # fmt: skip
    got = straight.evaluate(x, y, batch_size=N)["loss"]
    assert abs(got - want) < 1e-6


# -- the conformance suite on dict batches ---------------------------------------------------
def test_the_conformance_suite_passes_on_dict_batches(tmp_path):
    x1, x2, y = two_inputs(80)
    v1, v2, yv = two_inputs(24, seed=5)
    case = Case(
        "torch-dict-batches",
        build=lambda: (TwoInputs, settings(loss="cross_entropy", metrics=["accuracy"])),
        data=lambda: ({"x1": x1, "x2": x2}, y),
        fit_kwargs=lambda: {"validation_data": ({"x1": v1, "x2": v2}, yv)},
        steps_per_epoch=5,
    )
    check_backend(case, tmp_path)


# -- optimizer factories that see names ---------------------------------------------------------
def by_name(named_parameters: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """nanoGPT's recipe: weight decay on matrices, none on biases and norms."""
    decay = [p for _, p in named_parameters if p.dim() >= 2]
    no_decay = [p for _, p in named_parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2)


def named_straight_to_torch(named_params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(named_params, lr=1e-2)  # torch keeps the names in its groups


def of_the_model(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [{"params": model.net[0].parameters()}, {"params": model.net[3].parameters(), "lr": 2e-3}],
        lr=1e-2,
    )


@pytest.mark.parametrize("factory", [by_name, named_straight_to_torch, of_the_model])
def test_optimizer_factories_by_name_resume_exactly(tmp_path, factory):
    x, y = make_data(N)
    straight = make_trainer(optimizer=factory)
    straight.fit(x, y, epochs=3)
    t = make_trainer(optimizer=factory)
    t.fit(x, y, epochs=1)
    t.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(tmp_path / "ck", MLP, **{**trainer_settings(), "optimizer": factory})
    resumed.fit(x, y, epochs=2)
    assert_same_state(straight, resumed)
    groups = straight.optimizer.param_groups
    if factory is by_name:
        names = dict(MLP().named_parameters())
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert [p.shape for p in groups[0]["params"]] == [names["net.0.weight"].shape,
                                                          names["net.3.weight"].shape]  # fmt: skip
    if factory is named_straight_to_torch:
        assert groups[0]["param_names"] == [n for n, _ in MLP().named_parameters()]
    # warm calls the factory again: a fresh optimizer with the same groups
    before = straight.optimizer
    straight.fit(x, y, epochs=1, mode="warm")
    assert straight.optimizer is not before and len(straight.optimizer.param_groups) == len(groups)


# -- refusals, each before anything changes ------------------------------------------------------
X1, X2, Y = two_inputs()
X = {"x1": X1, "x2": X2}


def per_sample(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(**x), y, reduction="none")


def a_float(model: nn.Module, batch: Any) -> float:
    return 2.5


def detached(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(**x), y).detach()


RETURNS = "; it must return the loss as a scalar tensor (0-dim, floating point), e.g. `return F.cross_entropy(model(x), y)` or `loss.mean()`. Nothing was trained on it."
DATA_NOT_DATASET = "Supported: arrays or tensors, a dict, tuple or list of them (nested; the same number of rows in each), or a map-style torch Dataset (__getitem__ and __len__)."


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([])


class SizedStream(Stream):
    def __len__(self) -> int:
        return N


REFUSALS: dict[str, tuple[dict[str, Any], Any, type, str]] = {
    # name: (Trainer settings, the fit call, exception, the whole message)
    "leaves of different lengths": (
        {},
        lambda t: t.fit({"x1": X1, "x2": X2[:60]}, Y, epochs=1),
        ValueError,
        "Every array of x must have the same number of samples (its first dimension): "
        "x['x1'] has 64, x['x2'] has 60. Pass one row per sample in each.",
    ),
    "nested leaves of different lengths": (
        {},
        lambda t: t.fit(((X1, X2), Y[:10]), Y, epochs=1),
        ValueError,
        "Every array of x must have the same number of samples (its first dimension): "
        "x[0][0] has 64, x[0][1] has 64, x[1] has 10. Pass one row per sample in each.",
    ),
    "a leaf of strings": (
        {},
        lambda t: t.fit({"x1": X1, "x2": X2.astype(str)}, Y, epochs=1),
        TypeError,
        f"x['x2'] must be numeric (a numpy array or torch tensor). Got dtype {X2.astype(str).dtype}.",
    ),
    "a leaf that is None": (
        {},
        lambda t: t.fit({"x1": X1, "x2": None}, Y, epochs=1),
        TypeError,
        "x['x2'] must be numeric (a numpy array or torch tensor). Got dtype object.",
    ),
    "a list of one array per sample": (
        {},
        lambda t: t.fit(list(X1), Y, epochs=1),
        ValueError,
        "x and y must have the same number of samples. Got 5 rows in x and 64 in y. (x is a "
        "list of 64 arrays of one shape, taken as 64 inputs of the model; if it holds one "
        "array per sample, pass np.stack(x).)",
    ),
    "y of another length than the structure": (
        {},
        lambda t: t.fit(X, Y[:10], epochs=1),
        ValueError,
        "x and y must have the same number of samples. Got 64 rows in x and 10 in y.",
    ),
    "a key the forward does not take": (
        {},
        lambda t: t.fit({"x1": X1, "z": X2}, Y, epochs=1),
        ValueError,
        "The data does not fit the model's forward: fit: x is a dict with keys ['x1', 'z'], "
        "passed to it as model(**x), and TwoInputs.forward takes (x1, x2): keys without a "
        "parameter: ['z']; parameters without a key: ['x2']. Name the keys (or order the "
        "parts) as the forward's parameters, or pass step=fn(model, batch) -> loss, which "
        "calls the model as it wants.",
    ),
    "a tuple of too many inputs": (
        {},
        lambda t: t.fit((X1, X2, X2), Y, epochs=1),
        ValueError,
        "The data does not fit the model's forward: fit: x is a tuple of 3 (Tensor of dtype "
        "torch.float32, Tensor of dtype torch.float32, Tensor of dtype torch.float32), passed "
        "to it as model(*x), and TwoInputs.forward takes (x1, x2): 3 inputs for 2 positional "
        "parameters. Name the keys (or order the parts) as the forward's parameters, or pass "
        "step=fn(model, batch) -> loss, which calls the model as it wants.",
    ),
    "validation data the forward does not take": (
        {},
        lambda t: t.fit(X, Y, epochs=1, validation_data=({"x1": X1}, Y)),
        ValueError,
        "The data does not fit the model's forward: validation: x is a dict with keys "
        "['x1'], passed to it as model(**x), and TwoInputs.forward takes (x1, x2): "
        "parameters without a key: ['x2']. Name the keys (or order the parts) as the "
        "forward's parameters, or pass step=fn(model, batch) -> loss, which calls the model "
        "as it wants.",
    ),
    "a step returning a loss per sample": (
        {"loss": None, "step": per_sample},
        lambda t: t.fit(X, Y, epochs=1),
        ValueError,
        "The step per_sample returned a Tensor of shape (2,) and dtype torch.float32" + RETURNS,
    ),
    "a step returning a float": (
        {"loss": None, "step": a_float},
        lambda t: t.fit(X, Y, epochs=1),
        ValueError,
        "The step a_float returned a float (2.5)" + RETURNS,
    ),
    "a step returning a detached loss": (
        {"loss": None, "step": detached},
        lambda t: t.fit(X, Y, epochs=1),
        ValueError,
        "The step detached returned a loss that does not require grad (computed under "
        "torch.no_grad(), .detach()ed, or from no parameter), so no gradient can be computed "
        "from it. Return the loss computed from the model's output. Nothing was trained on it.",
    ),
    "a step on a Dataset returning a loss per sample": (
        {"loss": None, "step": per_sample},
        lambda t: t.fit(Items(lambda i: ({"x1": X1[i], "x2": X2[i]}, Y[i])), epochs=1),
        ValueError,
        "The step per_sample returned a Tensor of shape (1,) and dtype torch.float32" + RETURNS,
    ),
    "loss=None and a model without .loss": (
        {"loss": None},
        lambda t: t.fit(X, epochs=1),
        ValueError,
        "The Trainer has no loss=, and the model's output, a Tensor of shape (2, 3) and dtype "
        "torch.float32, has no .loss attribute or 'loss' key (the Hugging Face convention). "
        "Pass loss= (a callable (output, target) -> loss, or one of ['bce_with_logits', "
        "'cross_entropy', 'l1', 'mse', 'nll']) or step=fn(model, batch) -> loss.",
    ),
    "loss=None and a target y": (
        {"loss": None},
        lambda t: t.fit(X, Y, epochs=1),
        ValueError,
        "loss=None takes the loss the model computes itself (its output's .loss, the Hugging "
        "Face convention), which never sees a separate target y, and this data has one. Pass "
        "loss= (a callable (output, target) -> loss, or a name) to compare the output with "
        "y, put the target among the model's inputs (x={..., 'labels': y}), or pass "
        "step=fn(model, batch) -> loss.",
    ),
    "a torch IterableDataset": (
        {},
        lambda t: t.fit(Stream(), epochs=1),
        ValueError,
        "x is a torch IterableDataset (Stream), a stream: warmfit needs data it can index, "
        "so that an epoch is a permutation of known rows and a resume starts at any sample "
        f"without replaying the ones before. {DATA_NOT_DATASET} For a stream, fit each "
        "chunk you read as arrays with fit(chunk_x, chunk_y, new_data=True, epochs=1).",
    ),
    "a torch IterableDataset with __len__": (
        {},
        lambda t: t.fit(SizedStream(), epochs=1),
        ValueError,
        "x is a torch IterableDataset (SizedStream), a stream: warmfit needs data it can "
        "index, so that an epoch is a permutation of known rows and a resume starts at any "
        f"sample without replaying the ones before. {DATA_NOT_DATASET} For a stream, fit "
        "each chunk you read as arrays with fit(chunk_x, chunk_y, new_data=True, epochs=1).",
    ),
    "a generator": (
        {},
        lambda t: t.fit((row for row in X1), Y, epochs=1),
        ValueError,
        "x is an iterator (generator), a stream: warmfit needs data it can index, so that an "
        "epoch is a permutation of known rows and a resume starts at any sample without "
        f"replaying the ones before. {DATA_NOT_DATASET} For a stream, fit each chunk you "
        "read as arrays with fit(chunk_x, chunk_y, new_data=True, epochs=1).",
    ),
    "a DataLoader": (
        {},
        lambda t: t.fit(torch.utils.data.DataLoader(Items(lambda i: (X1[i], Y[i]))), epochs=1),
        ValueError,
        "x is a torch DataLoader. warmfit builds the loader itself (its batch sampler starts "
        "at the cursor, so a resume reads nothing twice): pass its dataset, "
        "x=loader.dataset, with Trainer(batch_size=..., num_workers=...). "
        + DATA_NOT_DATASET,
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_names_the_problem_before_anything_changes(case):
    extra, call, error, message = REFUSALS[case]
    t = two_trainer(**extra)
    if not extra:  # a trained state (a trainer whose loss or step is refused cannot train)
        t.fit(X, Y, epochs=1)
    before = t.state_dict()
    with pytest.raises(error) as err:
        call(t)
    assert str(err.value) == message
    assert_same_state(before, t, ledger=True, what=case)


def test_step_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError) as err:
        two_trainer(step=smoothed)  # and loss="cross_entropy"
    assert str(err.value) == (
        "Pass either 'loss' or 'step', not both: a step computes the loss itself "
        "(step=smoothed, loss='cross_entropy')."
    )
    with pytest.raises(ValueError) as err:
        two_trainer(loss=None, step=smoothed, metrics=["accuracy"])
    assert str(err.value) == (
        "metrics= are computed as metric(model(x), y), and with step= warmfit does not know "
        "how your step calls the model or which part of the batch is the target. Compute "
        "them in a callback (on_epoch_end, with trainer.model), or use loss= (any callable "
        "(output, target) -> loss) instead of step=."
    )
    with pytest.raises(TypeError) as err:
        two_trainer(loss=None, step="smoothed")
    assert str(err.value) == (
        "The 'step' parameter of Trainer must be a function (model, batch) -> loss, a scalar "
        "tensor. Got 'smoothed' instead."
    )


def test_keras_and_scikit_learn_refuse_step():
    from sklearn.linear_model import SGDClassifier

    with pytest.raises(ValueError) as err:
        warmfit.Trainer(SGDClassifier(), step=smoothed, verbose=0)
    assert str(err.value) == (
        "The 'step' parameter of Trainer is for torch models only: a scikit-learn estimator "
        "trains with its own partial_fit or fit (set SGDClassifier's parameters instead). "
        "Got step=" + repr(smoothed) + "."
    )
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError) as err:
        warmfit.Trainer(model, step=smoothed, verbose=0)
    assert str(err.value) == (
        "The 'step' parameter of Trainer is for torch models only (for now). A Keras model "
        "takes its own step: override train_step (and test_step) in a keras.Model subclass, "
        "and warmfit runs it. Got step=" + repr(smoothed) + "."
    )


# -- validation, evaluate and predict on dict data -------------------------------------------------
def test_validation_split_evaluate_and_predict_take_dict_data():
    t = two_trainer(metrics=["accuracy"])
    t.fit(X, Y, epochs=2, validation_split=0.25)
    last = t.history[-1]
    rows = t.state_dict()["tensors"]["data/val_rows"]
    assert len(rows) == 16
    held_out = {k: v[rows] for k, v in X.items()}
    # validation ran on the held-out rows, as evaluate computes it
    assert t.evaluate(held_out, Y[rows]) == {"loss": last["val_loss"], "accuracy": last["val_accuracy"]}
    # a continue on the same dict keeps the split; the fingerprint is the same
    t.fit(X, Y, epochs=1, validation_split=0.25)
    assert len({r["fingerprint"] for r in t.ledger}) == 1 and t.ledger[0]["data_shape"] == [N, 5]
    out = t.predict(X)
    t.model.eval()
    with torch.no_grad():
        want = t.model(**{k: torch.from_numpy(v) for k, v in X.items()})
    assert torch.equal(out, want)


def test_predict_and_evaluate_on_a_hugging_face_style_model():
    t = lm_trainer()
    x = lm_data()
    t.fit(x, epochs=1, validation_data=lm_data(24, seed=3))
    assert np.isfinite(t.history[-1]["val_loss"])
    inputs = {k: v for k, v in x.items() if k != "labels"}
    out = t.predict(inputs, batch_size=10)  # 7 batches, joined
    assert isinstance(out, Output) and out.loss is None and out.logits.shape == (N, 3)
    t.model.eval()
    with torch.no_grad():
        want = t.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert torch.equal(out.logits, want.logits)
    assert set(t.evaluate(x)) == {"loss"}


def test_a_dict_dataset_with_a_validation_split_and_evaluate():
    x1, x2, y = two_inputs()
    items = Items(lambda i: ({"x1": x1[i], "x2": x2[i]}, y[i]))
    t = two_trainer(metrics=["accuracy"])
    t.fit(items, epochs=2, validation_split=0.25)
    arrays = two_trainer(metrics=["accuracy"])
    arrays.fit({"x1": x1, "x2": x2}, y, epochs=2, validation_split=0.25)
    assert_same_state(arrays, t, differ=("data.fingerprint",))
    assert t.evaluate(items) == arrays.evaluate({"x1": x1, "x2": x2}, y)


def test_a_step_on_a_dataset_gets_the_collated_item_and_validates_with_it():
    items = Items(lambda i: ({"x1": X1[i], "x2": X2[i]}, Y[i]))
    t = two_trainer(loss=None, step=smoothed)
    t.fit(items, epochs=2, validation_split=0.25)
    arrays = two_trainer(loss=None, step=smoothed)
    arrays.fit(X, Y, epochs=2, validation_split=0.25)
    assert_same_state(arrays, t, differ=("data.fingerprint",))
    assert np.isfinite(t.history[-1]["val_loss"])
    assert t.evaluate(items) == arrays.evaluate(X, Y)


# -- the fingerprint ------------------------------------------------------------------------------
def test_the_fingerprint_of_plain_arrays_is_unchanged_and_a_structures_covers_its_keys():
    t = make_trainer()
    fp = lambda x, y=None: t.backend.fingerprint(t.backend.prepare(x, y))  # noqa: E731
    x, y = make_data(N)
    # the values warmfit gave these arrays before structures existed (issue 17's main)
    assert fp(x, y) == ("12f796d685e671e04f8678ac", [64, 8])
    assert fp(x) == ("f6191b9602d656f55dd44247", [64, 8])
    d = two_trainer()
    dfp = lambda x, y=None: d.backend.fingerprint(d.backend.prepare(x, y))  # noqa: E731
    same = dfp({"x1": X1, "x2": X2}, Y)
    assert same == dfp({"x2": X2, "x1": X1}, Y)  # the keys in sorted order
    assert same[1] == [N, 5]
    assert dfp({"x1": X1, "x3": X2}, Y)[0] != same[0]  # a renamed key
    assert dfp({"x1": X1, "x2": X2 + 1}, Y)[0] != same[0]
    assert dfp((X1, X2), Y)[0] != same[0]


# -- DDP: the global batch split per rank, leaf by leaf ---------------------------------------
DDP_WORKER = """
import sys
sys.path.insert(0, {tests!r})
import warmfit
from test_structured_batches import DDP_SETUPS

for name, (build, data) in DDP_SETUPS.items():
    t = build()
    t.fit(*data(), epochs=2)
    t.save({out!r} + "/" + name)
"""


def _ddp_dataset() -> Items:
    x1, x2, y = two_inputs(17)
    return Items(lambda i: ({"x1": x1[i], "x2": x2[i]}, y[i]), n=17)


def _ddp_arrays() -> tuple[Any, ...]:
    x1, x2, y = two_inputs(17)
    return {"x1": x1, "x2": x2}, y


#: 17 rows in global batches of 16 on 2 ranks: each epoch's second batch leaves rank 0
#: no rows (it steps on zero rows of every leaf). No dropout: ranks draw their own.
DDP_SETUPS: dict[str, tuple[Any, Any]] = {
    "dict": (lambda: two_trainer(model=lambda: TwoInputs(p=0.0)), _ddp_arrays),
    "step": (lambda: two_trainer(model=lambda: TwoInputs(p=0.0), loss=None, step=smoothed),
             _ddp_arrays),
    "dataset": (lambda: two_trainer(model=lambda: TwoInputs(p=0.0)), lambda: (_ddp_dataset(),)),
}  # fmt: skip


def test_ddp_splits_structured_global_batches_like_one_process(tmp_path):
    script = tmp_path / "worker.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(DDP_WORKER.format(tests=tests, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (build, data) in DDP_SETUPS.items():
        one = build()
        one.fit(*data(), epochs=2)
        two = warmfit.testing.state_of(tmp_path / name)
        assert two["state"]["counters"] == one.state_dict()["state"]["counters"], name
        assert two["state"]["ledger"][-1]["world_size"] == 2
        for k, v in one.state_dict()["tensors"].items():
            if k.startswith("model/"):  # the gradient's sum in another order: close
                np.testing.assert_allclose(two["tensors"][k], v, rtol=0, atol=1e-6, err_msg=k)
