"""The "how much more?" facts: :func:`warmfit.monitor.improvement` and its line.

Every slope is checked against NumPy's least squares (``np.polyfit(epochs, values, 1)``)
to a relative 1e-12 (the two sum in different orders), or exactly (``==``) where the
values are a straight line with differences exact in binary.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from conftest import make_data, make_trainer
from warmfit.monitor import (
    IMPROVEMENT_WINDOW,
    Improvement,
    OverfittingMonitor,
    improvement,
    improvement_line,
)

NAN, INF = float("nan"), float("inf")


def records(val, loss=None, key="val_loss", start=1):
    """History records like the loop's: epoch, segment, mode, step, loss, ``key``, lr.
    A ``None`` in ``val`` leaves ``key`` out of that epoch's record."""
    loss = loss or [1.0 / (i + 1) for i in range(len(val))]
    out = []
    for i, (v, lo) in enumerate(zip(val, loss, strict=True)):
        r = {"epoch": start + i, "segment": 0, "mode": "continue", "step": 10 * (i + 1),
             "loss": lo, "lr": 1e-2}  # fmt: skip
        if v is not None:
            r[key] = v
        out.append(r)
    return out


def lstsq_slope(epochs, values):
    return float(np.polyfit(np.asarray(epochs, float), np.asarray(values, float), 1)[0])


def test_a_straight_line_gives_its_slope_exactly():
    val = [4.0 - 0.25 * e for e in range(1, 9)]  # 3.75, 3.5, ..., 2.0: exact in binary
    facts = improvement(records(val))
    assert IMPROVEMENT_WINDOW == 5
    assert facts == Improvement(
        monitor="val_loss", mode="min", key="val_loss", window=5,
        epochs=(4, 5, 6, 7, 8), values=(3.0, 2.75, 2.5, 2.25, 2.0),
        slope=-0.25, relative_change=-1.0 / 3.0, best=2.0, best_epoch=8, last_epoch=8,
        epochs_since_best=0, nonfinite=0,
    )  # fmt: skip
    assert facts.trend == "improving" and not facts.from_training
    assert lstsq_slope(facts.epochs, facts.values) == pytest.approx(-0.25, rel=1e-12)
    assert facts.describe() == (
        "val_loss: slope -0.25/epoch over the last 5 epochs (-33.3%, improving), best 2 at "
        "epoch 8, 0 epochs since best"
    )
    assert improvement_line(records(val)) == facts.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.slope = 0.0  # type: ignore[misc]


def test_a_noisy_curve_matches_numpy_least_squares_and_the_line_is_exact():
    val = [1.0, 0.8, 0.61, 0.52, 0.47, 0.45, 0.44, 0.445, 0.43, 0.436]
    facts = improvement(records(val), window=6)
    assert facts.epochs == (5, 6, 7, 8, 9, 10)
    assert facts.values == (0.47, 0.45, 0.44, 0.445, 0.43, 0.436)
    ref = lstsq_slope(facts.epochs, facts.values)
    assert facts.slope == pytest.approx(ref, rel=1e-12)
    intercept = float(np.polyfit(facts.epochs, facts.values, 1)[1])
    start = intercept + ref * 5  # the fitted line at the window's first epoch
    assert facts.relative_change == pytest.approx(ref * 5 / start, rel=1e-12)
    assert (facts.best, facts.best_epoch, facts.epochs_since_best) == (0.43, 9, 1)
    assert facts.trend == "improving"
    assert facts.describe() == (
        f"val_loss: slope {facts.slope:+.3g}/epoch over the last 6 epochs "
        f"({100 * facts.relative_change:+.3g}%, improving), best 0.43 at epoch 9, "
        "1 epoch since best"
    )
    assert facts.describe() == (
        "val_loss: slope -0.00643/epoch over the last 6 epochs (-6.97%, improving), best "
        "0.43 at epoch 9, 1 epoch since best"
    )


def test_rising_validation_is_worsening_and_counts_the_epochs_since_best():
    val = [1.1, 0.9, 0.7, 0.65, 0.7, 0.75, 0.8, 0.9]  # best at epoch 4, then up
    facts = improvement(records(val))
    assert facts.slope == pytest.approx(lstsq_slope([4, 5, 6, 7, 8], val[3:]), rel=1e-12)
    assert improvement_line(records(val)) == (
        "val_loss: slope +0.06/epoch over the last 5 epochs (+37.5%, worsening), best 0.65 "
        "at epoch 4, 4 epochs since best"
    )


