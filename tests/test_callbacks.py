"""Callbacks across fit calls, modes and processes; rewind."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import warmfit
from conftest import assert_same_state, make_data, make_trainer
from warmfit import EarlyStopping, ReduceLROnPlateau
from warmfit.monitor import OverfittingMonitor


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
    assert_same_state(a, b)
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
        reductions = len(t.callbacks[0].reductions)
    # the rate used is schedule(step) * scale, and each reduction halves the scale: exact
    assert reductions >= 1 and scale == 0.5**reductions and lr == 1e-2 * scale
    plateau = ReduceLROnPlateau(patience=1, factor=0.5)
    with make_trainer(callbacks=[plateau], **kw) as t2:  # resumes from the run dir
        assert plateau.scale == scale
        t2.fit(x, y, epochs=1, validation_data=val)
        assert t2.learning_rate <= lr and t2.learning_rate == 1e-2 * plateau.scale
    straight_cb = ReduceLROnPlateau(patience=1, factor=0.5)
    straight = make_trainer(callbacks=[straight_cb], schedule=warmfit.schedules.constant(1e-2))
    straight.fit(x, y, epochs=9, validation_data=val)
    assert straight_cb.state_dict() == plateau.state_dict()
    assert_same_state(straight, t2)


def test_e5_callbacks_that_never_fire_never_perturb_training():
    """E5: EarlyStopping, ReduceLROnPlateau and OverfittingMonitor watching every epoch
    (and never firing) train to the same bits as no callback at all: the whole state
    but the callbacks' own."""
    x, y = make_data()
    xv, yv = make_data(60, seed=9)
    watchers = [
        EarlyStopping(patience=100),
        ReduceLROnPlateau(patience=100, factor=0.5),
        OverfittingMonitor(patience=100, verbose=False),
    ]
    with_cbs = make_trainer(callbacks=watchers)
    with_cbs.fit(x, y, epochs=4, validation_data=(xv, yv))
    with_cbs.fit(x, y, epochs=2, validation_data=(xv, yv))
    none = make_trainer()
    none.fit(x, y, epochs=4, validation_data=(xv, yv))
    none.fit(x, y, epochs=2, validation_data=(xv, yv))
    es, plateau, monitor = watchers
    # they watched (a best value, its epoch) and did not fire
    assert es.best is not None and es.stopped_epoch is None and es.wait < 100
    assert plateau.best is not None and plateau.scale == 1.0 and plateau.reductions == []
    assert monitor.best_epoch is not None and monitor.last_epoch == 6
    assert [r.get("stopped_by") for r in with_cbs.ledger] == [None, None]
    assert_same_state(with_cbs, none, differ=("callbacks",))


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
    assert_same_state(ref, t)


def test_a_rewind_is_saved_so_a_new_process_resumes_from_it(tmp_path):
    """rewind writes the rewound state (its ledger row included) as the run dir's newest
    checkpoint: a new Trainer on the run dir goes on from the rewind, not from before
    it, and the ledger keeps every call."""
    x, y = make_data()
    with make_trainer(run_dir=tmp_path, keep_last=10) as t:
        for _ in range(3):
            t.fit(x, y, epochs=1)
        t.rewind(epoch=1)
        rewound = t.state_dict()
    with make_trainer(run_dir=tmp_path, keep_last=10) as again:
        assert (again.epoch, again.global_step) == (1, 13)
        modes = ["continue"] * 3 + ["rewind"]
        assert [r["mode"] for r in again.ledger] == modes
        assert_same_state(again, trainer_from(rewound))
        again.fit(x, y, epochs=2)
        assert [r["mode"] for r in again.ledger] == [*modes, "continue"]
    ref = make_trainer()
    ref.fit(x, y, epochs=3)
    assert_same_state(ref, again)


def trainer_from(state_dict: dict) -> warmfit.Trainer:
    t = make_trainer()
    t.load_state_dict(state_dict)
    return t


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


