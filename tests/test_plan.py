"""The parameters of Trainer and fit are declared (``warmfit.plan``) and checked with one
message template before anything changes; fit reaches the user's model through at most
three warmfit frames (issue 17)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import warmfit
from conftest import MLP, make_data, make_trainer
from warmfit import plan


@pytest.mark.parametrize(
    ("function", "declared"),
    [(warmfit.Trainer.__init__, plan.TRAINER), (warmfit.Trainer.fit, plan.FIT)],
    ids=["Trainer", "fit"],
)
def test_every_public_parameter_has_a_declared_constraint(function, declared):
    params = [p for p in inspect.signature(function).parameters if p != "self"]
    assert params == list(declared)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"override": "batch_size"},
            "The 'override' parameter of Trainer must be a tuple of setting names, e.g. "
            "('batch_size',). Got 'batch_size' instead.",
        ),
        (
            {"verbose": -1},
            "The 'verbose' parameter of Trainer must be an int >= 0 or a bool. Got -1 instead.",
        ),
        (
            {"deterministic": "yes"},
            "The 'deterministic' parameter of Trainer must be a bool. Got 'yes' instead.",
        ),
        (
            {"num_workers": -2},
            "The 'num_workers' parameter of Trainer must be an int >= 0. Got -2 instead.",
        ),
        (
            {"monitor": 3},
            "The 'monitor' parameter of Trainer must be a str. Got 3 instead.",
        ),
        (
            {"checkpoint_every": 0},
            "The 'checkpoint_every' parameter of Trainer must be an int >= 1. Got 0 instead.",
        ),
    ],
)
def test_trainer_parameters_are_refused_with_the_one_template(kwargs, message):
    with pytest.raises(ValueError) as err:
        make_trainer(**kwargs)
    assert str(err.value) == message


def test_fit_parameters_are_refused_before_anything_changes():
    x, y = make_data(64)
    t = make_trainer()
    for kwargs, message in [
        (
            {"epochs": 1, "shuffle": "no"},
            "The 'shuffle' parameter of Trainer.fit must be a bool. Got 'no' instead.",
        ),
        (
            {"epochs": 1, "verbose": "loud"},
            "The 'verbose' parameter of Trainer.fit must be an int >= 0 or a bool. Got 'loud' "
            "instead.",
        ),
        (
            {"steps": 0},
            "The 'steps' parameter of Trainer.fit must be an int >= 1. Got 0 instead.",
        ),
        (
            {"epochs": 1, "steps": 3},
            "Trainer.fit needs exactly one of 'epochs' (additional epochs), 'until_epoch' (the "
            "absolute target) and 'steps' (optimizer steps). Got epochs=1, until_epoch=None, "
            "steps=3.",
        ),
    ]:
        with pytest.raises(ValueError) as err:
            t.fit(x, y, **kwargs)
        assert str(err.value) == message
    assert t.epoch == 0 and len(t.ledger) == 0


class FrameCounter(MLP):
    """Records, at its training forward pass, the warmfit frames on the stack."""

    frames: ClassVar[list[str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not FrameCounter.frames:
            package = str(Path(warmfit.__file__).resolve().parent)
            frame, names = sys._getframe(1), []
            while frame is not None:
                if str(Path(frame.f_code.co_filename).resolve()).startswith(package):
                    names.append(frame.f_code.co_qualname)
                frame = frame.f_back
            FrameCounter.frames = names
        return super().forward(x)


def test_fit_reaches_the_model_through_at_most_three_warmfit_frames():
    x, y = make_data(64)
    FrameCounter.frames = []
    make_trainer(model=FrameCounter).fit(x, y, epochs=1)
    assert FrameCounter.frames == [
        "TorchBackend.train_step",
        "run_epochs",
        "Trainer.fit",
    ]


def test_the_modes_table_in_the_code_is_the_one_in_the_docs():
    from warmfit import modes

    docs = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    section = docs.split("## The three modes of a fit call")[1].split("\n\n")[1]
    rows = [line.strip("|").split(" | ") for line in section.splitlines()[2:]]
    assert {r[0].strip(): tuple(c.strip() for c in r[1:]) for r in rows} == modes.TABLE