def test_fewer_epochs_than_the_window_use_what_there_is_and_say_how_many():
    facts = improvement(records([0.5, 0.25, 0.125]))
    assert facts.epochs == (1, 2, 3) and facts.window == 5
    assert facts.slope == -0.1875  # lstsq of (1, .5), (2, .25), (3, .125): exact in binary
    assert facts.slope == pytest.approx(lstsq_slope([1, 2, 3], [0.5, 0.25, 0.125]), rel=1e-12)
    # the fitted line: 0.875/3 (the mean, at epoch 2) + 0.1875 at epoch 1, -0.375 by epoch 3
    assert facts.relative_change == pytest.approx(-0.375 / (0.875 / 3 + 0.1875), rel=1e-12)
    assert facts.describe() == (
        "val_loss: slope -0.188/epoch over the last 3 epochs (-78.3%, improving), best 0.125 "
        "at epoch 3, 0 epochs since best"
    )


def test_a_single_epoch_has_no_slope_and_says_so():
    facts = improvement(records([0.7]))
    assert (facts.slope, facts.relative_change, facts.trend) == (None, None, None)
    assert (
        facts.describe()
        == "val_loss: no slope from 1 epoch, best 0.7 at epoch 1, 0 epochs since best"
    )


def test_mode_max_improving_means_increasing():
    acc = [0.5, 0.625, 0.75, 0.875, 0.875, 0.9375]
    facts = improvement(records(acc, key="val_accuracy"), "val_accuracy", "max")
    assert facts.epochs == (2, 3, 4, 5, 6)
    assert facts.slope == pytest.approx(lstsq_slope(facts.epochs, facts.values), rel=1e-12)
    assert facts.slope > 0 and facts.trend == "improving"
    assert (facts.best, facts.best_epoch) == (0.9375, 6)
    # ties: the earliest epoch is the best (as History.best and the monitor)
    tied = improvement(records([0.5, 0.875, 0.875, 0.75], key="val_accuracy"), "val_accuracy",
                       "max")  # fmt: skip
    assert (tied.best_epoch, tied.epochs_since_best, tied.trend) == (2, 2, "improving")
    falling = improvement(records([0.9, 0.8, 0.7], key="val_accuracy"), "val_accuracy", "max")
    assert falling.trend == "worsening"
    assert improvement_line(
        records([0.9, 0.8, 0.7], key="val_accuracy"), "val_accuracy", "max"
    ) == (
        "val_accuracy: slope -0.1/epoch over the last 3 epochs (-22.2%, worsening), best 0.9 "
        "at epoch 1, 2 epochs since best"
    )
    flat = improvement(records([0.5, 0.5, 0.5]))
    assert (flat.slope, flat.relative_change, flat.trend) == (0.0, 0.0, "flat")


def test_nan_inf_and_epochs_without_the_value_are_skipped():
    val = [1.0, 0.75, None, 0.5, NAN, 0.375, INF, 0.25, None]
    facts = improvement(records(val))
    assert facts.epochs == (1, 2, 4, 6, 8) and facts.values == (1.0, 0.75, 0.5, 0.375, 0.25)
    assert facts.slope == pytest.approx(lstsq_slope(facts.epochs, facts.values), rel=1e-12)
    assert (facts.best, facts.best_epoch, facts.last_epoch) == (0.25, 8, 9)
    assert facts.epochs_since_best == 1 and facts.nonfinite == 2
    assert facts.describe() == (
        f"val_loss: slope {facts.slope:+.3g}/epoch over the last 5 epochs with a finite "
        f"val_loss (epochs 1-8, {100 * facts.relative_change:+.3g}%, improving), best 0.25 at "
        "epoch 8, 1 epoch since best; 2 epochs with a NaN or inf val_loss skipped"
    )
    # a contiguous window that ends before the last epoch is named too
    last_nan = improvement(records([1.0, 0.5, NAN]))
    assert last_nan.describe() == (
        "val_loss: slope -0.5/epoch over the last 2 epochs with a finite val_loss (epochs 1-2, "
        "-50%, improving), best 0.5 at epoch 2, 1 epoch since best; 1 epoch with a NaN or inf "
        "val_loss skipped"
    )
    # NaN and inf never become the best, in either mode
    assert improvement(records([NAN, 0.5, -INF]), mode="min").best == 0.5
    assert improvement(records([INF, 0.5, NAN]), mode="max").best == 0.5


def test_without_validation_the_training_loss_is_used_and_named():
    loss = [1.0, 0.75, 0.5, 0.25]
    facts = improvement(records([None] * 4, loss=loss))
    assert facts.key == "loss" and facts.from_training and facts.monitor == "val_loss"
    assert facts.slope == -0.25
    assert facts.describe() == (
        "no finite val_loss in the history; loss (training): slope -0.25/epoch over the last "
        "4 epochs (-75%, improving), best 0.25 at epoch 4, 0 epochs since best"
    )
    # only NaN validation values: the same, and nothing is made up from them
    nan_val = improvement(records([NAN] * 4, loss=loss))
    assert nan_val.key == "loss" and nan_val.describe() == facts.describe()
    # a monitor without a training counterpart, or none logged: say there is no value
    assert improvement_line(records([0.5, 0.4]), "f1") == "f1: no finite value in the history"
    none = records([None, None], loss=[NAN, NAN])
    assert improvement(none).key is None
    assert improvement_line(none) == "val_loss: no finite value in the history"
    nan_only = [{"epoch": 1, "val_loss": NAN}]
    assert improvement_line(nan_only) == (
        "val_loss: no finite value in the history; 1 epoch with a NaN or inf val_loss skipped"
    )
    # an empty history: nothing to say
    assert improvement_line([]) is None
    assert improvement([]).last_epoch is None


