"""Continuing past the plan (issue 20): schedules whose horizon is the plan's end and
are re-planned by a later call, the policies past a fixed horizon, WSD with an explicit
cooldown — each learning rate checked against a formula written here, and resumes of a
re-planned call exact, bit for bit, in a new process.

The reference run: 200 rows in batches of 16, so 13 steps an epoch."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import warmfit
from conftest import LONG, make_data, make_trainer, require, trainer_settings
from test_requeue import SignalAt
from warmfit import schedules
from warmfit.check import compare_states
from warmfit.checkpoint import read_checkpoint

TESTS = Path(__file__).resolve().parent
SPE = 13  # steps an epoch
LR, MIN = 1e-2, 1e-3
CALLS: dict[str, dict[str, Any]] = {"first": {"epochs": 3}, "second": {"epochs": 2}}


class Rates(warmfit.Callback):
    """The learning rate of every step, by global step (counted from 0)."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_step_end(self, trainer: warmfit.Trainer, logs: warmfit.StepLogs) -> None:
        self.rates[logs.step - 1] = logs.lr


def cos(hi: float, lo: float, t: float) -> float:
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * t))


def plan_trainer(**kwargs: Any) -> warmfit.Trainer:
    settings: dict[str, Any] = dict(schedule=schedules.cosine(LR, "plan", min_lr=MIN))
    return make_trainer(**{**settings, **kwargs})


def rates_of(t: warmfit.Trainer) -> dict[int, float]:
    return next(cb for cb in t.callbacks if isinstance(cb, Rates)).rates


def replans(t: warmfit.Trainer) -> list[Any]:
    return [r.get("changes", {}).get("schedule", {}).get("replan") for r in t.ledger.records]


def test_cosine_to_the_plan_goes_on_from_the_current_rate_to_the_new_end():
    x, y = make_data(200)
    t = plan_trainer(callbacks=[Rates()])
    t.fit(x, y, epochs=3)
    t.fit(x, y, epochs=2)
    rates = rates_of(t)
    first = [cos(LR, MIN, k / 39) for k in range(39)]
    anchor = first[-1]  # the rate of step 38, the first call's last
    second = [cos(anchor, MIN, (k - 38) / (65 - 38)) for k in range(39, 65)]
    assert [rates[k] for k in range(65)] == first + second
    # Continuous: the second call's first rate lies between the first call's last two
    # rates' end and the end value; the plan ends at min_lr at epoch 5.
    assert MIN < rates[39] < rates[38] < rates[37]
    assert t.state.lr_at(65) == MIN and t.history.records[-1]["lr"] == rates[64]
    assert replans(t) == [
        [{"kind": "plan", "at_step": 0, "end_step": 39}],
        [{"kind": "extend", "at_step": 39, "end_step": 65}],
    ]


def test_the_ledger_table_shows_each_move_of_the_plan():
    x, y = make_data(200)
    t = plan_trainer()
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=1)
    t.fit(x, y, steps=5, cooldown=True)
    t.fit(x, y, epochs=1, mode="warm", schedule=schedules.cosine(LR, 13, past_horizon="rewarm"))
    t.fit(x, y, epochs=2)
    changes = [line[line.index("loss=") :].split("  ", 1)[-1].strip() if "loss=" in line
               else line.split("0.00", 1)[-1].strip()
               for line in t.ledger.table().splitlines()[1:]]  # fmt: skip
    assert changes == [
        "planned to step 13",
        "re-planned to step 26",
        "cooldown to step 31",
        "new schedule",
        "rewarm from step 44",  # the warm call set the origin at 31: 31 + 13
    ]


