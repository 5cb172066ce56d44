"""Callbacks across fit calls, modes and processes; rewind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import warmfit
from conftest import assert_same_training_state, make_data, make_trainer
from warmfit import EarlyStopping, ReduceLROnPlateau


def noisy_data(seed: int = 0):
    """Labels that are mostly noise: validation stops improving quickly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=64).astype(np.int64)
    xv = rng.normal(size=(64, 8)).astype(np.float32)
    yv = rng.integers(0, 3, size=64).astype(np.int64)
    return x, y, (xv, yv)


def test_early_stopping_state_carries_across_continue_calls():
    x, y, val = noisy_data()
    es = EarlyStopping(patience=3)
    t = make_trainer(callbacks=[es], schedule=None)
    t.fit(x, y, epochs=40, validation_data=val)
    fired_at = es.stopped_epoch
    assert fired_at is not None and t.epoch == fired_at < 40
    assert es.wait == 3 and es.best_epoch == fired_at - 3
    # A continue call after it fired trains until the next epoch that does not improve.
    t.fit(x, y, epochs=40, validation_data=val)
    assert t.epoch == fired_at + 1
    assert t.ledger[-1]["stopped_by"] == "EarlyStopping"


def test_early_stopping_split_equals_straight():
    x, y, val = noisy_data()
    a = make_trainer(callbacks=[EarlyStopping(patience=4)])
    a.fit(x, y, epochs=6, validation_data=val)
    b = make_trainer(callbacks=[EarlyStopping(patience=4)])
    b.fit(x, y, epochs=2, validation_data=val)
    b.fit(x, y, epochs=4, validation_data=val)
    assert_same_training_state(a, b)
    assert a.callbacks[0].state_dict() == b.callbacks[0].state_dict()


def test_callbacks_reset_on_warm_and_restart():
    x, y, val = noisy_data()
    es, plateau = EarlyStopping(patience=50), ReduceLROnPlateau(patience=1, factor=0.5)
    t = make_trainer(callbacks=[es, plateau], schedule=None)
    t.fit(x, y, epochs=6, validation_data=val)
    assert es.best is not None and plateau.scale < 1.0
    t.fit(x, y, epochs=1, validation_data=val, mode="warm")
    assert es.best_epoch == 7 and es.wait == 0  # reset, then one epoch seen
    assert plateau.scale == 1.0 and plateau.reductions == []
    t.fit(x, y, epochs=1, validation_data=val, mode="restart")
    assert es.best_epoch == 1


def test_reduce_lr_on_plateau_persists_through_a_new_process_state(tmp_path):
    x, y, val = noisy_data()
    kw = dict(schedule=warmfit.schedules.constant(1e-2), run_dir=tmp_path)
    with make_trainer(callbacks=[ReduceLROnPlateau(patience=1, factor=0.5)], **kw) as t:
        t.fit(x, y, epochs=8, validation_data=val)
        scale, lr = t.callbacks[0].scale, t.learning_rate
    assert scale < 1.0 and lr == pytest.approx(1e-2 * scale)
    plateau = ReduceLROnPlateau(patience=1, factor=0.5)
    with make_trainer(callbacks=[plateau], **kw) as t2:  # resumes from the run dir
        assert plateau.scale == scale
        t2.fit(x, y, epochs=1, validation_data=val)
        assert t2.learning_rate <= lr
    straight_cb = ReduceLROnPlateau(patience=1, factor=0.5)
    straight = make_trainer(callbacks=[straight_cb], schedule=warmfit.schedules.constant(1e-2))
    straight.fit(x, y, epochs=9, validation_data=val)
    assert straight_cb.state_dict() == plateau.state_dict()
    for p, q in zip(straight.model.parameters(), t2.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_rewind_to_best_then_continue_is_exact(tmp_path):
    x, y = make_data()
    xv, yv = make_data(60, seed=9)
    with make_trainer(run_dir=tmp_path, keep_last=10) as t:
        for _ in range(5):
            t.fit(x, y, epochs=1, validation_data=(xv, yv))
        best = t.history.best("val_loss")
        path = t.rewind("best")
        assert t.epoch == best["epoch"] and len(t.history) == best["epoch"]
        assert t.ledger[-1]["mode"] == "rewind" and t.ledger[-1]["to"] == path.name
        t.fit(x, y, epochs=2, validation_data=(xv, yv))
        end = t.epoch
    ref = make_trainer()
    ref.fit(x, y, epochs=end, validation_data=(xv, yv))
    assert_same_training_state(ref, t)


def test_rewind_to_epoch_and_missing_epoch(tmp_path):
    x, y = make_data()
    with make_trainer(run_dir=tmp_path, keep_last=10) as t:
        for _ in range(3):
            t.fit(x, y, epochs=1)
        t.rewind(epoch=1)
        assert t.epoch == 1 and t.global_step == 13
        with pytest.raises(
            ValueError, match=r"^No checkpoint of run 0 at epoch 7\. Checkpoints kept: "
        ):
            t.rewind(epoch=7)
    with pytest.raises(
        ValueError, match="rewind needs checkpoints: construct the Trainer with run_dir"
    ):
        make_trainer().rewind()
