"""Schedules that decay to an end value at a horizon a plan may move: cosine, linear and
warmup-stable-decay (WSD).

Each is a pure function of the step and of its :class:`~warmfit.horizons.Plan`: its
horizon is a number of steps or ``"plan"`` (the end of the fit call in progress), and a
later call that ends elsewhere re-plans the rest from the current rate in the schedule's
own shape (:func:`warmfit.horizons.through_moves`). Built through :mod:`warmfit.schedules`
(``schedules.cosine``, ``linear``, ``wsd``), which holds every other schedule.

Owns: :class:`Cosine`, :class:`Linear`, :class:`WSD`. Does not own: the moves of a plan
(:mod:`warmfit.horizons`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import check_int, check_real, invalid_param
from .horizons import (
    POLICIES,
    SHAPES,
    Move,
    Plan,
    Schedule,
    check_step,
    set_field,
    through_moves,
)


def _check_horizon(schedule: Schedule, owner: str) -> None:
    """``horizon``: an int >= 1 or ``"plan"``; ``past_horizon``: a policy or None."""
    horizon = getattr(schedule, "horizon")  # noqa: B009 - every caller has one
    if horizon != "plan":
        try:
            set_field(schedule, "horizon", check_int("horizon", horizon, owner, minimum=1))
        except ValueError:
            raise invalid_param("horizon", owner, "an int >= 1 or 'plan'", horizon) from None
    policy = getattr(schedule, "past_horizon")  # noqa: B009
    if policy is not None and policy not in POLICIES:
        raise invalid_param("past_horizon", owner, POLICIES, policy)


def _moves(schedule: Schedule, horizon: Any, plan: Plan) -> tuple[Move, ...]:
    """The moves a decaying schedule evaluates: its fixed ``horizon`` as the first plan (a
    move at step 0 replaces it), or the plan's, which a ``horizon="plan"`` needs."""
    moves = plan.shaped().moves
    if horizon == "plan":
        if not moves:
            raise ValueError(
                f"{schedule!r} ends where the fit call in progress ends: it is evaluated "
                "under a fit call's plan. To evaluate it elsewhere, plan it: "
                "schedule.planned(end)(step)."
            )
        return moves
    if moves and moves[0].at == 0:
        return moves
    return (Move(0, horizon, "plan"), *moves)