def test_split_calls_replan_and_one_call_plans_once_the_exception_to_e1():
    """``fit(3) + fit(2)`` re-plans at the boundary; ``fit(5)`` plans once: their rates
    (and so their weights) differ, by design. With a fixed horizon both are one run."""
    x, y = make_data(200)
    split, straight = plan_trainer(callbacks=[Rates()]), plan_trainer(callbacks=[Rates()])
    split.fit(x, y, epochs=3)
    split.fit(x, y, epochs=2)
    straight.fit(x, y, epochs=5)
    assert rates_of(straight) == {k: cos(LR, MIN, k / 65) for k in range(65)}
    assert rates_of(split)[0] == rates_of(straight)[0]
    assert all(rates_of(split)[k] != rates_of(straight)[k] for k in range(1, 65))
    assert compare_states(split.state_dict(), straight.state_dict()) != []

    fixed = {"schedule": schedules.cosine(LR, 65, min_lr=MIN)}
    split, straight = make_trainer(**fixed), make_trainer(**fixed)
    split.fit(x, y, epochs=3)
    split.fit(x, y, epochs=2)
    straight.fit(x, y, epochs=5)
    assert compare_states(split.state_dict(), straight.state_dict()) == []


def _worker(run_dir: Path, *phases: str, signal_at: int | None = None, out: Path | None = None):
    args = [sys.executable, str(TESTS / "_horizon_worker.py"), str(run_dir), *phases]
    args += ["--signal-at", str(signal_at)] if signal_at else []
    args += ["--out", str(out)] if out else []
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(args, env=env, text=True, capture_output=True, timeout=300)


def test_a_replanned_call_interrupted_mid_epoch_resumes_in_a_new_process_exactly(tmp_path):
    """The second call (which re-planned) is stopped by SIGTERM at step 45, inside epoch
    4; the same call in a new process finishes it == the calls uninterrupted, bit for bit
    — and the requeue does not re-plan."""
    x, y = make_data(200)
    straight = plan_trainer(model=SignalAt)
    for phase in ("first", "second"):
        straight.fit(x, y, **CALLS[phase])
    stopped = _worker(tmp_path / "run", "first", "second", signal_at=45)
    assert stopped.returncode != 0 and "global step 45" in stopped.stderr, stopped.stderr
    done = _worker(tmp_path / "run", "second", out=tmp_path / "final")
    assert done.returncode == 0, done.stderr
    tensors, state = read_checkpoint(tmp_path / "final")
    resumed = {"tensors": tensors, "state": state}
    reference = straight.state_dict()
    assert compare_states(reference, resumed) == []
    assert state["history"] == reference["state"]["history"]
    assert state["schedule"]["plan"] == reference["state"]["schedule"]["plan"] == [
        {"at": 0, "end": 39, "kind": "plan"},
        {"at": 39, "end": 65, "kind": "extend"},
    ]
    rows = state["ledger"]
    assert rows[-1]["resumes_call"] == 1 and "schedule" not in rows[-1]["changes"]


def test_the_same_call_again_does_not_replan_and_another_call_does():
    x, y = make_data(200)
    t = plan_trainer(model=lambda: SignalAt(45))
    t.fit(x, y, epochs=3)
    with pytest.raises(warmfit.TrainingInterrupted):
        t.fit(x, y, epochs=2)
    plan = t.state.plan
    t.fit(x, y, epochs=2)  # the requeue: ends at epoch 5, as planned
    assert t.state.plan == plan and t.epoch == 5 and replans(t)[-1] is None
    t.fit(x, y, epochs=1)  # a new call further on re-plans
    assert replans(t)[-1] == [{"kind": "extend", "at_step": 65, "end_step": 78}]


def fixed_cosine_reference(policy: str, k: int) -> float:
    """Steps of cosine(LR, horizon=26, min_lr=MIN), trained for 2 epochs then 3 more."""
    if k < 26:
        return cos(LR, MIN, k / 26)
    if policy == "hold":
        return MIN
    if policy == "extend":  # from the rate of step 25 to MIN at step 65
        return cos(cos(LR, MIN, 25 / 26), MIN, (k - 25) / (65 - 25))
    return cos(LR, MIN, ((k - 26) % 26) / 26)  # rewarm: the schedule again from step 26


