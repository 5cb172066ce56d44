"""``Callback.on_step_end``: every optimizer step, with its rate and (when asked) its loss;
a stateful per-step callback stays exact across calls and checkpoints."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import warmfit
from conftest import MLP, assert_same_state, make_data, make_trainer, trainer_settings
from warmfit import StepLogs
from warmfit.schedules import lr_at


class Recorder(warmfit.Callback):
    """Records every step it sees; reads the loss only with ``read_loss``."""

    def __init__(self, read_loss: bool = True) -> None:
        self.read_loss = read_loss
        self.rows: list[tuple[int, int, int, float, float | None]] = []

    def on_step_end(self, trainer: warmfit.Trainer, step: StepLogs) -> None:
        loss = step.loss if self.read_loss else None
        self.rows.append((step.step, step.epoch, step.offset, step.lr, loss))


class StepCounter(warmfit.Callback):
    """A per-step callback with state: a running sum of the losses, saved and reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.total = 0, 0.0

    def on_step_end(self, trainer: warmfit.Trainer, step: StepLogs) -> None:
        self.steps += 1
        self.total += step.loss

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.total = state["steps"], state["total"]


@pytest.mark.parametrize("on_device", [False, True], ids=["loss-read-each-step", "as-on-a-gpu"])
def test_every_step_is_seen_with_its_rate_and_loss(on_device):
    x, y = make_data(200)  # 13 steps per epoch (16 per batch; the last has 8 rows)
    rec = Recorder()
    t = make_trainer(callbacks=[rec])
    if on_device:
        t.backend.check_each_step = False  # losses stay tensors until read, as on a GPU
    t.fit(x, y, epochs=2)
    assert [r[0] for r in rec.rows] == list(range(1, 27))
    assert [r[1] for r in rec.rows] == [0] * 13 + [1] * 13
    assert [r[2] for r in rec.rows] == [*range(16, 193, 16), 200] * 2
    assert [r[3] for r in rec.rows] == [lr_at(t.schedule, s) for s in range(26)]
    for epoch in (0, 1):  # the epoch's loss is the size-weighted mean of its steps' losses
        rows = rec.rows[13 * epoch : 13 * (epoch + 1)]
        sizes = [16] * 12 + [8]
        total = 0.0
        for (*_, loss), size in zip(rows, sizes, strict=True):
            total += loss * size
        assert t.history[epoch]["loss"] == total / 200


def test_a_callback_that_does_not_read_the_loss_never_gets_it():
    x, y = make_data(64)
    rec = Recorder(read_loss=False)
    t = make_trainer(callbacks=[rec])
    t.fit(x, y, epochs=1)
    assert [r[4] for r in rec.rows] == [None] * 4 and len(rec.rows) == 4


def test_callbacks_without_on_step_end_are_not_called_per_step():
    calls = []

    class EpochOnly(warmfit.Callback):
        def on_epoch_end(self, trainer, logs):  # type: ignore[no-untyped-def]
            calls.append(logs["epoch"])

    x, y = make_data(64)
    make_trainer(callbacks=[EpochOnly()]).fit(x, y, epochs=2)
    assert calls == [1, 2]


def test_a_stateful_per_step_callback_is_exact_across_calls_and_checkpoints(tmp_path):
    x, y = make_data(200)
    straight = make_trainer(callbacks=[StepCounter()])
    straight.fit(x, y, epochs=3)

    split = make_trainer(callbacks=[StepCounter()])
    split.fit(x, y, epochs=1)
    split.fit(x, y, steps=5)  # inside epoch 2
    split.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(
        tmp_path / "ck", MLP, **{**trainer_settings(), "callbacks": [StepCounter()]}
    )
    resumed.fit(x, y, until_epoch=3)
    assert_same_state(straight, resumed, ledger=False)
    counter = resumed.callbacks[0]
    assert isinstance(counter, StepCounter) and counter.steps == 39
    assert counter.total == straight.callbacks[0].total  # type: ignore[attr-defined]


def test_warm_and_restart_reset_a_per_step_callback():
    x, y = make_data(64)
    counter = StepCounter()
    t = make_trainer(callbacks=[counter])
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=1, mode="warm")
    assert counter.steps == 4
    t.fit(x, y, epochs=2, mode="restart")
    assert counter.steps == 8


def test_the_pre_clip_gradient_norm_of_each_step_is_seen():
    norms: list[float | None] = []

    class Norms(warmfit.Callback):
        def on_step_end(self, trainer, step):  # type: ignore[no-untyped-def]
            norms.append(step.grad_norm)

    x, y = make_data(64)
    t = make_trainer(callbacks=[Norms()], clip_grad_norm=0.5)
    t.fit(x, y, epochs=1)
    assert len(norms) == 4 and all(isinstance(n, float) and n > 0 for n in norms)
    assert t.history[-1]["grad_norm"] == sum(norms) / 4  # float64 sums of float32 norms
    assert t.history[-1]["grad_norm_max"] == max(norms)
    plain: list[float | None] = []

    class Plain(warmfit.Callback):
        def on_step_end(self, trainer, step):  # type: ignore[no-untyped-def]
            plain.append(step.grad_norm)

    make_trainer(callbacks=[Plain()]).fit(x, y, epochs=1)
    assert plain == [None] * 4


def test_step_logs_repr_and_the_public_name():
    logs = StepLogs(3, 0, 48, 0.01, 0.5, lambda handles: np.asarray(handles))
    assert repr(logs) == "StepLogs(step=3, epoch=0, lr=0.01)"
    assert logs.loss == 0.5 and warmfit.StepLogs is StepLogs
