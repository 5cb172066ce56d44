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
from conftest import LONG, make_data, make_trainer, trainer_settings
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


def assert_equal_to_straight(path: Path, straight: dict) -> None:
    tensors, state = read_checkpoint(path)
    ref_t, ref_s = straight["tensors"], straight["state"]
    assert sorted(tensors) == sorted(ref_t)
    for k in ref_t:
        assert torch.equal(torch.from_numpy(tensors[k]), torch.from_numpy(ref_t[k])), k
    for key in ("rng", "epoch_partial", "backend", "schedule"):
        assert state[key] == ref_s[key], key
    c, rc = dict(state["counters"]), dict(ref_s["counters"])
    c.pop("fit_calls"), rc.pop("fit_calls")
    assert c == rc
    values = [
        {k: v for k, v in r.items() if k not in ("segment", "mode")} for r in state["history"]
    ]
    ref = [{k: v for k, v in r.items() if k not in ("segment", "mode")} for r in ref_s["history"]]
    assert values == ref


def test_e2_new_process_resumes_from_run_dir(tmp_path, straight):
    run = tmp_path / "run"
    code, out, err = finish(worker(run, 3))
    assert code == 0, err
    assert "started at step 0" in out
    code, out, err = finish(worker(run, EPOCHS, "--out", str(tmp_path / "final")))
    assert code == 0, err
    assert "warmfit: resumed from" in out and "epoch 3, offset 0, step 75" in out
    assert "started at step 75" in out
    assert_equal_to_straight(tmp_path / "final", straight)


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
    assert_equal_to_straight(tmp_path / "final", straight)


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
    assert_equal_to_straight(tmp_path / "final", straight)


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
    from conftest import MLP

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
    b = warmfit.Trainer.load(tmp_path / "ck", model=make_trainer().model, **trainer_settings())
    b.fit(x, y, epochs=1)
    a.fit(x, y, epochs=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


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


def test_nothing_before_the_offset_is_iterated_at_a_deep_resume():
    """E6 for the in-memory path: the batches start at the offset, O(1)."""
    x, y = make_data(400)
    t = make_trainer()
    order = warmfit.data.epoch_permutation(7, 0, 400)
    data = t._backend.prepare(x, y)
    got = [b[0] for b in t._backend.batches(data, order, 384, 16, 0)]
    assert len(got) == 1
    assert np.array_equal(got[0].numpy(), x[order[384:400]])