@pytest.mark.parametrize("policy", ["hold", "extend", "rewarm"])
@pytest.mark.parametrize("where", ["call", "schedule"])
def test_policies_past_a_fixed_horizon_follow_their_formula(policy, where):
    x, y = make_data(200)
    own = policy if where == "schedule" else None
    t = make_trainer(
        schedule=schedules.cosine(LR, 26, min_lr=MIN, past_horizon=own), callbacks=[Rates()]
    )
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=3, **({"past_horizon": policy} if where == "call" else {}))
    assert rates_of(t) == {k: fixed_cosine_reference(policy, k) for k in range(65)}
    expected = {
        "hold": None,
        "extend": [{"kind": "extend", "at_step": 26, "end_step": 65}],
        "rewarm": [{"kind": "rewarm", "at_step": 26, "end_step": 65}],
    }[policy]
    if expected is not None and where == "call":
        expected = [{**expected[0], "policy": policy}]
    assert replans(t) == [None, expected]


def test_extend_inside_the_horizon_stretches_the_rest_of_the_decay():
    """A call that starts before a fixed horizon and ends past it: the decay from the
    rate it has now is stretched to the call's end."""
    x, y = make_data(200)
    t = make_trainer(schedule=schedules.cosine(LR, 26, min_lr=MIN), callbacks=[Rates()])
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=3, past_horizon="extend")
    anchor = cos(LR, MIN, 12 / 26)
    expected = [cos(LR, MIN, k / 26) for k in range(13)]
    expected += [cos(anchor, MIN, (k - 12) / (52 - 12)) for k in range(13, 52)]
    assert [rates_of(t)[k] for k in range(52)] == expected
    # A call that stays inside the horizon moves nothing.
    t2 = make_trainer(schedule=schedules.cosine(LR, 26, past_horizon="extend"))
    t2.fit(x, y, epochs=1)
    t2.fit(x, y, epochs=1)
    assert replans(t2) == [None, None]


def test_wsd_is_stable_as_long_as_the_plan_and_cools_down_over_the_asked_steps():
    x, y = make_data(200)
    t = make_trainer(schedule=schedules.wsd(LR, warmup=5), callbacks=[Rates()])
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=1)  # the plan moves on: still stable
    t.fit(x, y, steps=10, cooldown=True)
    rates = rates_of(t)
    warm = [LR * k / 5 for k in range(5)]
    assert [rates[k] for k in range(39)] == warm + [LR] * 34
    # From the rate of step 38 (LR) to 0 at step 49, linearly, over exactly 10 steps.
    assert [rates[k] for k in range(39, 49)] == [0.0 + LR * (1 - (k - 38) / 11) for k in
                                                 range(39, 49)]  # fmt: skip
    assert t.state.lr_at(49) == 0.0
    assert replans(t)[-1] == [{"kind": "cooldown", "at_step": 39, "end_step": 49}]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_wsd_cooldown_in_a_fork_leaves_the_parent_byte_for_byte_and_equals_it_in_a_copy(
    tmp_path,
):
    """The WSD workflow: the stable run keeps going while a fork from the end of its
    stable phase cools down. The parent's run dir is byte-identical before and after;
    the fork's cooldown is the same cooldown in a byte copy of the parent, bit for bit."""
    x, y = make_data(200)
    settings: dict[str, Any] = dict(schedule=schedules.wsd(LR, warmup=5), callbacks=[Rates()])
    with make_trainer(run_dir=tmp_path / "stable", **settings) as stable:
        stable.fit(x, y, epochs=2)
    shutil.copytree(tmp_path / "stable", tmp_path / "copy")
    before = digest(tmp_path / "stable")
    fork = warmfit.Trainer.fork_from(tmp_path / "stable", tmp_path / "cooldown", SignalAt,
                                     **{**trainer_settings(), **settings, "callbacks": [Rates()]})  # fmt: skip
    copy = make_trainer(model=SignalAt, run_dir=tmp_path / "copy", **{**settings,
                        "callbacks": [Rates()]})  # fmt: skip
    for t in (fork, copy):
        t.fit(x, y, steps=10, cooldown=True)
    assert compare_states(copy.state_dict(), fork.state_dict()) == []
    assert copy.state_dict()["state"]["history"] == fork.state_dict()["state"]["history"]
    assert rates_of(fork) == rates_of(copy) == {
        k: LR * (1 - (k - 25) / 11) for k in range(26, 36)
    }
    assert fork.ledger[-2]["parent"]["step"] == 26 and replans(fork)[-1] == [
        {"kind": "cooldown", "at_step": 26, "end_step": 36}
    ]
    assert digest(tmp_path / "stable") == before
    for t in (fork, copy):
        t.close()
    # The stable run goes on, its rate untouched by the fork's cooldown.
    with make_trainer(run_dir=tmp_path / "stable", **{**settings, "callbacks": [Rates()]}) as go:
        go.fit(x, y, epochs=1)
        assert set(rates_of(go).values()) == {LR}


