"""Setups warmfit accepted that gave a different result without an error (issue 15,
"close the class"): each is now exact, or refused before anything changes. The table
of every case tried is in RELIABILITY.md ("Silent results").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import warmfit
from conftest import MLP, make_data, make_trainer, state_of
from warmfit.check import compare_states


def _resumed_through_a_file(tmp_path, build, x, y, first: dict, second: dict):  # type: ignore[no-untyped-def]
    """``build()`` trained with ``first`` then saved, loaded into a new build() and
    trained with ``second``."""
    t = build()
    t.fit(x, y, **first)
    t.save(tmp_path / "ckpt")
    resumed = build()
    resumed.load_state_dict(state_of(tmp_path / "ckpt"))
    resumed.fit(x, y, **second)
    return resumed


def test_multistep_lr_decays_after_a_resume_as_straight(tmp_path):
    """Its milestones are a Counter of ints: as plain JSON they came back with string
    keys and the rate never decayed again (0.01 for ever instead of 0.005, 0.0025)."""
    x, y = make_data(64)
    schedule = warmfit.schedules.from_torch(
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 3], gamma=0.5),
        interval="epoch",
    )

    def build() -> warmfit.Trainer:
        return make_trainer(schedule=schedule)

    straight = build()
    straight.fit(x, y, epochs=4)
    resumed = _resumed_through_a_file(tmp_path, build, x, y, {"epochs": 1}, {"epochs": 3})
    lrs = [r["lr"] for r in straight.history]
    assert [r["lr"] for r in resumed.history] == lrs and lrs[-1] == 0.0025
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []


def test_a_tensor_learning_rate_comes_back_a_tensor(tmp_path):
    x, y = make_data(64)

    def build() -> warmfit.Trainer:
        return make_trainer(
            optimizer=lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-2)), schedule=None
        )

    straight = build()
    straight.fit(x, y, epochs=2)
    resumed = _resumed_through_a_file(tmp_path, build, x, y, {"epochs": 1}, {"epochs": 1})
    assert torch.is_tensor(resumed.optimizer.param_groups[0]["lr"])
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []


class Warmup:
    """A callable LambdaLR factor whose state torch saves (its __dict__)."""

    def __init__(self) -> None:
        self.steps = 5
        self.curve = lambda s: min(1.0, (s + 1) / 5)  # a function: no exact JSON

    def __call__(self, step: int) -> float:
        return self.curve(step)


def test_a_scheduler_whose_state_cannot_be_saved_exactly_is_refused_at_construction():
    schedule = warmfit.schedules.from_torch(
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, Warmup())
    )
    with pytest.raises(TypeError) as err:
        make_trainer(schedule=schedule)
    assert str(err.value) == (
        "scheduler.lr_lambdas[0].curve holds a builtins.function "
        "(test_torch_silent_cases.Warmup.__init__.<locals>.<lambda>), which warmfit cannot "
        "save exactly (it stores plain numbers, strings, lists, tuples, dicts, Counters, "
        "NumPy scalars and tensors). Keep such objects out of the optimizer's and the "
        "scheduler's state_dict() (e.g. a LambdaLR of a plain function, whose state torch "
        "leaves out), or use a warmfit schedule (warmfit.schedules)."
    )


def test_torch_reduce_lr_on_plateau_is_refused_with_the_callback_named():
    schedule = warmfit.schedules.from_torch(torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(TypeError) as err:
        make_trainer(schedule=schedule)
    assert str(err.value) == (
        "torch's ReduceLROnPlateau needs the monitored metric at each step() and warmfit "
        "steps a torch scheduler without one. Use the callback warmfit.ReduceLROnPlateau (it "
        "keeps its state across calls and resumes) with a warmfit schedule or none."
    )


def test_lbfgs_is_refused_at_construction():
    with pytest.raises(TypeError) as err:
        make_trainer(optimizer=lambda p: torch.optim.LBFGS(p), schedule=None)
    assert str(err.value) == (
        "torch.optim.LBFGS evaluates the model several times per step through a closure, "
        "and warmfit's step calls optimizer.step() once, without one. Use an optimizer that "
        "steps on one gradient (SGD, Adam, AdamW, ...)."
    )


def test_a_module_added_between_calls_is_refused_on_continue_and_trained_by_warm():
    """It was silently never trained (not in the optimizer)."""
    x, y = make_data(64)
    t = make_trainer()
    t.fit(x, y, epochs=1)
    t.model.extra = nn.Linear(3, 3)
    before = t.state_dict()
    with pytest.raises(ValueError) as err:
        t.fit(x, y, epochs=1)
    assert str(err.value) == (
        "The model's parameters changed since its optimizer was built; added: "
        "['extra.weight', 'extra.bias']. The optimizer would never train the new ones, and "
        "a checkpoint of this state could not be resumed. Fit with mode='warm' to build a "
        "fresh optimizer over the model as it is (the weights are kept), or mode='restart'."
    )
    assert compare_states(before, t.state_dict()) == [] and len(t.ledger) == 1
    t.fit(x, y, epochs=1, mode="warm")
    assert any(p is t.model.extra.weight for g in t.optimizer.param_groups for p in g["params"])


def test_a_restart_that_cannot_rebuild_the_model_is_refused_before_anything_changes():
    x, y = make_data(64)
    t = make_trainer(model=MLP())  # an instance: restart goes back to its kept weights
    t.fit(x, y, epochs=1)
    t.model.extra = nn.Linear(3, 3)
    before = t.state_dict()
    with pytest.raises(ValueError) as err:
        t.fit(x, y, epochs=1, mode="restart")
    assert str(err.value) == (
        "mode='restart' rebuilds the model from the initial weights the Trainer kept, which "
        "no longer matches the model: ['extra.bias', 'extra.weight']. Build a new Trainer "
        "for the changed model (a restart makes the trainer a fresh one of the same model)."
    )
    assert compare_states(before, t.state_dict()) == [] and t.counters.run == 0


def test_a_factory_that_builds_another_model_now_is_refused_at_restart():
    """A factory run under another default dtype builds float64 weights."""
    x, y = make_data(64)
    t = make_trainer()
    t.fit(x, y, epochs=1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(ValueError, match=r"the model the factory builds now, which no "
                           r"longer matches the model: \['net.0.bias: torch.float64\[16\] vs "
                           r"torch.float32\[16\]'"):  # fmt: skip
            t.fit(x, y, epochs=1, mode="restart")
    finally:
        torch.set_default_dtype(previous)
    assert t.counters.run == 0 and t.epoch == 1


class Tied(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 8, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.head(torch.relu(self.embed(x)))))


def test_a_tied_checkpoint_into_an_untied_model_changes_nothing():
    """The error came after the weights had been overwritten."""
    x, y = make_data(64)
    tied = make_trainer(model=lambda: Tied(True))
    tied.fit(x, y, epochs=1)
    untied = make_trainer(model=lambda: Tied(False))
    before = untied.state_dict()
    with pytest.raises(warmfit.StateMismatchError) as err:
        untied.load_state_dict(tied.state_dict())
    assert str(err.value) == (
        "the checkpoint's optimizer group 0 has 3 parameters, this optimizer's 4 (weights "
        "tied in one model and not in the other?). Build the model and the optimizer the same "
        "way as the run that wrote the checkpoint."
    )
    assert compare_states(before, untied.state_dict()) == []


def test_tied_weights_stay_tied_across_a_resume(tmp_path):
    x, y = make_data(64)

    def build() -> warmfit.Trainer:
        return make_trainer(model=lambda: Tied(True))

    straight = build()
    straight.fit(x, y, epochs=2)
    resumed = _resumed_through_a_file(tmp_path, build, x, y, {"epochs": 1}, {"epochs": 1})
    assert resumed.model.head.weight is resumed.model.embed.weight
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []


class SparseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


def test_a_sparse_momentum_buffer_is_refused_by_name_not_stored_lossily(tmp_path):
    x = torch.randint(0, 10, (48,))
    y = torch.randint(0, 3, (48,))
    t = make_trainer(
        model=SparseNet, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        schedule=None, metrics=[],
    )  # fmt: skip
    t.fit(x, y, epochs=1)
    with pytest.raises(TypeError) as err:
        t.save(tmp_path / "ckpt")
    assert str(err.value) == (
        "The training state entry 'optim/0/momentum_buffer' cannot be saved exactly: its "
        "layout is torch.sparse_coo (only dense tensors are stored); convert it with "
        ".to_dense(). warmfit stores every tensor of the state bit for bit or refuses it."
    )
    assert not (tmp_path / "ckpt").exists()


def test_sparse_gradients_with_plain_sgd_resume_exactly(tmp_path):
    x = torch.randint(0, 10, (48,))
    y = torch.randint(0, 3, (48,))

    def build() -> warmfit.Trainer:
        return make_trainer(
            model=SparseNet, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), schedule=None,
            metrics=[],
        )  # fmt: skip

    straight = build()
    straight.fit(x, y, epochs=2)
    resumed = _resumed_through_a_file(tmp_path, build, x, y, {"epochs": 1}, {"epochs": 1})
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []


def test_a_change_of_torchs_global_numerics_between_calls_is_refused_on_continue():
    """float32_matmul_precision('medium') changed the bits on a 512-wide MLP on the CPU."""
    x, y = make_data(64)
    t = make_trainer()
    t.fit(x, y, epochs=1)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        before = t.state_dict()
        with pytest.raises(ValueError) as err:
            t.fit(x, y, epochs=1)
        assert str(err.value) == (
            "torch's global numerics changed since the previous fit call "
            "(float32_matmul_precision: 'highest' then, 'medium' now): a 'continue' would not "
            "compute what the uninterrupted run computes. Set them back "
            "(torch.set_float32_matmul_precision, torch.set_default_dtype), or fit with "
            "mode='warm' to continue on purpose under the new ones."
        )
        assert compare_states(before, t.state_dict()) == [] and len(t.ledger) == 1
        t.fit(x, y, epochs=1, mode="warm")  # on purpose: recorded, then continue goes on
        t.fit(x, y, epochs=1)
    finally:
        torch.set_float32_matmul_precision(previous)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x)).flatten(1))


def test_a_channels_last_run_resumed_into_another_layout_is_refused(tmp_path):
    x = torch.randn(48, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(1))

    def channels_last() -> nn.Module:
        return Conv().to(memory_format=torch.channels_last)

    straight = make_trainer(model=channels_last, metrics=[])
    straight.fit(x, y, epochs=2)
    t = make_trainer(model=channels_last, metrics=[])
    t.fit(x, y, epochs=1)
    t.save(tmp_path / "ckpt")
    resumed = warmfit.Trainer.load(tmp_path / "ckpt", channels_last, **_settings())
    assert resumed.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    resumed.fit(x, y, epochs=1)
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []
    with pytest.warns(UserWarning, match="memory_format.conv.weight: checkpoint 'channels_last'"):
        plain = warmfit.Trainer.load(tmp_path / "ckpt", Conv, **_settings())
    with pytest.raises(warmfit.StateMismatchError, match="memory_format.conv.weight"):
        plain.fit(x, y, epochs=1)


def _settings() -> dict:
    from conftest import trainer_settings

    return {**trainer_settings(), "metrics": []}


def test_a_resume_under_another_thread_count_says_so(tmp_path):
    x, y = make_data(64)
    t = make_trainer()
    t.fit(x, y, epochs=1)
    t.save(tmp_path / "ckpt")
    previous = torch.get_num_threads()
    torch.set_num_threads(previous + 1)
    try:
        with pytest.warns(UserWarning) as caught:
            warmfit.Trainer.load(tmp_path / "ckpt", MLP, **_settings())
    finally:
        torch.set_num_threads(previous)
    text = str(caught[0].message)
    assert f"threads: checkpoint {previous}, now {previous + 1}" in text
    assert text.endswith(
        "On the CPU torch's results can depend on the number of threads (the split of a "
        "large matrix product): set torch.set_num_threads (or OMP_NUM_THREADS) as the run "
        "that wrote the checkpoint had it for a bit-exact resume."
    )
