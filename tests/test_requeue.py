"""E8: running the same call (or the same command) again after an interruption ends
exactly where the uninterrupted call would have ended; a call that had finished and is
run again trains more (issue 15, item 2).

The bug this guards: ``warmfit train spec.toml --epochs 4`` stopped by SIGTERM in epoch 2
and run again trained to epoch 6 (its ``--epochs 4`` counted again from the cursor), and
a cluster scheduler that requeues the same command added epochs at every preemption.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import warmfit
from conftest import MLP, make_data, make_trainer
from warmfit.check import compare_states
from warmfit.checkpoint import read_checkpoint
from warmfit.rundir import RunDir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class SignalAt(MLP):
    """An MLP that sends this process SIGTERM during its forward pass number ``at``,
    as a scheduler's preemption would (the trainer acts on it at the step's end)."""

    def __init__(self, at: int | None = None) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def straight(**fit) -> warmfit.Trainer:
    x, y = make_data(200)
    t = make_trainer(model=SignalAt)
    t.fit(x, y, **fit)
    return t


def interrupted(at: int, **fit) -> warmfit.Trainer:
    x, y = make_data(200)
    t = make_trainer(model=lambda: SignalAt(at))
    with pytest.raises(warmfit.TrainingInterrupted) as err:
        t.fit(x, y, **fit)
    assert err.value.step == at
    return t


def assert_same(a: warmfit.Trainer, b: warmfit.Trainer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert compare_states(sa, sb) == []
    assert sa["state"]["counters"] == sb["state"]["counters"]  # fit_calls too: one call
    assert sa["state"]["history"] == sb["state"]["history"]  # segments and modes too
    assert sa["state"]["call"] is None and sb["state"]["call"] is None


@pytest.mark.parametrize(
    "fit",
    [
        {"epochs": 4},
        {"epochs": 3, "mode": "warm"},
        {"epochs": 2, "mode": "restart"},
        {"until_epoch": 3},
        {"steps": 30},
    ],
    ids=["epochs", "warm", "restart", "until_epoch", "steps"],
)
def test_the_same_call_again_finishes_the_interrupted_one(fit):
    """13 steps an epoch: the signal at step 20 stops the call inside epoch 2."""
    x, y = make_data(200)
    reference = straight(**fit)
    t = interrupted(20, **fit)
    assert t.global_step == 20 and t.state_dict()["state"]["call"]["request"]["mode"] == (
        fit.get("mode", "continue")
    )
    t.fit(x, y, **fit)  # the requeue
    assert_same(reference, t)
    rows = t.ledger.records
    assert [r.get("resumes_call") for r in rows] == [None, 0]
    assert rows[0]["stopped_by"] == "SIGTERM" and rows[1]["step_end"] == reference.global_step
    # A finished call run again trains more, as always (an absolute target: nothing to do).
    if "until_epoch" in fit:
        with pytest.raises(ValueError, match="no training would occur"):
            t.fit(x, y, **fit)
        return
    t.fit(x, y, **fit)
    last = t.ledger.records[-1]
    assert last.get("resumes_call") is None and last["step_end"] - last["step_start"] > 0
    assert t.counters.run == (1 if fit.get("mode") == "restart" else 0) + reference.counters.run


def test_the_interruption_message_says_what_the_same_call_will_do(tmp_path):
    x, y = make_data(200)
    t = make_trainer(model=lambda: SignalAt(20), run_dir=tmp_path / "run")
    with pytest.raises(warmfit.TrainingInterrupted) as err:
        t.fit(x, y, epochs=4)
    assert str(err.value) == (
        f"training stopped by SIGTERM at global step 20: checkpoint written to "
        f"{err.value.checkpoint}. Run the same command again (or construct the Trainer on "
        "the same run_dir and repeat the same fit call) to finish this call exactly where "
        "it would have ended, at epoch 4; a call with other arguments starts anew from "
        "step 20."
    )
    t.close()


def test_another_call_after_an_interruption_starts_anew_and_says_so():
    x, y = make_data(200)
    t = interrupted(20, epochs=4)
    with pytest.warns(UserWarning) as caught:
        t.fit(x, y, epochs=2)
    assert str(caught[0].message) == (
        "fit call 0 (mode='continue', epochs=4) stopped before its end (epoch 4): this call "
        "(mode='continue', epochs=2) differs from it, so it starts anew from the cursor "
        "(global step 20) and the interrupted call stays unfinished. To finish that call "
        "where it would have ended, repeat it with the same arguments and data."
    )
    assert t.epoch == 3  # the epoch in progress counts as one of the 2
    assert t.ledger.records[-1]["changes"]["abandoned_call"] == 0
    assert t.state_dict()["state"]["call"] is None


def test_a_new_process_with_the_same_call_finishes_it(tmp_path):
    """Through a checkpoint: the open call is part of the state (E2 + E8)."""
    x, y = make_data(200)
    reference = straight(epochs=4)
    t = make_trainer(model=lambda: SignalAt(20), run_dir=tmp_path / "run")
    with pytest.raises(warmfit.TrainingInterrupted):
        t.fit(x, y, epochs=4)
    t.close()
    resumed = make_trainer(model=SignalAt, run_dir=tmp_path / "run")
    resumed.fit(x, y, epochs=4)
    assert_same(reference, resumed)
    resumed.close()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "warmfit", *args], cwd=cwd, env=env, text=True,
        capture_output=True, timeout=300,
    )  # fmt: skip


def _latest(run_dir: Path) -> dict:
    path = RunDir(run_dir).latest()
    tensors, state = read_checkpoint(path)
    return {"tensors": tensors, "state": state}


def test_a_requeued_command_ends_where_the_uninterrupted_one_ends(tmp_path):
    """`warmfit train spec --epochs 4` stopped by SIGTERM and run again, as a scheduler
    requeues it, equals the uninterrupted command; a third run trains 4 more."""
    (tmp_path / "digits.py").write_text((EXAMPLES / "digits.py").read_text())
    spec = tmp_path / "spec.toml"
    spec.write_text((EXAMPLES / "digits.toml").read_text())
    command = ["train", str(spec), "--epochs", "4"]
    done = _run([*command, "--run-dir", "straight"], tmp_path)
    assert done.returncode == 0, done.stderr

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmfit", *command, "--run-dir", "requeued"], cwd=tmp_path,
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("epoch 1/4")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "finish this call exactly where it would have ended, at epoch 4" in err
    stopped = _latest(tmp_path / "requeued")["state"]["counters"]
    assert 1 <= stopped["epoch"] < 4  # stopped inside the call

    again = _run([*command, "--run-dir", "requeued"], tmp_path)  # the very same command
    assert again.returncode == 0, again.stderr
    a, b = _latest(tmp_path / "straight"), _latest(tmp_path / "requeued")
    assert compare_states(a, b) == []
    assert a["state"]["counters"] == b["state"]["counters"]
    assert a["state"]["history"] == b["state"]["history"]
    assert b["state"]["counters"]["epoch"] == 4

    third = _run([*command, "--run-dir", "requeued"], tmp_path)
    assert third.returncode == 0, third.stderr
    assert _latest(tmp_path / "requeued")["state"]["counters"]["epoch"] == 8