def test_a_warm_call_with_a_validation_split_plans_to_the_step_the_loop_ends_at():
    """The plan's end of an epoch target is worked out from the rows the call trains on
    and whether they are the previous call's (a warm call then finishes the epoch)."""
    x, y = make_data(100)
    t = make_trainer(batch_size=8, schedule=None)
    t.fit(x, y, steps=3, validation_split=0.2)
    t.fit(x, y, epochs=1, mode="warm", validation_split=0.2,
          schedule=schedules.cosine(LR, "plan", min_lr=MIN))  # fmt: skip
    assert t.global_step == 10  # the rest of the epoch: 80 training rows, batches of 8
    assert replans(t)[-1] == [{"kind": "plan", "at_step": 3, "end_step": 10}]
    assert t.state.lr_at(10) == MIN


def test_rewarm_cycles_the_schedule_itself_not_a_shifted_wait_nor_a_replan():
    x, y = make_data(200)
    shifted = schedules.shifted(schedules.cosine(LR, 13, min_lr=MIN, past_horizon="rewarm"), 13)
    t = make_trainer(schedule=shifted, callbacks=[Rates()])
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=2)  # past the horizon (26): cycles of the cosine's 13 steps
    assert [rates_of(t)[k] for k in range(26, 52)] == [
        cos(LR, MIN, ((k - 26) % 13) / 13) for k in range(26, 52)
    ]
    # After an extend, a rewarm cycles the fixed horizon, not the stretched re-plan.
    t = make_trainer(schedule=schedules.cosine(LR, 26, min_lr=MIN), callbacks=[Rates()])
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=2, past_horizon="extend")
    t.fit(x, y, epochs=2, past_horizon="rewarm")
    assert replans(t)[-1] == [
        {"kind": "rewarm", "at_step": 39, "end_step": 65, "policy": "rewarm"}
    ]
    assert [rates_of(t)[k] for k in range(39, 65)] == [
        cos(LR, MIN, ((k - 39) % 26) / 26) for k in range(39, 65)
    ]


def test_after_a_rewarm_hold_and_extend_are_refused_and_rewarm_again_is_a_no_op():
    x, y = make_data(200)
    t = make_trainer(schedule=schedules.cosine(LR, 13, past_horizon="rewarm"))
    t.fit(x, y, epochs=2)
    with pytest.raises(ValueError) as err:
        t.fit(x, y, epochs=1, past_horizon="hold")
    assert str(err.value) == (
        "past_horizon='hold' after the schedule was rewarmed: it cycles since its step 13 "
        "and has no horizon left to hold or extend. Pass schedule=... with a new schedule "
        "(mode='warm' starts it at 0), or leave past_horizon out."
    )
    t.fit(x, y, epochs=1, past_horizon="rewarm")
    assert replans(t)[-1] is None and len(t.ledger) == 2


def test_wsd_whose_new_plan_would_decay_from_before_the_call_decays_from_its_anchor():
    """A call stopped early (here a signal at step 20 of a plan to 52) and a shorter
    call after it: the new plan's decay window (13 steps before 30) began before the
    call; the decay starts at the rate of step 19, without a jump."""
    x, y = make_data(200)
    t = make_trainer(model=lambda: SignalAt(20), callbacks=[Rates()],
                     schedule=schedules.wsd(LR, decay=13))  # fmt: skip
    with pytest.raises(warmfit.TrainingInterrupted):
        t.fit(x, y, epochs=4)
    with pytest.warns(UserWarning, match="stays unfinished"):
        t.fit(x, y, steps=10)
    rates = rates_of(t)
    assert [rates[k] for k in range(20)] == [LR] * 20
    assert [rates[k] for k in range(20, 30)] == [0.0 + LR * (1 - (k - 19) / 11) for k in
                                                 range(20, 30)]  # fmt: skip