class _Decay(Schedule):
    """A schedule that decays from ``lr`` to an end value at its ``horizon`` (an int or
    ``"plan"``), in one shape; re-planned moves go on from the anchor in that shape."""

    lr: float
    horizon: Any
    past_horizon: str | None

    @property
    def end_value(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def shape(self, hi: float, lo: float, t: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _segment(
        self, step: int, move: Move, anchor: tuple[float, bool] | None
    ) -> tuple[float, bool]:
        """The rate of ``step`` under ``move``: a first plan decays from ``lr``; a later
        move from the rate at its anchor (the step before it); the end value from the
        move's end on."""
        if step >= move.end:
            return float(self.end_value), True
        if anchor is None:
            return float(self.shape(self.lr, self.end_value, step / move.end)), True
        a = move.at - 1
        return float(self.shape(anchor[0], self.end_value, (step - a) / (move.end - a))), True

    def at(self, step: int, plan: Plan) -> float:
        return through_moves(check_step(step), _moves(self, self.horizon, plan), self._segment)[0]

    def needs_plan(self) -> bool:
        return bool(self.horizon == "plan")

    def decays(self) -> bool:
        return True

    def horizon_steps(self, plan: Plan) -> int | None:
        return int(_moves(self, self.horizon, plan)[0].end)

    def past_horizon_policy(self, asked: str | None = None) -> str:
        return asked or self.past_horizon or ("extend" if self.horizon == "plan" else "hold")


@dataclass(frozen=True, repr=False)
class Cosine(_Decay):
    """Cosine decay from ``lr`` to ``min_lr`` over ``horizon`` steps (or to the plan's
    end: ``horizon="plan"``).

    Past the horizon it holds ``min_lr`` (``past_horizon="hold"``, the default for a
    fixed horizon) or follows its ``past_horizon`` policy; with ``cyclic=True`` it
    restarts every ``horizon`` steps (SGDR without the period growth).
    """

    lr: float
    horizon: Any
    min_lr: float = 0.0
    cyclic: bool = False
    past_horizon: str | None = None

    def __post_init__(self) -> None:
        set_field(self, "lr", check_real("lr", self.lr, "Cosine"))
        _check_horizon(self, "Cosine")
        set_field(self, "min_lr", check_real("min_lr", self.min_lr, "Cosine"))
        if not isinstance(self.cyclic, (bool, np.bool_)):
            raise invalid_param("cyclic", "Cosine", "a bool", self.cyclic)
        set_field(self, "cyclic", bool(self.cyclic))
        if self.cyclic and (self.horizon == "plan" or self.past_horizon not in (None, "hold")):
            raise ValueError(
                "A cyclic Cosine restarts every horizon steps: it needs a fixed horizon and "
                "no past_horizon policy. Pass cyclic=False, or a horizon in steps."
            )

    @property
    def end_value(self) -> float:
        return float(self.min_lr)

    def shape(self, hi: float, lo: float, t: float) -> float:
        return SHAPES["cosine"](hi, lo, t)

    def at(self, step: int, plan: Plan) -> float:
        if self.cyclic:
            t = (check_step(step) % self.horizon) / self.horizon
            return float(self.shape(self.lr, self.min_lr, t))
        return super().at(step, plan)

    def decays(self) -> bool:
        return not self.cyclic


@dataclass(frozen=True, repr=False)
class Linear(_Decay):
    """Linear decay from ``lr`` to ``end_lr`` over ``horizon`` steps (or to the plan's
    end: ``horizon="plan"``); past it, ``end_lr`` or the ``past_horizon`` policy."""

    lr: float
    horizon: Any
    end_lr: float = 0.0
    past_horizon: str | None = None

    def __post_init__(self) -> None:
        set_field(self, "lr", check_real("lr", self.lr, "Linear"))
        _check_horizon(self, "Linear")
        set_field(self, "end_lr", check_real("end_lr", self.end_lr, "Linear"))

    @property
    def end_value(self) -> float:
        return float(self.end_lr)

    def shape(self, hi: float, lo: float, t: float) -> float:
        return SHAPES["linear"](hi, lo, t)


@dataclass(frozen=True, repr=False)
class WSD(Schedule):
    """Warmup-stable-decay: a linear warm-up from 0 to ``lr`` over ``warmup`` steps, then
    ``lr`` for as long as the plan lasts, then a decay to ``decay_to`` in ``shape``.

    ``decay``: the length of the decay at the end of each plan — steps (an int), a
    fraction of the plan (a float in (0, 1)), or None: no decay at a plan's end, only the
    cooldown a fit call asks for (``fit(steps=k, cooldown=True)`` decays from the current
    rate to ``decay_to`` over exactly those k steps). A later call that ends elsewhere
    moves the plan: in the stable phase the stable phase simply lasts longer; in a decay,
    the decay goes on from the current rate to the new end.
    """

    lr: float
    warmup: int = 0
    decay: Any = None
    decay_to: float = 0.0
    shape: str = "linear"
    past_horizon: str | None = None

    def __post_init__(self) -> None:
        set_field(self, "lr", check_real("lr", self.lr, "WSD"))
        set_field(self, "warmup", check_int("warmup", self.warmup, "WSD", minimum=0))
        decay = self.decay
        if isinstance(decay, (float, np.floating)) and 0.0 < decay < 1.0:
            set_field(self, "decay", float(decay))
        elif decay is not None:
            try:
                set_field(self, "decay", check_int("decay", decay, "WSD", minimum=1))
            except ValueError:
                raise invalid_param(
                    "decay", "WSD", "an int >= 1 (steps), a float in (0, 1) or None", decay
                ) from None
        set_field(self, "decay_to", check_real("decay_to", self.decay_to, "WSD"))
        if self.shape not in SHAPES:
            raise invalid_param("shape", "WSD", tuple(SHAPES), self.shape)
        if self.past_horizon not in (None, "hold", "extend"):
            raise invalid_param("past_horizon", "WSD", ("hold", "extend"), self.past_horizon)

    def _decay_start(self, end: int) -> int:
        """Where the decay of a plan that ends at ``end`` starts (``end``: no decay)."""
        if self.decay is None:
            return end
        steps = int(self.decay * end) if isinstance(self.decay, float) else self.decay
        return max(self.warmup, end - steps)

    def _segment(
        self, step: int, move: Move, anchor: tuple[float, bool] | None
    ) -> tuple[float, bool]:
        """(the rate of ``step``, whether it is in a decay) under ``move``, given the rate
        at its anchor (None: the move is a first plan)."""
        if step < self.warmup:
            return float(self.lr * step / self.warmup), False
        shape = SHAPES[self.shape]
        if anchor is not None:
            start, decaying = anchor
            if move.kind == "cooldown" or decaying:  # from the current rate to the end
                if step >= move.end:
                    return float(self.decay_to), True
                a = move.at - 1
                return float(shape(start, self.decay_to, (step - a) / (move.end - a))), True
        elif move.kind == "cooldown":  # a cooldown from the start: the whole plan decays
            if step >= move.end:
                return float(self.decay_to), True
            t = (step - self.warmup) / max(1, move.end - self.warmup)
            return float(shape(self.lr, self.decay_to, t)), True
        begin = self._decay_start(move.end)
        if anchor is not None:  # a decay due before the move began starts at its anchor
            begin = max(begin, move.at - 1)
        if step < begin or self.decay is None:
            return float(self.lr), False
        if step >= move.end:
            return float(self.decay_to), True
        return float(shape(self.lr, self.decay_to, (step - begin) / (move.end - begin))), True

    def at(self, step: int, plan: Plan) -> float:
        step = check_step(step)
        if step < self.warmup:
            return float(self.lr * step / self.warmup)
        return through_moves(step, _moves(self, "plan", plan), self._segment)[0]

    def needs_plan(self) -> bool:
        return True

    def decays(self) -> bool:
        return True

    def horizon_steps(self, plan: Plan) -> int | None:
        return int(_moves(self, "plan", plan)[0].end)

    def past_horizon_policy(self, asked: str | None = None) -> str:
        if asked == "rewarm":
            raise ValueError(
                "past_horizon='rewarm' does not apply to a WSD schedule: its stable phase "
                "goes on for as long as the plan (past_horizon='extend', its default) or "
                "holds. To warm up again after a cooldown, pass schedule=... with a new WSD "
                "and mode='warm' (it starts at 0 with a fresh optimizer)."
            )
        return asked or self.past_horizon or "extend"

