"""The overfitting monitor, learning-curve plots and the progress line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console
from torch import nn

from conftest import make_data, make_trainer
from warmfit.monitor import OverfittingMonitor, OverfittingWarning, summary_line
from warmfit.plots import plot_history
from warmfit.progress import Progress

PNG = b"\x89PNG\r\n\x1a\n"

# Training keeps falling; validation is best at epoch 4, then rises: overfitting.
LOSS = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
VAL = [1.1, 0.9, 0.7, 0.65, 0.7, 0.75, 0.8, 0.9]


def records(loss=LOSS, val=VAL, segment=0, mode="continue", start=1):
    out = []
    for i, (lo, va) in enumerate(zip(loss, val, strict=True)):
        r = {"epoch": start + i, "segment": segment, "mode": mode, "loss": lo, "lr": 1e-2}
        if va is not None:
            r["val_loss"] = va
        out.append(r)
    return out


def test_summary_line_overfitting_case():
    assert summary_line(records()) == (
        "overfitting monitor: best val_loss=0.65 at epoch 4 (4 epochs past it); train/validation "
        "gap (val_loss - loss) widening over the last 5 epochs (+0.15 -> +0.8)"
    )


def test_summary_line_for_a_metric_the_training_data_never_logs():
    acc = [{**r, "val_accuracy": 1 - r["val_loss"]} for r in records()]
    assert summary_line(acc, "val_accuracy", "max") == (
        "overfitting monitor: best val_accuracy=0.35 at epoch 4 (4 epochs past it); no "
        "train/validation gap: the history has no 'accuracy'"
    )


def test_the_summary_follows_the_fit_calls_verbose(capsys):
    x, y = make_data(64)
    t = make_trainer(callbacks=[OverfittingMonitor()], verbose=1)
    t.fit(x, y, epochs=2, validation_split=0.25, verbose=0)
    assert capsys.readouterr().out == ""
    t.fit(x, y, epochs=1, validation_split=0.25)
    assert "overfitting monitor: best val_loss=" in capsys.readouterr().out


def test_summary_line_best_is_last_flat_gap_and_edge_cases():
    falling = records([1.0, 0.9, 0.8], [1.1, 1.0, 0.9])
    assert summary_line(falling) == (
        "overfitting monitor: best val_loss=0.9 at epoch 3 (the last epoch); train/validation "
        "gap (val_loss - loss) flat over the last 3 epochs (+0.1 -> +0.1)"
    )
    assert summary_line(records([1.0], [1.2])) == (
        "overfitting monitor: best val_loss=1.2 at epoch 1 (the last epoch); train/validation "
        "gap: too few epochs for a trend"
    )
    assert summary_line(records([1.0, 0.5], [None, None])) == (
        "overfitting monitor: no 'val_loss' in the history yet; pass validation_data or "
        "validation_split to fit"
    )
    one_past = records([1.0, 0.9], [0.5, 0.6])
    assert summary_line(one_past).startswith(
        "overfitting monitor: best val_loss=0.5 at epoch 1 (1 epoch past it); "
    )


def test_warning_once_per_plateau_when_validation_stalls_and_training_falls():
    m = OverfittingMonitor(patience=3)
    messages = [m.observe(r) for r in records()]
    assert messages[:6] == [None] * 6
    assert messages[6] == (
        "val_loss has not improved for 3 epochs (best 0.65 at epoch 4, 0.8 at epoch 7) while "
        "the training loss fell from 0.5 to 0.2: the model is overfitting. Consider "
        "EarlyStopping, trainer.rewind('best'), more data or more regularisation."
    )
    assert messages[7] is None  # once per plateau
    # validation stalls but training does not fall: not overfitting, no warning
    flat = OverfittingMonitor(patience=2)
    assert [flat.observe(r) for r in records([0.5] * 4, [0.4, 0.5, 0.5, 0.5])] == [None] * 4


def test_bad_parameters():
    with pytest.raises(ValueError) as e:
        OverfittingMonitor(patience=0)
    assert str(e.value) == (
        "The 'patience' parameter of OverfittingMonitor must be an int >= 1. Got 0 instead."
    )
    with pytest.raises(ValueError) as e:
        OverfittingMonitor(mode="lowest")
    assert str(e.value) == (
        "The 'mode' parameter of OverfittingMonitor must be one of {'min', 'max'}. "
        "Got 'lowest' instead."
    )


def overfit_data():
    """Tiny noisy data (random labels), so a big model memorises it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=24).astype(np.int64)
    xv = rng.normal(size=(48, 8)).astype(np.float32)
    yv = rng.integers(0, 3, size=48).astype(np.int64)
    return x, y, xv, yv