def test_wsd_with_a_decay_at_the_plans_end_goes_on_from_the_decay_when_extended():
    x, y = make_data(200)
    t = make_trainer(schedule=schedules.wsd(LR, warmup=3, decay=4), callbacks=[Rates()])
    t.fit(x, y, steps=20)
    t.fit(x, y, steps=10)
    rates = rates_of(t)
    first = [LR * k / 3 for k in range(3)] + [LR] * 13
    first += [0.0 + LR * (1 - (k - 16) / 4) for k in range(16, 20)]
    anchor = first[-1]
    second = [0.0 + anchor * (1 - (k - 19) / 11) for k in range(20, 30)]
    assert [rates[k] for k in range(30)] == first + second


def test_warmup_then_cosine_to_the_plan_replans_the_cosine():
    x, y = make_data(200)
    sched = schedules.warmup(5, schedules.cosine(LR, "plan", min_lr=MIN))
    t = make_trainer(schedule=sched, callbacks=[Rates()])
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=1)
    rates = rates_of(t)
    peak = cos(LR, MIN, 0)  # the warm-up rises to the cosine's first rate
    first = [peak * (k / 5) for k in range(5)] + [cos(LR, MIN, (k - 5) / 8) for k in range(5, 13)]
    second = [cos(first[-1], MIN, (k - 12) / 14) for k in range(13, 26)]
    assert [rates[k] for k in range(26)] == first + second


def test_warm_starts_a_new_plan_and_restart_too():
    x, y = make_data(200)
    t = plan_trainer(callbacks=[Rates()])
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=1, mode="warm")
    assert [rates_of(t)[k] for k in range(13, 26)] == [cos(LR, MIN, k / 13) for k in range(13)]
    assert t.state.plan.to_list() == [{"at": 0, "end": 13, "kind": "plan"}]
    t.fit(x, y, epochs=2, mode="restart")
    assert t.state.plan.to_list() == [{"at": 0, "end": 26, "kind": "plan"}]


NO_END = (
    "{asked} needs a schedule that ends: a warmfit schedule with a horizon "
    "(schedules.cosine, linear or wsd, alone or after a warmup). The schedule in effect "
    "is {schedule}. Pass schedule=... with one, or leave these out."
)


@pytest.mark.parametrize(
    "schedule, fit, message",
    [
        (None, {"past_horizon": "extend"}, NO_END.format(
            asked="past_horizon='extend'", schedule="none (the optimizer's own learning rate)")),
        (schedules.constant(0.1), {"cooldown": True}, NO_END.format(
            asked="cooldown=True", schedule="Constant(lr=0.1)")),
        (schedules.cosine(0.1, 10, cyclic=True), {"past_horizon": "rewarm"},
         "past_horizon='rewarm' does not apply to a cyclic schedule (it restarts every "
         "horizon and never goes past it). Pass a schedule with cyclic=False."),
        (schedules.cosine(0.1, 10), {"past_horizon": "later"},
         "The 'past_horizon' parameter of Trainer.fit must be one of {'hold', 'extend', "
         "'rewarm'}. Got 'later' instead."),
    ],
    ids=["no-schedule", "constant", "cyclic", "unknown"],
)  # fmt: skip
def test_policies_and_cooldown_are_refused_where_they_mean_nothing(schedule, fit, message):
    x, y = make_data(200)
    t = make_trainer(schedule=schedule)
    t.fit(x, y, epochs=1)
    before = t.state_dict()
    with pytest.raises(ValueError) as err:
        t.fit(x, y, epochs=1, **fit)
    assert str(err.value) == message
    assert compare_states(before, t.state_dict()) == [] and len(t.ledger) == 1


