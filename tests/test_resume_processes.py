"""E2 and E3 with real processes, real files and real signals: a resumed run equals an
uninterrupted one bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
from conftest import LONG, MLP, assert_same_state, make_data, make_trainer, trainer_settings
from warmfit.checkpoint import read_checkpoint

WORKER = Path(__file__).resolve().parent / "_worker.py"
EPOCHS = 6


def worker(run_dir: Path, until: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(run_dir), str(until), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted reference: EPOCHS epochs in this process."""
    x, y = make_data(400)
    xv, yv = make_data(60, seed=9)
    t = make_trainer()
    t.fit(x, y, until_epoch=EPOCHS, validation_data=(xv, yv))
    return t.state_dict()


def test_e2_new_process_resumes_from_run_dir(tmp_path, straight):
    run = tmp_path / "run"
    code, out, err = finish(worker(run, 3))
    assert code == 0, err
    assert "started at step 0" in out
    code, out, err = finish(worker(run, EPOCHS, "--out", str(tmp_path / "final")))
    assert code == 0, err
    assert "warmfit: resumed from" in out and "epoch 3, offset 0, step 75" in out
    assert "started at step 75" in out
    assert_same_state(tmp_path / "final", straight)


def test_e3_sigterm_mid_epoch_checkpoints_at_next_step(tmp_path, straight):
    run = tmp_path / "run"
    proc = worker(run, EPOCHS, "--slow", "0.02", "--checkpoint-every", "20")
    assert proc.stdout.readline().startswith("started at step 0")
    deadline = time.time() + 120
    while not (run / "checkpoints" / "LATEST").exists() and time.time() < deadline:
        time.sleep(0.02)  # the first periodic checkpoint: step 20 of 150 (>= 20 ms each)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code != 0
    assert "training stopped by SIGTERM at global step" in err
    assert "construct the Trainer on the same run_dir" in err
    latest = warmfit.rundir.RunDir(run).latest()
    _, state = read_checkpoint(latest)
    c = state["counters"]
    # The checkpoint lies on the step boundary right after the signal (after the last
    # batch of an epoch, the offset is the epoch's length: the epoch end comes next).
    step = c["global_step"]
    assert 0 < step < EPOCHS * 25
    assert (c["epoch"], c["offset"]) == ((step - 1) // 25, ((step - 1) % 25 + 1) * 16)
    code, out, err = finish(worker(run, EPOCHS, "--out", str(tmp_path / "final")))
    assert code == 0, err
    assert f"started at step {c['global_step']}" in out
    assert_same_state(tmp_path / "final", straight)


KILL_POINTS = 12 if LONG else 3


@pytest.mark.parametrize("trial", range(KILL_POINTS))
def test_e3_kill9_at_random_moments_then_resume_is_exact(tmp_path, straight, trial):
    rng = random.Random(1000 + trial)
    run = tmp_path / "run"
    kills = 0
    for _ in range(3):  # up to three kills in one run, then finish
        proc = worker(run, EPOCHS, "--checkpoint-every", "7", "--slow", "0.003")
        proc.stdout.readline()
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
    code, _out, err = finish(worker(run, EPOCHS, "--out", str(tmp_path / "final")))
    assert code == 0, err
    assert kills >= 1
    assert_same_state(tmp_path / "final", straight)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    proc = worker(run, EPOCHS, "--slow", "0.01")
    proc.stdout.readline()
    try:
        with pytest.raises(warmfit.RunDirLockedError, match=rf"is locked by process {proc.pid}"):
            make_trainer(run_dir=run)
    finally:
        proc.kill()
        proc.communicate()
    t = make_trainer(run_dir=run)  # the holder died: its lock went with it
    t.close()


def test_settings_that_break_exactness_are_listed(tmp_path):
    x, y = make_data(400)
    with make_trainer(run_dir=tmp_path) as t:
        t.fit(x, y, epochs=1)
    with pytest.warns(
        UserWarning,
        match=r"resuming with different settings: batch_size: checkpoint 16, now 32; seed: checkpoint 7, now 8",
    ):
        t2 = make_trainer(run_dir=tmp_path, batch_size=32, seed=8)
    with pytest.raises(warmfit.StateMismatchError) as err:
        t2.fit(x, y, epochs=1)
    assert "batch_size: checkpoint 16, now 32; seed: checkpoint 7, now 8" in str(err.value)
    assert "pass override=(...) naming the settings you changed" in str(err.value)
    t2.fit(x, y, epochs=1, mode="warm")  # allowed: warm does not promise exactness
    assert t2.epoch == 2 and t2.ledger[-1]["changes"]["settings"]
    t2.close()
    with make_trainer(
        run_dir=tmp_path, batch_size=32, seed=8, override=("batch_size", "seed")
    ) as t3:
        t3.fit(x, y, epochs=1)
        assert t3.epoch == 3


def test_architecture_mismatch_lists_keys(tmp_path):
    x, y = make_data(400)
    with make_trainer(run_dir=tmp_path) as t:
        t.fit(x, y, epochs=1)
    with pytest.raises(warmfit.StateMismatchError) as err:
        make_trainer(run_dir=tmp_path, model=lambda: MLP(hidden=32))
    msg = str(err.value)
    assert msg.startswith("the checkpoint does not match the model: shape mismatch: ")
    assert "net.0.weight: checkpoint [16, 8] vs model [32, 8]" in msg


def test_save_and_load_explicitly(tmp_path):
    x, y = make_data(400)
    a = make_trainer()
    a.fit(x, y, epochs=2)
    a.save(tmp_path / "ck")
    b = warmfit.Trainer.load(tmp_path / "ck", model=MLP, **trainer_settings())
    b.fit(x, y, epochs=1)
    a.fit(x, y, epochs=1)
    assert_same_state(a, b)


def test_restart_keeps_old_run_on_disk(tmp_path):
    x, y = make_data(400)
    with make_trainer(run_dir=tmp_path) as t:
        t.fit(x, y, epochs=2)
        t.fit(x, y, epochs=1, mode="restart")
        assert t.counters.run == 1
    assert (tmp_path / "history-run0.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "history-run1.jsonl").read_text().count("\n") == 1
    names = [p.name for p in warmfit.rundir.RunDir(tmp_path).checkpoints()]
    assert any("-run000-" in n for n in names) and names[-1].startswith("ckpt-00000002-run001-")
    with make_trainer(run_dir=tmp_path) as t:  # resumes the new run, ledger has all calls
        assert t.counters.run == 1 and t.epoch == 1
        assert [r["mode"] for r in t.ledger] == ["continue", "restart"]


class RowsSeen(MLP):
    """The MLP, recording the rows of every training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.rows.append(x.detach().numpy().copy())
        return super().forward(x)


def test_nothing_before_the_offset_is_iterated_at_a_deep_resume(tmp_path):
    """E6 for the in-memory path, in a real resume: 24 of an epoch's 25 steps, save, a
    fresh Trainer loads, and the next call trains the last batch of the uninterrupted
    run's epoch, having drawn one batch from the backend: nothing before the offset is
    iterated (O(1)), nothing replayed."""
    x, y = make_data(400)
    straight = make_trainer(model=RowsSeen)
    straight.fit(x, y, epochs=1)
    assert len(straight.model.rows) == 25
    first = make_trainer(model=RowsSeen)
    first.fit(x, y, steps=24)
    first.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(tmp_path / "ck", model=RowsSeen, **trainer_settings())
    assert resumed.cursor == warmfit.data.Cursor(0, 384)
    drawn = []
    batches = resumed._backend.batches

    def counting(*args, **kwargs):  # every batch the trainer draws from the backend
        for batch in batches(*args, **kwargs):
            drawn.append(len(batch[0]))
            yield batch

    resumed._backend.batches = counting
    resumed.fit(x, y, until_epoch=1)
    assert drawn == [16]
    assert len(resumed.model.rows) == 1
    assert resumed.model.rows[0].tobytes() == straight.model.rows[24].tobytes()
    assert_same_state(straight, resumed)