def test_bad_parameters_are_refused_with_the_one_template():
    with pytest.raises(ValueError) as e:
        improvement(records([1.0]), mode="lowest")
    assert str(e.value) == (
        "The 'mode' parameter of improvement must be one of {'min', 'max'}. Got 'lowest' instead."
    )
    with pytest.raises(ValueError) as e:
        improvement(records([1.0]), window=1)
    assert str(e.value) == (
        "The 'window' parameter of improvement must be an int >= 2. Got 1 instead."
    )


# -- the end of a real fit call -------------------------------------------------------------


def improvement_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(("val_loss:", "no finite"))]


def test_the_monitor_prints_the_line_at_the_end_of_every_verbose_fit_call(capsys, tmp_path):
    x, y = make_data(96)
    t = make_trainer(callbacks=[OverfittingMonitor()], verbose=1, run_dir=tmp_path / "run")
    t.fit(x, y, epochs=3, validation_split=0.25)
    out = capsys.readouterr().out.splitlines()
    summary = next(i for i, ln in enumerate(out) if ln.startswith("overfitting monitor: "))
    # Expected from the history by the documented rule, computed here with NumPy.
    hist = t.history.records
    epochs, vals = [r["epoch"] for r in hist], [r["val_loss"] for r in hist]
    assert epochs == [1, 2, 3]
    slope, intercept = np.polyfit(epochs, vals, 1)
    best = min(vals)
    line = out[summary + 1]  # right after the summary line
    facts = improvement(hist)
    assert facts.slope == pytest.approx(slope, rel=1e-12)
    assert facts.relative_change == pytest.approx(slope * 2 / abs(intercept + slope), rel=1e-12)
    trend = "improving" if facts.slope < 0 else "worsening"
    since = 3 - (vals.index(best) + 1)
    assert line == (
        f"val_loss: slope {facts.slope:+.3g}/epoch over the last 3 epochs "
        f"({100 * facts.relative_change:+.3g}%, {trend}), best {best:.4g} at epoch "
        f"{vals.index(best) + 1}, {since} epoch{'s' * (since != 1)} since best"
    )

    # a second call (warm): the window covers the run's history across segments
    t.fit(x, y, epochs=4, validation_split=0.25, mode="warm")
    lines = improvement_lines(capsys.readouterr().out)
    assert len(t.history.records) == 7
    assert lines == [improvement_line(t.history.records)]
    assert improvement(t.history.records).epochs == (3, 4, 5, 6, 7)
    # what `warmfit history RUN_DIR` reads: the run dir's history file gives the same line
    jsonl = (tmp_path / "run" / "history-run0.jsonl").read_text().splitlines()
    assert improvement_line([json.loads(ln) for ln in jsonl]) == lines[0]

    # a quiet call prints nothing
    t.fit(x, y, epochs=1, validation_split=0.25, verbose=0)
    assert capsys.readouterr().out == ""
    quiet = make_trainer(callbacks=[OverfittingMonitor(verbose=False)], verbose=1)
    quiet.fit(x, y, epochs=2, validation_split=0.25)
    assert improvement_lines(capsys.readouterr().out) == []


def test_a_fit_without_validation_reports_the_training_loss(capsys):
    x, y = make_data(64)
    t = make_trainer(callbacks=[OverfittingMonitor()], verbose=1)
    t.fit(x, y, epochs=2)
    losses = [r["loss"] for r in t.history.records]
    assert all(math.isfinite(v) for v in losses) and "val_loss" not in t.history.records[0]
    slope = losses[1] - losses[0]  # two points: the least-squares line goes through both
    assert improvement(t.history.records).slope == pytest.approx(slope, rel=1e-12)
    best = min(losses)
    since = 2 - (losses.index(best) + 1)
    assert improvement_lines(capsys.readouterr().out) == [
        f"no finite val_loss in the history; loss (training): slope {slope:+.3g}/epoch over "
        f"the last 2 epochs ({100 * slope / abs(losses[0]):+.3g}%, "
        f"{'improving' if slope < 0 else 'worsening'}), best {best:.4g} at epoch "
        f"{losses.index(best) + 1}, {since} epoch{'s' * (since != 1)} since best"
    ]