def test_cooldown_after_a_rewarm_is_refused_before_anything_changes():
    x, y = make_data(200)
    t = make_trainer(schedule=schedules.cosine(LR, 13, past_horizon="rewarm"))
    t.fit(x, y, epochs=2)
    with pytest.raises(ValueError, match=r"^cooldown=True after the schedule was rewarmed"):
        t.fit(x, y, steps=5, cooldown=True)
    assert len(t.ledger) == 1


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: schedules.cosine(0.1, "plan", cyclic=True),
         "A cyclic Cosine restarts every horizon steps: it needs a fixed horizon and no "
         "past_horizon policy. Pass cyclic=False, or a horizon in steps."),
        (lambda: schedules.cosine(0.1, "end"),
         "The 'horizon' parameter of Cosine must be an int >= 1 or 'plan'. Got 'end' instead."),
        (lambda: schedules.linear(0.1, 10, past_horizon="grow"),
         "The 'past_horizon' parameter of Linear must be one of {'hold', 'extend', "
         "'rewarm'}. Got 'grow' instead."),
        (lambda: schedules.wsd(0.1, decay=1.5),
         "The 'decay' parameter of WSD must be an int >= 1 (steps), a float in (0, 1) or "
         "None. Got 1.5 instead."),
        (lambda: schedules.sequential([schedules.linear(0.1, "plan"), schedules.constant(0.1)],
                                      [10]),
         "Only the last schedule of a Sequential may end with the plan (horizon='plan'): "
         "the others end at their boundary. Give them a horizon in steps."),
        (lambda: schedules.cosine(0.1, "plan")(3),
         "Cosine(lr=0.1, horizon='plan', min_lr=0.0, cyclic=False, past_horizon=None) ends "
         "where the fit call in progress ends: it is evaluated under a fit call's plan. To "
         "evaluate it elsewhere, plan it: schedule.planned(end)(step)."),
    ],
    ids=["cyclic-plan", "horizon", "policy", "wsd-decay", "sequential", "unplanned"],
)  # fmt: skip
def test_plan_schedules_refuse_what_they_cannot_mean(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message


def test_thousands_of_replans_evaluate_in_order_without_recursion():
    """A run of 3,000 fit calls that each moved the plan: every anchor is the rate of
    the step before its move, worked out in order (a recursive evaluation hit Python's
    recursion limit)."""
    from warmfit.horizons import Move, Plan
    from warmfit.schedules import Planned

    moves = [Move(0, 10, "plan")] + [Move(10 * i, 10 * i + 10, "extend") for i in range(1, 3000)]
    planned = Planned(schedules.linear(1.0, "plan"), Plan(tuple(moves)))
    value = 0.0 + (1.0 - 0.0) * (1.0 - 9 / 10)  # step 9, the first plan's last step
    for i in range(1, 3000):  # each move: from the step before it to 0 at its end
        anchor = 10 * i - 1
        value = 0.0 + (value - 0.0) * (1.0 - (10 * i + 9 - anchor) / (10 * i + 10 - anchor))
    assert planned(29_999) == value and planned(30_000) == 0.0


def test_plan_schedules_round_trip_through_their_config():
    for s in (
        schedules.cosine(0.1, "plan", min_lr=0.01),
        schedules.linear(0.1, 40, end_lr=0.01, past_horizon="extend"),
        schedules.wsd(0.1, warmup=3, decay=0.2, decay_to=0.001, shape="sqrt"),
        schedules.warmup(4, schedules.cosine(0.1, "plan", past_horizon="rewarm")),
    ):
        again = schedules.from_config(s.config())
        assert again == s and [again.planned(50)(k) for k in range(60)] == [
            s.planned(50)(k) for k in range(60)
        ]
    # A fixed cosine's config is the same as before the policies existed.
    assert schedules.cosine(0.1, 10).config() == {
        "kind": "Cosine", "lr": 0.1, "horizon": 10, "min_lr": 0.0, "cyclic": False,
    }  # fmt: skip


# -- the other backends: wherever a learning rate exists --------------------------------
def test_keras_replans_like_torch():
    keras = require("keras", reason="keras 3 is not installed")
    from test_keras import make_keras_trainer

    x, y = make_data(200)
    t = make_keras_trainer(schedule=schedules.cosine(LR, "plan", min_lr=MIN))
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=1)
    anchor = cos(LR, MIN, 25 / 26)
    expected = [cos(LR, MIN, 12 / 26), cos(LR, MIN, 25 / 26), cos(anchor, MIN, 13 / 14)]
    assert [r["lr"] for r in t.history.records] == expected
    assert np.float32(t.learning_rate) == np.float32(expected[-1])
    assert replans(t)[-1] == [{"kind": "extend", "at_step": 26, "end_step": 39}]
    assert isinstance(t.model, keras.Model)