def big_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 3))  # fmt: skip


def test_overfitting_warning_on_a_case_built_to_overfit(capsys):
    x, y, xv, yv = overfit_data()
    monitor = OverfittingMonitor(patience=4)
    t = make_trainer(model=big_model, schedule=None, batch_size=8, callbacks=[monitor], verbose=1)
    with pytest.warns(OverfittingWarning, match=r"^val_loss has not improved for 4 epochs"):
        t.fit(x, y, epochs=12, validation_data=(xv, yv))
    best = t.history.best("val_loss")
    assert monitor.best_epoch == best["epoch"] < 12
    assert t.history[-1]["loss"] < best["loss"]  # training kept falling
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("overfitting")]
    # The expected line from the history by the documented rule, computed here: the best
    # val_loss and its epoch; the gap val_loss - loss over the last 5 epochs, "widening"
    # when the least-squares change of |gap| over them is above 2% of the mean val_loss.
    last = t.history.records[-5:]
    gaps = [r["val_loss"] - r["loss"] for r in last]
    slope = np.polyfit([r["epoch"] for r in last], np.abs(gaps), 1)[0]
    assert slope * 4 > 0.02 * np.mean([r["val_loss"] for r in last])  # widening
    assert line == [
        f"overfitting monitor: best val_loss={best['val_loss']:.4g} at epoch {best['epoch']} "
        f"({12 - best['epoch']} epochs past it); train/validation gap (val_loss - loss) "
        f"widening over the last 5 epochs ({gaps[0]:+.4g} -> {gaps[-1]:+.4g})"
    ]
    assert line == [summary_line(t.history.records)]  # the same line without the callback


def test_monitor_state_round_trip_and_modes(data):
    x, y = data
    xv, yv = x[:40], y[:40]
    monitor = OverfittingMonitor(patience=2)
    t = make_trainer(callbacks=[monitor])
    t.fit(x, y, epochs=3, validation_data=(xv, yv))
    saved = json.loads(json.dumps(monitor.state_dict()))  # plain JSON data
    assert saved["last_epoch"] == 3 and [r[0] for r in saved["recent"]] == [1, 2, 3]

    # through the Trainer's state (what checkpoints hold), into a fresh Trainer
    other = OverfittingMonitor(patience=2)
    t2 = make_trainer(callbacks=[other])
    t2.load_state_dict(t.state_dict())
    assert other.state_dict() == monitor.state_dict()

    # continue: kept
    t.fit(x, y, epochs=1, validation_data=(xv, yv))
    assert [r[0] for r in monitor.recent] == [1, 2, 3, 4]
    # warm: reset, then it sees the new epoch only
    t.fit(x, y, epochs=1, validation_data=(xv, yv), mode="warm")
    assert [r[0] for r in monitor.recent] == [5] and monitor.best_epoch == 5
    # restart: reset, a new run from epoch 1
    t.fit(x, y, epochs=1, validation_data=(xv, yv), mode="restart")
    assert [r[0] for r in monitor.recent] == [1] and monitor.best_epoch == 1 and monitor.wait == 0


def shown(fig) -> dict:  # type: ignore[no-untyped-def]
    """What a learning-curve figure shows: its title, each labelled line's data, the
    fit-call boundaries (x) and their labels, and the axes' texts."""
    ax = fig.axes[0]
    lines = [line for a in fig.axes for line in a.get_lines()]
    labelled = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in lines
        if not line.get_label().startswith("_")
    }
    bounds = [line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("_")]
    return {
        "title": ax.get_title(),
        "lines": labelled,
        "bounds": bounds,
        "texts": [text.get_text() for text in ax.texts],
    }


def pixels(path) -> np.ndarray:  # type: ignore[no-untyped-def]
    from matplotlib.image import imread

    return imread(path)


