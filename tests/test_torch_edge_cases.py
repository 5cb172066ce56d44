"""Edge cases of the torch backend and of schedules: copies of a fitted trainer, Datasets
that cannot train, schedule values that are not plain floats or not learning rates,
per-group learning rates, and the optimizer settings a resume compares."""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, assert_same_state, make_data, make_trainer
from warmfit import schedules
from warmfit.schedules import TorchScheduler, as_schedule, lr_at


def assert_unchanged(t: warmfit.Trainer, before: dict[str, Any]) -> None:
    """``t`` holds the state ``before`` (a ``state_dict()``), bit for bit, ledger included."""
    assert_same_state(before, t, ledger=True)


# -- copies of a fitted trainer ---------------------------------------------------------
def test_a_deepcopy_of_a_fitted_trainer_continues_bit_identically(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=1)
    t._backend.snapshot_tensors()  # the host buffers of background saves exist now
    twin = copy.deepcopy(t)
    assert twin._backend._snapshot is None and twin._backend._last_loss is None
    t.fit(x, y, epochs=2)
    twin.fit(x, y, epochs=2)
    assert_same_state(t, twin)  # the weights among the rest
    assert twin.model is not t.model


def test_a_deepcopy_of_a_fitted_sklearn_facade_continues_bit_identically(data):
    from warmfit.sklearn import NeuralNetClassifier

    x, y = data
    clf = NeuralNetClassifier(hidden_layer_sizes=(8,), max_epochs=1, random_state=0).fit(x, y)
    twin = copy.deepcopy(clf)
    assert_same_state(clf.trainer_, twin.trainer_, ledger=True)
    clf.partial_fit(x, y)
    twin.partial_fit(x, y)
    assert np.array_equal(clf.predict_proba(x), twin.predict_proba(x))
    assert_same_state(clf.trainer_, twin.trainer_)  # (the ledgers' wall times differ)
    assert twin.trainer_ is not clf.trainer_ and twin.module_ is not clf.module_


# -- Datasets that cannot train ---------------------------------------------------------
class _Empty(torch.utils.data.Dataset):
    def __init__(self, strict: bool) -> None:
        self.strict = strict

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> Any:
        if self.strict:  # refuses negative indices, as many Datasets do
            raise IndexError(f"index {i} out of range")
        return torch.zeros(8), 0


class _Items(torch.utils.data.Dataset):
    """``make(i)`` for each of ``n`` rows; refuses negative indices."""

    def __init__(self, make: Any, n: int = 64) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range")
        return self.make(i)


X, Y = make_data(64)


@pytest.mark.parametrize("strict", [False, True])
def test_an_empty_dataset_is_refused_before_anything_changes(strict):
    t = make_trainer()
    before = t.state_dict()
    with pytest.raises(
        ValueError,
        match=r"^x is a Dataset with no items \(len\(x\) == 0\): nothing to train on\. Pass "
        r"a Dataset with at least one item \(_Empty has none\)\.$",
    ):
        t.fit(_Empty(strict), epochs=3)
    assert_unchanged(t, before)
    assert t.epoch == 0 and len(t.ledger) == 0


def test_empty_arrays_are_refused_too():
    with pytest.raises(ValueError, match="^x has no samples: nothing to train on."):
        make_trainer().fit(X[:0], Y[:0], epochs=1)


def test_a_one_item_dataset_that_refuses_negative_indices_trains():
    t = make_trainer()
    t.fit(_Items(lambda i: (torch.from_numpy(X[i]), int(Y[i])), n=1), epochs=2)
    assert t.global_step == 2


DICT_ITEMS = _Items(lambda i: {"x": torch.from_numpy(X[i]), "y": int(Y[i])})
ITEM_RULE = (
    r"^A Dataset given to warmfit must yield \(x, y\) pairs or x alone, each a tensor, a "
    r"NumPy array or a number\. "
)


@pytest.mark.parametrize(
    ("dataset", "what"),
    [
        (DICT_ITEMS, r"Item 0 is a dict with keys \['x', 'y'\]\. "),
        (
            _Items(lambda i: (torch.from_numpy(X[i]), int(Y[i]), 1.0)),
            r"Item 0 is a tuple of 3 \(Tensor of dtype torch\.float32, int, float\)\. ",
        ),
        (
            _Items(lambda i: (torch.from_numpy(X[i]), "cat")),
            r"Item 0 is a tuple of 2 \(Tensor of dtype torch\.float32, str\)\. ",
        ),
    ],
)
def test_dataset_items_that_cannot_train_are_refused_before_anything_changes(dataset, what):
    t = make_trainer()
    t.fit(X, Y, epochs=1)
    before = t.state_dict()
    with pytest.raises(
        ValueError, match=ITEM_RULE + what + r".*Wrap the Dataset so that __getitem__ returns"
    ):
        t.fit(dataset, epochs=1, mode="warm")
    assert_unchanged(t, before)