def test_early_stopping_restore_best_is_exact_across_a_new_process_state(tmp_path):
    """The best weights kept by restore_best=True are part of the checkpoint: a run
    resumed between the best epoch and the stop restores the same weights (E2)."""
    x, y, val = noisy_data()
    straight_es = EarlyStopping(patience=4, restore_best=True)
    straight = make_trainer(callbacks=[straight_es])
    straight.fit(x, y, epochs=40, validation_data=val)
    assert straight_es.stopped_epoch is not None
    assert straight_es.stopped_epoch > straight_es.best_epoch + 1  # room for a cut between
    with make_trainer(
        callbacks=[EarlyStopping(patience=4, restore_best=True)], run_dir=tmp_path
    ) as t:
        t.fit(x, y, until_epoch=straight_es.best_epoch + 1, validation_data=val)
    resumed_es = EarlyStopping(patience=4, restore_best=True)
    with make_trainer(callbacks=[resumed_es], run_dir=tmp_path) as resumed:
        assert resumed_es.state_arrays().keys() == straight_es.state_arrays().keys()
        resumed.fit(x, y, epochs=40, validation_data=val)
    assert resumed_es.stopped_epoch == straight_es.stopped_epoch
    assert_same_state(straight, resumed)


def test_a_save_at_an_epoch_end_carries_that_epochs_metric(tmp_path):
    """checkpoint_every that falls on an epoch's last step saves after the epoch's
    validation, tagged with its metric; so "best" holds the best epoch's weights."""
    x, y = make_data()
    xv, yv = make_data(60, seed=9)
    with make_trainer(run_dir=tmp_path, keep_last=None, checkpoint_every=13) as t:
        t.fit(x, y, epochs=6, validation_data=(xv, yv))  # 13 steps per epoch
        best = t.history.best("val_loss")
        assert best["epoch"] < 6
        t.rewind("best")
        assert t.epoch == best["epoch"]
        assert t.evaluate(xv, yv)["loss"] == best["val_loss"]


def test_the_save_after_restore_best_carries_the_best_epochs_metric(tmp_path):
    """When EarlyStopping(restore_best=True) fires, the weights saved at that step are
    the best epoch's: the checkpoint is tagged with the best value, not the last one."""
    x, y, val = noisy_data()
    es = EarlyStopping(patience=3, restore_best=True)
    with make_trainer(callbacks=[es], schedule=None, run_dir=tmp_path, keep_last=None) as t:
        t.fit(x, y, epochs=40, validation_data=val)
        assert es.stopped_epoch == t.epoch < 40 and t.history[-1]["val_loss"] > es.best
        assert t.evaluate(*val)["loss"] == es.best
        latest = t.run_dir.latest()
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert index["checkpoints"][latest.name]["metric"] == es.best


def test_the_best_value_tags_only_the_restored_weights(tmp_path):
    """After a rewind, other weights that reach the step where EarlyStopping restored
    the best ones are tagged with their own value, not the restored weights'."""
    x, y, val = noisy_data()
    es = EarlyStopping(patience=3, restore_best=True)
    with make_trainer(callbacks=[es], schedule=None, run_dir=tmp_path, keep_last=None) as t:
        for _ in range(40):
            t.fit(x, y, epochs=1, validation_data=val)
            if es.stopped_epoch is not None:
                break
        stopped = t.epoch
        t.rewind(epoch=1)
        es.patience = 100
        t.fit(x, y, until_epoch=stopped, validation_data=val, mode="warm")
        latest = t.run_dir.latest()
        own = t.history[-1]["val_loss"]
    assert own != es.best
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert index["checkpoints"][latest.name]["metric"] == own