def test_plot_history_several_calls_no_validation_and_single_epoch(tmp_path, data, figures):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=3, validation_split=0.2)
    t.fit(x, y, epochs=2, validation_split=0.2)
    t.fit(x, y, epochs=2, validation_split=0.2, mode="warm")
    out = plot_history(t.history.records, t.ledger.records, tmp_path / "curves" / "a.png")
    assert out == tmp_path / "curves" / "a.png"
    assert out.read_bytes()[:8] == PNG
    assert pixels(out).shape == (550, 990, 4)  # 9 x 5 inches at 110 dpi, RGBA
    h = t.history.records
    best = min(h, key=lambda r: r["val_loss"])
    assert shown(figures[-1]) == {
        "title": "warmfit learning curves — 7 epochs, 3 fit calls",
        "lines": {
            "train loss": ([1, 2, 3, 4, 5, 6, 7], [r["loss"] for r in h]),
            "validation loss": ([1, 2, 3, 4, 5, 6, 7], [r["val_loss"] for r in h]),
            f"best val_loss = {best['val_loss']:.4g} (epoch {best['epoch']})": (
                [best["epoch"]],
                [best["val_loss"]],
            ),
            "learning rate (right axis)": ([1, 2, 3, 4, 5, 6, 7], [r["lr"] for r in h]),
        },
        "bounds": [0.5, 3.5, 5.5],  # half an epoch before each call's first epoch
        "texts": [" call 0: continue", " call 1: continue", " call 2: warm"],
    }

    no_val = plot_history(records(val=[None] * 8), [], tmp_path / "b.png")
    single = plot_history(records([0.7], [0.8]), [], tmp_path / "c.png", title="one epoch")
    empty = plot_history([], [], tmp_path / "d.png")
    for p in (no_val, single, empty):
        assert p.read_bytes()[:8] == PNG
        assert pixels(p).shape == (550, 990, 4)
    epochs = [1, 2, 3, 4, 5, 6, 7, 8]
    assert [shown(f) for f in figures[-3:]] == [
        {
            "title": "warmfit learning curves — 8 epochs, 1 fit call",
            "lines": {
                "train loss": (epochs, LOSS),
                "learning rate (right axis)": (epochs, [1e-2] * 8),
            },
            "bounds": [0.5],
            "texts": [" call 0: continue"],
        },
        {
            "title": "one epoch — 1 epoch, 1 fit call",
            "lines": {
                "train loss": ([1], [0.7]),
                "validation loss": ([1], [0.8]),
                "best val_loss = 0.8 (epoch 1)": ([1], [0.8]),
                "learning rate (right axis)": ([1], [1e-2]),
            },
            "bounds": [0.5],
            "texts": [" call 0: continue"],
        },
        {
            "title": "warmfit learning curves — 0 epochs, 0 fit calls",
            "lines": {},
            "bounds": [],
            "texts": ["no completed epoch yet"],
        },
    ]
    # the images show what differs: another history, other pixels
    assert not np.array_equal(pixels(no_val), pixels(single))
    assert not np.array_equal(pixels(single), pixels(empty))


def test_plot_history_bad_mode(tmp_path):
    with pytest.raises(ValueError) as e:
        plot_history(records(), [], tmp_path / "x.png", mode="lowest")
    assert str(e.value) == (
        "The 'mode' parameter of plot_history must be one of {'min', 'max'}. Got 'lowest' instead."
    )


def test_progress_disabled_is_silent():
    out = io.StringIO()  # not a terminal: quiet even when enabled
    for p in (Progress(False), Progress(True, stream=out)):
        assert not p.enabled
        with p:
            p.start_epoch(1, 3, 10, 0)
            for step in range(1, 11):
                p.advance(step, 0.5)
            p.end_epoch({"epoch": 1})
        assert p._progress is None
    assert out.getvalue() == ""


def test_progress_enabled_shows_epoch_step_loss_rate_eta():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=150, color_system=None)
    with Progress(True, console=console, refresh_per_second=1e9) as p:
        p.start_epoch(2, 4, 10, start_step=3)  # resumed mid-epoch: 3 steps already done
        for step in range(24, 31):
            p.advance(step, 0.25 if step == 24 else None)
        p.end_epoch({"epoch": 2})
    text = buf.getvalue()
    assert "epoch 2/4" in text and "10/10" in text and "step 30  loss 0.2500" in text
    assert "steps/s" in text and "ETA " in text


def test_warmfit_exports_nothing_new_that_breaks_import():
    """In a fresh process (the modules here are imported already), with every warning an
    error: warmfit, its check and spec modules import, and every name in ``__all__``."""
    code = (
        "import warmfit, warmfit.check, warmfit.spec\n"
        "missing = [n for n in warmfit.__all__ if not hasattr(warmfit, n)]\n"
        "assert not missing, missing\n"
        "print(len(warmfit.__all__))\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout) > 0 and done.stderr == ""