def test_evaluate_and_predict_refuse_dict_items_with_the_same_rule():
    t = make_trainer()
    t.fit(X, Y, epochs=1)
    before = t.state_dict()
    batch_rule = ITEM_RULE + r"A batch of its items is a dict with keys \['x', 'y'\]\. "
    with pytest.raises(ValueError, match=batch_rule):
        t.evaluate(DICT_ITEMS)
    with pytest.raises(ValueError, match=batch_rule):
        t.predict(DICT_ITEMS)
    assert_unchanged(t, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda i: (X[i], Y[i]),  # NumPy arrays and scalars
        lambda i: (torch.from_numpy(X[i]), int(Y[i])),
        lambda i: [torch.from_numpy(X[i]), torch.tensor(Y[i])],
    ],
)
def test_supported_dataset_items_train_like_the_arrays(make):
    from_arrays = make_trainer()
    from_arrays.fit(X, Y, epochs=2)
    from_dataset = make_trainer()
    from_dataset.fit(_Items(make), epochs=2)
    # the whole state; the data's fingerprint is another by design (arrays, a Dataset)
    assert_same_state(from_arrays, from_dataset, differ=("data.fingerprint",))


# -- schedule values --------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn",
    [
        lambda s: np.float32(1e-2 * 0.99**s),
        lambda s: np.float64(1e-2),
        lambda s: np.array(1e-2),  # 0-d
        lambda s: torch.tensor(1e-2) * 0.99**s,  # 0-d
        lambda s: 0,
    ],
)
def test_a_step_function_returning_any_real_number_is_a_step_function(fn):
    assert as_schedule(fn) is fn
    assert isinstance(lr_at(fn, 3), float)


@pytest.mark.parametrize("value", [np.float32(1e-2), np.array(1e-2), torch.tensor(1e-2)])
def test_a_real_number_is_a_constant_schedule(value):
    assert as_schedule(value) == schedules.constant(float(value))


def test_numpy_and_tensor_rates_train_like_python_floats(data):
    x, y = data
    rate = float(np.float32(3e-3))
    runs = {}
    for name, fn in {
        "float": lambda s: rate * 0.99**s,
        "numpy": lambda s: np.float32(rate) * np.float32(0.99) ** s,
        "tensor": lambda s: torch.tensor(rate, dtype=torch.float64) * 0.99**s,
    }.items():
        t = make_trainer(schedule=fn)
        t.fit(x, y, epochs=1)
        runs[name] = t
    for name in ("numpy", "tensor"):
        assert runs[name].global_step == runs["float"].global_step
        assert type(runs[name].learning_rate) is float
    # float32 arithmetic gives other rates; the float64 tensor gives the same bits.
    assert_same_state(runs["float"], runs["tensor"])


