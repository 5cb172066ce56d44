"""TensorBoardLogger with real TensorBoard event files, read back with TensorBoard's own
reader: per-step and per-epoch scalars at global steps, fit-call boundaries, one folder
per run, and a resumed process that logs every step once."""

from __future__ import annotations

import pytest

from conftest import MLP, make_data, make_trainer, require, trainer_settings

require("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import warmfit  # noqa: E402
from warmfit.integrations.tensorboard import TensorBoardLogger  # noqa: E402


def scalars(folder, tag):  # type: ignore[no-untyped-def]
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_steps_epochs_and_fit_calls_are_logged_at_global_steps(tmp_path):
    x, y = make_data(64)  # 4 steps per epoch
    logger = TensorBoardLogger(tmp_path / "tb")
    t = make_trainer(callbacks=[logger])
    t.fit(x, y, epochs=2, validation_data=(x, y))
    t.fit(x, y, epochs=1, mode="warm")
    logger.close()
    run0 = tmp_path / "tb" / "run0"
    losses = scalars(run0, "train/loss_step")
    assert [s for s, _ in losses] == list(range(1, 13))
    assert [s for s, _ in scalars(run0, "epoch/loss")] == [4, 8, 12]
    epoch_losses = [v for _, v in scalars(run0, "epoch/loss")]
    assert epoch_losses == pytest.approx([r["loss"] for r in t.history], rel=1e-6)  # float32
    assert [s for s, _ in scalars(run0, "epoch/val_loss")] == [4, 8]
    assert scalars(run0, "fit_call") == [(1, 0.0), (9, 1.0)]
    lrs = [v for _, v in scalars(run0, "train/lr")]
    assert lrs == pytest.approx(
        [warmfit.schedules.lr_at(t.schedule, s) for s in range(8)]
        + [warmfit.schedules.lr_at(t.schedule, s) for s in range(4)],  # warm: from 0 again
        rel=1e-6,
    )


def test_every_n_steps_and_a_restart_in_its_own_folder(tmp_path):
    x, y = make_data(64)
    logger = TensorBoardLogger(tmp_path / "tb", every_n_steps=3)
    t = make_trainer(callbacks=[logger])
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=1, mode="restart")
    logger.close()
    assert [s for s, _ in scalars(tmp_path / "tb" / "run0", "train/loss_step")] == [3, 6]
    assert [s for s, _ in scalars(tmp_path / "tb" / "run1", "train/loss_step")] == [3]


def test_a_resumed_process_logs_each_step_once(tmp_path):
    """The first trainer logs 2 epochs but its checkpoint is from epoch 1 (as a process
    killed after logging past its last save); the resumed one purges the steps after
    the checkpoint and logs them again: each step once, the resumed values."""
    x, y = make_data(64)
    first = make_trainer(callbacks=[TensorBoardLogger(tmp_path / "tb")], run_dir=tmp_path / "run")
    first.fit(x, y, epochs=1)
    first.save(tmp_path / "epoch1")
    first.fit(x, y, epochs=1)
    first.callbacks[0].close()  # type: ignore[attr-defined]
    first.close()
    logger = TensorBoardLogger(tmp_path / "tb")
    resumed = warmfit.Trainer.load(
        tmp_path / "epoch1", MLP, **{**trainer_settings(), "callbacks": [logger]}
    )
    resumed.fit(x, y, epochs=2)
    logger.close()
    steps = [s for s, _ in scalars(tmp_path / "tb" / "run0", "train/loss_step")]
    assert steps == list(range(1, 13))


def test_the_logger_is_refused_nothing_and_copies_without_its_writer(tmp_path):
    import copy

    logger = TensorBoardLogger(tmp_path / "tb")
    x, y = make_data(32)
    t = make_trainer(callbacks=[logger])
    t.fit(x, y, epochs=1)
    twin = copy.deepcopy(logger)
    assert twin._writer is None and logger._writer is not None
    logger.close()
    with pytest.raises(ValueError, match="every_n_steps"):
        TensorBoardLogger(tmp_path, every_n_steps=0)
