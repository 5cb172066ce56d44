"""``warmfit.testing`` on a third party's backend, plugged in with
``Trainer(framework=SomeBackendSubclass)``: the unbroken torch backend keeps the
contract, and deliberately broken ones fail it, the message naming the check and the
first state entry that differs (issue 17)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

import warmfit
from conftest import MLP, make_data, trainer_settings
from warmfit.backends.torch import TorchBackend
from warmfit.testing import Case, check_backend


class ForgetsTheOptimizerAtLoad(TorchBackend):
    """Saves the optimizer's slots but loads none: a resumed Adam starts from zero
    moments and step 0."""

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        weights = {k: v for k, v in tensors.items() if not k.startswith("optim/")}
        super().load_state(weights, {**meta, "optimizer": {**meta["optimizer"], "scalars": {}}})


class ForgetsTheTorchStream(TorchBackend):
    """Owns no random stream: dropout draws from torch's global generator, which the
    caller's code moves between fit calls."""

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        return {}

    def capture_rng(self) -> dict[str, np.ndarray]:
        return {}

    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        return None

    def check_rng(self, state: Mapping[str, np.ndarray]) -> None:
        return None


def toy_case(backend: type[TorchBackend], name: str) -> Case:
    """An MLP with dropout and Adam, 64 samples in batches of 16: 4 steps an epoch."""

    def build() -> tuple[Any, dict[str, Any]]:
        return MLP, {**trainer_settings(), "framework": backend}

    x, y = make_data(64)
    return Case(name, build, data=lambda: (x, y), total=3, steps_per_epoch=4)


def test_the_torch_backend_plugged_in_as_a_class_keeps_the_contract(tmp_path):
    case = toy_case(TorchBackend, "torch")
    assert type(case.reference()._backend) is TorchBackend
    check_backend(case, tmp_path)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (
            ForgetsTheOptimizerAtLoad,
            "forgets-slots, check 'save_load', right after Trainer.load: the states differ "
            "in 28 entries, the first: optimizer slot step of parameter net.0.weight "
            "(optim/0/step): missing in the loaded run\n",
        ),
        (
            ForgetsTheTorchStream,
            "forgets-stream, check 'split': the states differ in",
        ),
    ],
    ids=["optimizer-slots", "random-stream"],
)
def test_a_broken_backend_fails_naming_the_first_entry_that_differs(backend, message, tmp_path):
    case = toy_case(
        backend, "forgets-" + ("slots" if "Optimizer" in backend.__name__ else "stream")
    )
    with pytest.raises(AssertionError) as err:
        check_backend(case, tmp_path)
    assert str(err.value).startswith(message), str(err.value)


def test_the_stream_toy_fails_at_the_weights_the_stream_changed(tmp_path):
    """Without its stream, the first entry that differs is the first weight dropout's
    other mask changed: the comparison runs in the state's order."""
    case = toy_case(ForgetsTheTorchStream, "forgets-stream")
    with pytest.raises(AssertionError) as err:
        check_backend(case, tmp_path, checks=["split"])
    first = str(err.value).split("the first: ")[1].split("\n")[0]
    assert first.startswith("parameter net.0.weight (model/net.0.weight): max |difference| ")


def test_an_unknown_check_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"No such check: \['splitt'\]"):
        check_backend(toy_case(TorchBackend, "torch"), tmp_path, checks=["splitt"])


def test_a_case_that_cannot_be_cut_is_refused():
    with pytest.raises(ValueError, match="Case needs 0 < cut < total"):
        Case("x", lambda: (MLP, {}), lambda: (), total=2, cut=2)


@pytest.mark.parametrize("framework", ["jax", 3, dict])
def test_a_framework_neither_named_nor_a_backend_class_is_refused(framework):
    with pytest.raises(ValueError) as err:
        warmfit.Trainer(MLP, **trainer_settings(), framework=framework)
    assert str(err.value) == (
        "The 'framework' parameter of Trainer must be one of {'torch', 'keras', 'sklearn', "
        "'xgboost', 'lightgbm'}, a subclass of warmfit.backends.Backend or None (inferred from the model). Got "
        f"{framework!r} instead."
    )