def test_numpy_rates_are_recorded_as_floats_and_checkpointed(tmp_path, data):
    x, y = data
    with make_trainer(schedule=lambda s: np.float32(1e-2), run_dir=tmp_path) as t:
        t.fit(x, y, epochs=1)
        assert type(t.history[-1]["lr"]) is float


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (lambda: lambda s: -1e-3, r"gave the learning rate -0\.001 at step 0\. A learning rate"),
        (lambda: lambda s: float("nan"), r"gave the learning rate nan at step 0\."),
        (lambda: lambda s: np.float32("inf"), r"gave the learning rate inf at step 0\."),
        (lambda: -1e-3, r"^The 'lr' parameter of Constant must be a finite number >= 0\. Got"),
        (lambda: float("nan"), r"^The 'lr' parameter of Constant must be a finite number"),
        (lambda: schedules.cosine(float("inf"), 10), "^The 'lr' parameter of Cosine must be"),
        (lambda: schedules.cosine(1e-2, 0), "^The 'horizon' parameter of Cosine must be an int"),
        (lambda: schedules.step_decay(1e-2, 0), "^The 'step_size' parameter of StepDecay must"),
        (lambda: schedules.exponential(1e-2, -0.5), "^The 'gamma' parameter of Exponential"),
        (lambda: schedules.warmup(5, schedules.constant(1e-2), -1.0), "^The 'start_factor'"),
    ],
)
def test_a_schedule_that_is_not_a_learning_rate_is_refused_at_construction(schedule, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(schedule=schedule())


def test_a_bad_schedule_in_a_fit_call_changes_nothing(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=1)
    before = t.state_dict()
    with pytest.raises(ValueError, match=r"gave the learning rate -1\.0 at step 0\."):
        t.fit(x, y, epochs=1, schedule=lambda s: -1.0)
    with pytest.raises(TypeError, match="returned 'fast', which has no step/state_dict/load"):
        t.fit(x, y, epochs=1, mode="warm", schedule=lambda s: "fast")
    assert_unchanged(t, before)


def test_a_function_misread_as_a_torch_factory_says_why():
    with pytest.raises(
        TypeError,
        match=r"calling it with the optimizer raised TypeError: unsupported operand type\(s\) "
        r".*It was taken for one because calling it with step 0 raised ZeroDivisionError: "
        r"float division by zero; a step -> learning rate function must return a real "
        r"number for every step >= 0, 0 included\.",
    ):
        make_trainer(schedule=lambda s: 1e-2 / s)
    with pytest.raises(
        TypeError,
        match=r"but it returned 'fast', which has no step/state_dict/load_state_dict\. It was "
        r"taken for one because calling it with step 0 returned 'fast';",
    ):
        make_trainer(schedule=lambda s: "fast")
    assert isinstance(as_schedule(lambda s: "fast"), TorchScheduler)


@pytest.mark.parametrize(
    ("schedule", "step", "value"),
    [
        (lambda s: 0.5 - 0.25 * s, 3, r"-0\.25"),
        (schedules.exponential(1.0, gamma=1e3), 103, "inf"),
        (lambda s: float("nan") if s == 4 else 1e-2, 4, "nan"),
    ],
)
def test_lr_at_names_the_step_and_the_value(schedule, step, value):
    assert lr_at(schedule, step - 1) >= 0
    with pytest.raises(ValueError, match=rf"learning rate {value} at step {step}\. A learning"):
        lr_at(schedule, step)
    with pytest.raises(TypeError, match=r"returned None at step 2\. A schedule must return"):
        lr_at(lambda s: None if s == 2 else 1e-2, 2)


def test_a_schedule_that_turns_negative_stops_before_the_step_that_would_use_it(data):
    x, y = data
    t = make_trainer(schedule=lambda s: 1e-2 if s < 5 else -1.0)
    with pytest.raises(ValueError, match=r"gave the learning rate -1\.0 at step 5\."):
        t.fit(x, y, epochs=1)
    good = make_trainer(schedule=schedules.constant(1e-2))
    good.fit(x, y, steps=5)
    assert t.global_step == 5
    # the state of 5 good steps: all but the schedule (another) and the call in progress
    # (this one stopped, that one finished)
    assert_same_state(good, t, differ=("schedule", "call"))


# -- per-group learning rates -----------------------------------------------------------
def two_groups(head_lr: float = 1e-2) -> Any:
    def factory(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        return torch.optim.SGD(
            [{"params": params[:2], "lr": 1e-4}, {"params": params[2:], "lr": head_lr}],
            momentum=0.9,
        )

    return factory


def group_lrs(t: warmfit.Trainer) -> list[float]:
    return [g["lr"] for g in t.optimizer.param_groups]


def test_a_plateau_callback_keeps_the_groups_learning_rates(data):
    x, y = data
    t = make_trainer(
        optimizer=two_groups(), schedule=None, callbacks=[warmfit.ReduceLROnPlateau(patience=99)]
    )
    t.fit(x, y, epochs=1, validation_split=0.25)
    assert group_lrs(t) == [1e-4, 1e-2]
    assert t.learning_rate == 1e-4


def test_a_schedule_drives_group_0_and_the_others_keep_their_ratio(data):
    x, y = data
    t = make_trainer(optimizer=two_groups(), schedule=schedules.constant(1e-3))
    t.fit(x, y, epochs=1)
    assert group_lrs(t) == [1e-3, 1e-3 * (1e-2 / 1e-4)]
    assert t.learning_rate == 1e-3
    state = t.state_dict()["state"]
    assert state["backend"]["optimizer"]["factory_lr"] == [1e-4, 1e-2]


def test_group_ratios_survive_a_resume_exactly(data):
    x, y = data
    straight = make_trainer(optimizer=two_groups())
    straight.fit(x, y, epochs=3)
    first = make_trainer(optimizer=two_groups())
    first.fit(x, y, steps=17)
    second = make_trainer(optimizer=two_groups())
    second.load_state_dict(first.state_dict())
    second.fit(x, y, until_epoch=3)
    assert_same_state(straight, second)
    assert group_lrs(second) == group_lrs(straight)


def test_continue_keeps_the_checkpoints_ratios_and_warm_takes_the_factorys(data):
    x, y = data
    first = make_trainer(optimizer=two_groups(head_lr=1e-2), schedule=schedules.constant(1e-3))
    first.fit(x, y, epochs=1)
    second = make_trainer(optimizer=two_groups(head_lr=1e-3), schedule=schedules.constant(1e-3))
    with pytest.warns(UserWarning, match=r"optimizer\.hyper\[1\]\.lr: checkpoint 0\.01, now"):
        second.load_state_dict(first.state_dict())
    second.fit(x, y, epochs=1)
    assert group_lrs(second) == [1e-3, 1e-3 * (1e-2 / 1e-4)]
    second.fit(x, y, epochs=1, mode="warm")
    assert group_lrs(second) == [1e-3, 1e-3 * (1e-3 / 1e-4)]


def test_a_state_without_the_groups_ratios_takes_the_factorys(data):
    x, y = data
    first = make_trainer(optimizer=two_groups())
    first.fit(x, y, epochs=1)
    sd = first.state_dict()
    del sd["state"]["backend"]["optimizer"]["factory_lr"]  # as written before it was saved
    second = make_trainer(optimizer=two_groups())
    second.load_state_dict(sd)
    second.fit(x, y, epochs=1)
    first.fit(x, y, epochs=1)
    assert_same_state(first, second)


def test_a_malformed_ratio_entry_is_refused_and_changes_nothing(data):
    x, y = data
    first = make_trainer(optimizer=two_groups())
    first.fit(x, y, epochs=1)
    sd = first.state_dict()
    sd["state"]["backend"]["optimizer"]["factory_lr"] = [1e-4]
    second = make_trainer(optimizer=two_groups())
    before = second.state_dict()
    with pytest.raises(
        warmfit.StateMismatchError,
        match=r"optimizer\.factory_lr must list a learning rate per parameter group \(2\); "
        r"got \[0\.0001\]\.",
    ):
        second.load_state_dict(sd)
    assert_unchanged(second, before)


def test_a_group_added_after_the_factory_is_refused_when_a_schedule_sets_the_rate(data):
    x, y = data
    t = make_trainer(model=MLP(), optimizer=two_groups())
    t.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1})
    with pytest.raises(
        ValueError,
        match=r"^The optimizer has 3 parameter groups, but its factory built 2\. .* add "
        r"parameter groups in the optimizer factory, not to the optimizer afterwards\.$",
    ):
        t.fit(x, y, epochs=1)
    assert (t.global_step, t.counters.fit_calls, len(t.ledger)) == (0, 0, 0)  # refused first
    t.fit(x, y, epochs=1, mode="warm")  # the factory's optimizer again: its two groups
    assert len(t.optimizer.param_groups) == 2 and t.epoch == 1