def test_reduce_lr_on_plateau_refuses_a_torch_scheduler():
    with pytest.raises(
        TypeError,
        match="^ReduceLROnPlateau scales the learning rate warmfit sets at each step, but a "
        "torch LRScheduler sets the rate itself",
    ):
        make_trainer(
            callbacks=[ReduceLROnPlateau()],
            schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
        )
    t = make_trainer(callbacks=[ReduceLROnPlateau()], schedule=None)
    x, y = make_data()
    with pytest.raises(TypeError, match="^ReduceLROnPlateau scales"):
        t.fit(x, y, epochs=1, schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10))
    assert t.epoch == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: EarlyStopping(patience="3"),
            "The 'patience' parameter of EarlyStopping must be an int >= 0. Got '3' instead.",
        ),
        (
            lambda: EarlyStopping(min_delta=float("nan")),
            "The 'min_delta' parameter of EarlyStopping must be a finite number >= 0. Got nan",
        ),
        (
            lambda: ReduceLROnPlateau(cooldown=-1),
            "The 'cooldown' parameter of ReduceLROnPlateau must be an int >= 0. Got -1 instead.",
        ),
        (
            lambda: ReduceLROnPlateau(monitor=None),
            "The 'monitor' parameter of ReduceLROnPlateau must be a logged value's name",
        ),
    ],
)
def test_callback_parameters_are_checked(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message)


def test_callbacks_must_be_callback_objects():
    with pytest.raises(TypeError, match=r"^callbacks\[1\] is <object object at .*>, not a warmfit"):
        make_trainer(callbacks=[EarlyStopping(), object()])


def test_turning_restore_best_on_at_a_resume_warns_and_off_drops_the_weights(tmp_path):
    x, y, val = noisy_data()
    with make_trainer(callbacks=[EarlyStopping(patience=4)], run_dir=tmp_path / "a") as t:
        t.fit(x, y, epochs=3, validation_data=val)
    with pytest.warns(UserWarning, match=r"^EarlyStopping\(restore_best=True\) resumed from a"):
        t2 = make_trainer(
            callbacks=[EarlyStopping(patience=4, restore_best=True)], run_dir=tmp_path / "a"
        )
    t2.close()
    with make_trainer(
        callbacks=[EarlyStopping(patience=4, restore_best=True)], run_dir=tmp_path / "b"
    ) as t:
        t.fit(x, y, epochs=3, validation_data=val)
        assert t.callbacks[0].state_arrays()
    off = EarlyStopping(patience=4)
    with make_trainer(callbacks=[off], run_dir=tmp_path / "b") as t3:
        assert off.state_arrays() == {}  # not saved again, stale, in every checkpoint
        assert not any(k.startswith("callbacks/") for k in t3.state_dict()["tensors"])


def test_a_monitor_key_that_is_never_logged_warns_once(tmp_path):
    x, y, val = noisy_data()
    with make_trainer(run_dir=tmp_path, monitor="val_acc", monitor_mode="max") as t:
        with pytest.warns(UserWarning) as caught:
            t.fit(x, y, epochs=2, validation_data=val)
        messages = [str(w.message) for w in caught if "monitor=" in str(w.message)]
        assert messages == [
            "Trainer(monitor='val_acc') is not in the epoch's logs ['loss', 'lr', 'val_accuracy', "
            "'val_loss']: "
            "checkpoints carry no metric, so 'best' retention and rewind('best') have nothing "
            "to rank. Monitor one of those keys (and pass validation data for a val_ key)."
        ]
    with make_trainer(run_dir=tmp_path / "plain") as t, warnings.catch_warnings():
        warnings.simplefilter("error")  # the default val_loss without validation: silent
        t.fit(x, y, epochs=1)


def test_early_stopping_that_never_saw_a_finite_value_continues(capsys):
    """Every epoch's val_loss NaN: it fires with no best value, and the next call's
    notice says so (it formatted None with :.6g and raised TypeError)."""
    x, y, (xv, yv) = noisy_data()
    xv = xv.copy()
    xv[0, 0] = np.nan
    es = EarlyStopping(patience=2)
    t = make_trainer(callbacks=[es], schedule=None)
    t.fit(x, y, epochs=10, validation_data=(xv, yv))
    assert es.stopped_epoch == t.epoch == 2 and es.best is None
    t.fit(x, y, epochs=10, validation_data=(xv, yv))
    assert "EarlyStopping: stopped at epoch 2 (no finite val_loss yet)" in capsys.readouterr().out
    assert t.epoch == 3