def test_a_dataset_read_by_dataloader_workers_plans_to_the_steps_its_loader_gives():
    """A map-style Dataset (augmenting with every global stream) read by 2 workers: the
    plan ends where the loader's epochs end (120 rows, batches of 16: 8 steps), and the
    run is the same bits as with no workers."""
    from test_dataset_workers import Augmenting

    runs = []
    for workers in (2, 0):
        t = plan_trainer(model=SignalAt, num_workers=workers, callbacks=[Rates()])
        t.fit(Augmenting(), epochs=1)
        t.fit(Augmenting(), epochs=1)
        runs.append(t)
    anchor = cos(LR, MIN, 7 / 8)
    expected = [cos(LR, MIN, k / 8) for k in range(8)]
    expected += [cos(anchor, MIN, (k - 7) / (16 - 7)) for k in range(8, 16)]
    assert [rates_of(runs[0])[k] for k in range(16)] == expected
    assert replans(runs[0]) == [
        [{"kind": "plan", "at_step": 0, "end_step": 8}],
        [{"kind": "extend", "at_step": 8, "end_step": 16}],
    ]
    assert compare_states(runs[0].state_dict(), runs[1].state_dict()) == []


def test_sklearn_replans_like_torch():
    from sklearn.linear_model import SGDClassifier

    x, y = make_data(200)
    t = warmfit.Trainer(
        SGDClassifier(learning_rate="constant", eta0=LR, random_state=0),
        schedule=schedules.cosine(LR, "plan", min_lr=MIN), batch_size=16, verbose=0,
    )  # fmt: skip
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=1)
    anchor = cos(LR, MIN, 25 / 26)
    expected = [cos(LR, MIN, 12 / 26), anchor, cos(anchor, MIN, 13 / 14)]
    assert [r["lr"] for r in t.history.records] == expected
    assert replans(t)[-1] == [{"kind": "extend", "at_step": 26, "end_step": 39}]


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_boosting_replans_rounds_and_grows_the_trees_of_that_schedule(library):
    """3 + 2 rounds under cosine(horizon='plan') grow the very trees of 5 rounds whose
    learning rates are the re-planned formula, given as a plain function."""
    require(library, reason=f"{library} is not installed")
    from test_boosting import MODELS, data

    name = "XGBoost-native-regression" if library == "xgboost" else "LightGBM-native-regression"
    x, _, target = data()
    top, low = 0.3, 0.05

    def reference(k: int) -> float:
        return cos(top, low, k / 3) if k < 3 else cos(cos(top, low, 2 / 3), low, (k - 2) / 3)

    split = warmfit.Trainer(MODELS[name](), schedule=schedules.cosine(top, "plan", min_lr=low),
                            seed=5, verbose=0)  # fmt: skip
    split.fit(x, target, rounds=3)
    split.fit(x, target, rounds=2)
    by_function = warmfit.Trainer(MODELS[name](), schedule=reference, seed=5, verbose=0)
    by_function.fit(x, target, rounds=5)
    assert [r["lr"] for r in split.history.records] == [reference(k) for k in range(5)]
    assert np.array_equal(split.predict(x), by_function.predict(x))
    assert replans(split)[-1] == [{"kind": "extend", "at_step": 3, "end_step": 5}]