# -- the optimizer settings a resume compares -------------------------------------------
def sgd(lr: float = 0.01) -> Any:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


@pytest.mark.parametrize(
    "factory",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=200),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 0.001, 0.01, step_size_up=7),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_a_scheduler_that_cycles_momentum_resumes_without_a_settings_warning(
    tmp_path, data, factory
):
    x, y = data
    with make_trainer(optimizer=sgd(), schedule=factory, run_dir=tmp_path) as t:
        t.fit(x, y, steps=23)
        assert t.optimizer.param_groups[0]["momentum"] != 0.9  # cycled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = make_trainer(optimizer=sgd(), schedule=factory, run_dir=tmp_path)
    with resumed:
        hyper = resumed._backend.describe()["optimizer"]["hyper"][0]
        assert (hyper["lr"], hyper["momentum"]) == (0.01, 0.9)  # as the factory built them
        assert "initial_lr" not in hyper and "max_momentum" not in hyper
        assert resumed.global_step == 23


def test_a_changed_learning_rate_in_the_factory_is_reported(tmp_path, data):
    x, y = data
    with make_trainer(optimizer=sgd(0.01), schedule=None, run_dir=tmp_path) as t:
        t.fit(x, y, epochs=1)
    with pytest.warns(
        UserWarning,
        match=r"^resuming with different settings: optimizer\.hyper\[0\]\.lr: checkpoint "
        r"0\.01, now 0\.001\.",
    ):
        resumed = make_trainer(optimizer=sgd(0.001), schedule=None, run_dir=tmp_path)
    with resumed:
        assert resumed.learning_rate == 0.01  # 'continue' keeps the checkpoint's
        resumed.fit(x, y, epochs=1)
        assert resumed.ledger[-1]["changes"]["settings"] == [
            "optimizer.hyper[0].lr: checkpoint 0.01, now 0.001"
        ]
        assert resumed.learning_rate == 0.01
        resumed.fit(x, y, epochs=1, mode="warm")  # a fresh optimizer: the factory's
        assert resumed.learning_rate == 0.001


