"""Map-style Datasets with random augmentation are exact whatever the number of
DataLoader workers, across split calls, a resume and a ``kill -9`` (issue 15, item 5).

The bug this guards: a worker's random streams depended on which worker got which batch
since its iterator started, so a resumed iterator (which starts elsewhere) augmented the
same sample differently, without a word.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, assert_same_state, make_data, make_trainer
from warmfit.check import compare_states
from warmfit.checkpoint import read_checkpoint
from warmfit.rundir import RunDir


class Augmenting(torch.utils.data.Dataset):
    """(x, y) pairs with noise from all three global streams, as torchvision-style
    transforms (torch), albumentations (NumPy) and hand-written ones (random) draw."""

    def __init__(self, n: int = 120) -> None:
        self.x, self.y = make_data(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        x = torch.from_numpy(self.x[i]) + 0.1 * torch.randn(8)
        x = x + float(np.random.normal()) * 0.05 + random.random() * 0.01
        return x, int(self.y[i])


class Batched(Augmenting):
    """A Dataset that reads a batch at once (``__getitems__``, as Hugging Face's do)."""

    def __getitems__(self, indices: list[int]) -> list:
        return [self[i] for i in indices]


def fit(workers: int, dataset=None, *, cut: int | None = None, epochs: int = 3):  # type: ignore[no-untyped-def]
    """``epochs`` epochs; with ``cut``, stop at that step, save, resume into a fresh
    Trainer with ``workers`` workers and finish."""
    dataset = dataset if dataset is not None else Augmenting()
    t = make_trainer(model=MLP, num_workers=0 if cut else workers)
    if cut is None:
        t.fit(dataset, epochs=epochs)
        return t
    t.fit(dataset, steps=cut)
    resumed = make_trainer(model=MLP, num_workers=workers)
    resumed.load_state_dict(t.state_dict())
    resumed.fit(dataset, until_epoch=epochs)
    return resumed


@pytest.fixture(scope="module")
def straight():
    return fit(0).state_dict()


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_any_number_of_workers_gives_the_same_bits(straight, workers):
    assert compare_states(straight, fit(workers).state_dict()) == []


@pytest.mark.parametrize(("workers", "cut"), [(2, 5), (4, 12), (2, 13)])
def test_a_resume_inside_an_epoch_with_workers_equals_straight(straight, workers, cut):
    """8 steps an epoch: cut inside epochs 1 and 2, and at an epoch's end."""
    assert compare_states(straight, fit(workers, cut=cut).state_dict()) == []


def test_a_dataset_that_reads_batches_is_exact_for_the_same_batches():
    reference = fit(0, Batched()).state_dict()
    assert compare_states(reference, fit(2, Batched(), cut=11).state_dict()) == []


def test_reading_data_never_moves_the_trainers_streams():
    """E4/E5 for data: an augmenting Dataset and plain arrays of the same values draw
    nothing from the trainer's streams, so dropout sees the same numbers in both."""
    t = make_trainer(model=MLP)
    t.fit(Augmenting(), epochs=1)
    plain = make_trainer(model=MLP)
    ds = Augmenting()
    # The rows the Dataset produced, read the way warmfit reads them, as arrays.
    from warmfit.backends.torch import _SeededSamples

    reader = _SeededSamples(ds, seed=7, epoch=0)
    rows = reader.__getitems__(list(range(len(ds))))
    x = torch.stack([r[0] for r in rows])
    y = torch.tensor([r[1] for r in rows])
    plain.fit(x, y, epochs=1)
    # The same samples in the same order, the same dropout: the same bits (the data's
    # fingerprint is another: a Dataset's, and arrays').
    assert_same_state(t, plain, differ=("data.fingerprint",))


KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
from conftest import MLP, make_trainer
from test_dataset_workers import Augmenting

class KilledAt(MLP):
    def forward(self, x):
        if self.training:
            type(self).calls = getattr(type(self), "calls", 0) + 1
            if type(self).calls == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9, mid-epoch, workers running
        return super().forward(x)

t = make_trainer(model=KilledAt, num_workers=2, run_dir=sys.argv[1], checkpoint_every=1)
t.fit(Augmenting(), epochs=3)
t.close()
"""


def test_kill_9_with_two_workers_then_the_same_call_again_equals_straight(tmp_path, straight):
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(Path(__file__).resolve().parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(run), "11"], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it was killed, not finished
    saved = read_checkpoint(RunDir(run).latest())[1]["counters"]
    assert 0 < saved["global_step"] < 11 and saved["offset"] > 0  # inside epoch 1
    # A new process, as a requeue would start: the same call, with workers again.
    resumed = make_trainer(model=MLP, num_workers=2, run_dir=run)
    resumed.fit(Augmenting(), epochs=3)
    state = resumed.state_dict()
    resumed.close()
    assert compare_states(straight, state) == []
    assert state["state"]["counters"]["epoch"] == 3


def test_a_straight_run_is_not_the_trivial_one(straight):
    """The comparisons above can fail: without augmentation the weights differ."""

    class Plain(Augmenting):
        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            return torch.from_numpy(self.x[i]), int(self.y[i])

    t = make_trainer(model=MLP)
    t.fit(Plain(), epochs=3)
    assert compare_states(straight, t.state_dict()) != []
    assert isinstance(warmfit.Trainer, type)
