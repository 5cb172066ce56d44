"""Shared fixtures: small real models and data, the one comparison of training states
(:func:`assert_same_state`, on :func:`warmfit.check.compare_states`), and
:func:`require` for optional frameworks."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
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
from warmfit.check import compare_states

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


def state_of(x: Any) -> dict[str, Any]:
    """``{"tensors", "state"}`` of a Trainer, a ``state_dict()`` or a checkpoint folder;
    the state's dict a copy."""
    if isinstance(x, warmfit.Trainer):
        sd = x.state_dict()
    elif isinstance(x, (str, os.PathLike)):
        tensors, state = warmfit.checkpoint.read_checkpoint(Path(x))
        sd = {"tensors": tensors, "state": state}
    else:
        sd = x
    return {"tensors": sd["tensors"], "state": dict(sd["state"])}


def assert_same_state(a: Any, b: Any, *, differ: Iterable[str] = (), ledger: bool = False) -> None:
    """``a`` and ``b`` (Trainers, ``state_dict()`` results or checkpoint folders) hold the
    same training state, bit for bit: :func:`warmfit.check.compare_states` finds no
    difference (every tensor by dtype, shape and bytes; every counter but ``fit_calls``,
    random stream, schedule, optimizer and callback state, data record, call in
    progress and history value, type for type and float by bits), and two Trainers have
    the same learning rate, bit for bit. Fails with the list of entries that differ.

    ``differ`` names what differs by design and is left out: a counter
    (``"counters.run"``), an entry of a part (``"data.fingerprint"``), a part of the
    state (``"call"``) or a tensor (``"rng/torch_cpu"``). ``ledger=True`` compares the
    ledgers too (a state that must be left unchanged, its ledger included)."""
    sa, sb = state_of(a), state_of(b)
    for part in differ:
        if "/" in part:  # a tensor
            for sd in (sa, sb):
                assert part in sd["tensors"], f"no tensor {part} in the state"
                sd["tensors"] = {k: v for k, v in sd["tensors"].items() if k != part}
            continue
        key, _, sub = part.partition(".")
        for s in (sa["state"], sb["state"]):
            assert key in s and (not sub or sub in s[key]), f"no {part} in the state"
            if sub:  # a copy: the state's own dict may be the trainer's live one
                s[key] = {k: v for k, v in s[key].items() if k != sub}
            else:
                s.pop(key)
    trainer = b if isinstance(b, warmfit.Trainer) else None
    entries = compare_states(sa, sb, trainer, labels=("first", "second"))
    if ledger and sa["state"]["ledger"] != sb["state"]["ledger"]:
        entries.append("the ledger (ledger)")
    if isinstance(a, warmfit.Trainer) and isinstance(b, warmfit.Trainer):
        lr_a, lr_b = a.learning_rate, b.learning_rate
        if not _same_number(lr_a, lr_b):
            entries.append(f"learning rate: {lr_a!r} first, {lr_b!r} second")
    if entries:
        pytest.fail(
            f"the states differ in {len(entries)} entries:\n  " + "\n  ".join(entries),
            pytrace=False,
        )


def _same_number(x: Any, y: Any) -> bool:
    """The same type and bits (NaN equals NaN; -0.0 differs from 0.0)."""
    if type(x) is not type(y):
        return False
    if x != x and y != y:  # NaN
        return True
    return bool(x == y and math.copysign(1.0, x) == math.copysign(1.0, y))


def with_fresh_optimizer(trained: Mapping[str, Any], never_trained: Mapping[str, Any]) -> dict:
    """The state a ``warm`` call starts from, built by hand from the contract:
    ``trained``'s weights, counters and random streams, with the optimizer of
    ``never_trained`` (the ``state_dict()`` of a Trainer that never trained: the
    factory's fresh optimizer) and the schedule starting again at the current step.
    A Trainer loaded with it and fitted in ``continue`` mode is the reference of a
    ``warm`` call, made without the warm code path."""
    tensors = {k: v for k, v in trained["tensors"].items() if not k.startswith("optim/")}
    tensors |= {k: v for k, v in never_trained["tensors"].items() if k.startswith("optim/")}
    state = dict(trained["state"])
    optimizer = never_trained["state"]["backend"]["optimizer"]
    state["backend"] = {**state["backend"], "optimizer": optimizer}
    state["counters"] = {**state["counters"], "schedule_origin": state["counters"]["global_step"]}
    return {"tensors": tensors, "state": state}


def assert_latest_checkpoint_is_the_state(t: warmfit.Trainer) -> None:
    """The run dir's newest checkpoint holds the trainer's whole state, bit for bit."""
    assert_same_state(t.run_dir.latest(), t, ledger=True)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


LONG = os.environ.get("WARMFIT_LONG") == "1"