def test_a_state_whose_settings_lack_the_learning_rate_loads_without_a_warning(data):
    """States written before describe() reported the learning rate: a key the checkpoint
    did not record is not a difference."""
    x, y = data
    first = make_trainer()
    first.fit(x, y, epochs=1)
    sd = first.state_dict()
    for group in sd["state"]["settings"]["model"]["optimizer"]["hyper"]:
        del group["lr"]
    second = make_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.load_state_dict(sd)
    second.fit(x, y, epochs=1)  # not a setting that breaks exactness
    first.fit(x, y, epochs=1)
    assert_same_state(first, second)
    assert math.isfinite(second.learning_rate)


class _Augmenting(torch.utils.data.Dataset):
    """Adds noise from torch's global stream to every sample it reads."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def test_an_augmenting_dataset_keeps_its_fingerprint_and_the_callers_streams(data):
    """The fingerprint reads three items with every stream forked and fixed: the same
    data gives the same fingerprint on every call (no false "data changed" warning), and
    the reads do not move the caller's streams."""
    x, y = data
    ds = _Augmenting(x, y)
    t = make_trainer()
    t.fit(ds, epochs=1)
    caller = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.fit(ds, epochs=1)
    assert torch.equal(torch.get_rng_state(), caller)
    assert t.ledger[0]["fingerprint"] == t.ledger[1]["fingerprint"]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "gpu",
            "The 'device' parameter of Trainer must be a torch device such as 'cpu', 'cuda' or "
            "'cuda:1'. Got 'gpu' instead.",
        ),
        (
            42.0,
            "The 'device' parameter of Trainer must be a torch device such as 'cpu', 'cuda' or "
            "'cuda:1'. Got 42.0 instead.",
        ),
        pytest.param(
            "cuda",
            f"The 'device' parameter of Trainer is 'cuda', but this torch {torch.__version__} "
            "sees no CUDA device. Use device='cpu', or run where a GPU and a CUDA build of "
            "torch are.",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here"),
        ),
    ],
)
def test_a_device_that_is_not_here_is_refused_with_a_message(device, message):
    with pytest.raises(ValueError) as err:
        make_trainer(device=device)
    assert str(err.value) == message


def test_schedules_take_numpy_scalars_as_plain_numbers():
    """Every schedule parameter a checkpoint records goes into JSON: NumPy scalars are
    stored as plain numbers, and what cannot be a parameter is refused at once."""
    from warmfit import schedules as s

    made = s.sequential(
        [s.cosine(np.float32(0.5), np.int64(10), cyclic=np.bool_(True)), s.constant(0.1)],
        np.array([20]),
    )
    shifted = s.shifted(made, np.int64(3))
    assert json.loads(json.dumps(shifted.config())) == shifted.config()
    assert s.from_config(shifted.config())(25) == shifted(25) == 0.1
    with pytest.raises(ValueError, match=r"^The 'boundaries' parameter of Sequential must be "):
        s.sequential([s.constant(0.1)] * 3, [20, 10])
    with pytest.raises(ValueError, match=r"^The 'cyclic' parameter of Cosine must be a bool\."):
        s.cosine(0.1, 10, cyclic="yes")
    with pytest.raises(ValueError, match=r"^The 'start' parameter of Shifted must be an int >= 0"):
        s.shifted(made, -1)