# -- the command line -------------------------------------------------------------------
def test_warmfit_train_cooldown_and_history_show_the_plan_and_the_facts(tmp_path, capsys):
    """`warmfit train --cooldown` cools a WSD run down over the call's steps; `warmfit
    history` prints the facts of the last epochs ("how much more?")."""
    from test_cli import tiny_spec
    from warmfit.cli import main
    from warmfit.monitor import improvement_line

    spec = tiny_spec(tmp_path, "")
    module = next(tmp_path.glob("tiny_*.py"))
    module.write_text(module.read_text() + (
        "\n\ndef wsd():\n    from warmfit import schedules\n\n"
        "    return schedules.wsd(0.01, warmup=2)\n"
    ))  # fmt: skip
    spec.write_text(spec.read_text() + f'schedule = "{module.stem}:wsd"\n')
    run = tmp_path / "run"
    assert main(["train", str(spec), "--run-dir", str(run)]) == 0  # 2 epochs of 3 steps
    assert main(["train", str(spec), "--run-dir", str(run), "--steps", "3", "--cooldown"]) == 0
    assert main(["train", str(spec), "--run-dir", str(run), "--epochs", "1",
                 "--past-horizon", "rewarm"]) == 1  # fmt: skip
    assert capsys.readouterr().err.startswith(
        "warmfit train: past_horizon='rewarm' does not apply to a WSD schedule: its stable "
    )
    _, state = read_checkpoint(warmfit.rundir.RunDir(run).latest())
    assert state["ledger"][1]["changes"]["schedule"]["replan"] == [
        {"kind": "cooldown", "at_step": 6, "end_step": 9}
    ]
    assert [r["lr"] for r in state["history"]] == [0.01, 0.01, 0.01 * (1 - 3 / 4)]
    capsys.readouterr()
    assert main(["history", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert improvement_line(state["history"]) in out


# -- property: the plan survives a process restart between any two calls ------------------
PLAN_SCHEDULES = {
    "cosine-plan": lambda: schedules.cosine(LR, "plan", min_lr=MIN),
    "warmup-cosine-plan": lambda: schedules.warmup(3, schedules.cosine(LR, "plan", min_lr=MIN)),
    "linear-extend": lambda: schedules.linear(LR, 10, end_lr=MIN, past_horizon="extend"),
    "cosine-rewarm": lambda: schedules.cosine(LR, 7, min_lr=MIN, past_horizon="rewarm"),
    "wsd": lambda: schedules.wsd(LR, warmup=2, decay=3),
}
CALL = st.one_of(
    st.builds(lambda k: {"epochs": k}, st.integers(1, 2)),
    st.builds(lambda k, c: {"steps": k, "cooldown": c}, st.integers(1, 9), st.booleans()),
    st.builds(lambda k: {"epochs": k, "mode": "warm"}, st.integers(1, 2)),
)


@settings(max_examples=300 if LONG else 40, deadline=None,
          database=None, derandomize=not LONG)  # fmt: skip
@given(name=st.sampled_from(sorted(PLAN_SCHEDULES)), calls=st.lists(CALL, min_size=1, max_size=4))
def test_any_calls_through_a_checkpoint_between_each_equal_the_calls_in_one_process(name, calls):
    """Random fit calls (epochs, steps, cooldowns, warm calls) under each kind of plan:
    a new Trainer loading the state before every call trains the very same bits, plans
    the same moves and records the same ledger as one Trainer making all the calls."""
    x, y = make_data(64)

    def build() -> warmfit.Trainer:
        return make_trainer(schedule=PLAN_SCHEDULES[name]())

    one, state = build(), None
    for call in calls:
        if "cooldown" in call and name == "cosine-rewarm":
            call = {"steps": call["steps"]}  # a cooldown after a rewarm is refused (tested)
        one.fit(x, y, **call)
        again = build()
        if state is not None:
            again.load_state_dict(state)
        again.fit(x, y, **call)
        state = again.state_dict()
        assert compare_states(one.state_dict(), state) == []
        assert state["state"]["schedule"]["plan"] == one.state_dict()["state"]["schedule"]["plan"]
        assert replans(again) == replans(one)
