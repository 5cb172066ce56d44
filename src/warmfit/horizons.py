"""Where a schedule's horizon ends: plans, re-plans and the policies past a horizon.

A schedule whose horizon is ``"plan"`` (``schedules.cosine(lr, horizon="plan")``,
``linear``, ``wsd``) reaches its end value where the fit call in progress ends. That end
is a :class:`Move` of the schedule's :class:`Plan`: the first fit call under the schedule
plans it (``kind="plan"``), and a later ``continue`` call that ends elsewhere
**re-plans** the remainder (``"extend"``): from the step before the call, whose rate is
the rate the schedule "has now", the schedule goes on in its own shape and reaches its
end value at the new end — without a jump. ``fit(..., cooldown=True)`` is a move too
(``"cooldown"``): decay from the current rate to the end value over the call's steps.
A fixed-horizon schedule has its horizon as its first plan; past it, its policy says
what a call that goes further does: ``hold`` the end value, ``extend`` it (a re-plan, as
above) or ``rewarm`` (a new cycle of the schedule from its step 0, SGDR-style).

Every move is a pure function of (schedule, the step where the call started, its end),
recorded in the ledger (``changes.schedule.replan``) and in the checkpoint; a call that
finishes an interrupted one (a resume, a requeue) makes none, so resumes stay exact.
Steps here are the schedule's own (``global_step - schedule_origin``).

Owns: :class:`Plan`, :class:`Move`, the decay shapes, the rule of which move a call
makes (:func:`moves_for_call`), the :class:`Schedule` base class (a schedule evaluated
under a plan: :meth:`Schedule.at`) and :class:`Planned`. Does not own: the schedules
themselves (:mod:`warmfit.schedules`; the decaying ones in :mod:`warmfit.decays`) or
the fit call (:mod:`warmfit.calls`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import check_int

#: What a call that goes past a fixed horizon does.
POLICIES = ("hold", "extend", "rewarm")

#: The kinds of moves: the first plan, a re-plan, an explicit cooldown, a new cycle.
KINDS = ("plan", "extend", "cooldown", "rewarm")


@dataclass(frozen=True)
class Move:
    """From step ``at`` on, the schedule ends at step ``end`` (its end value is reached
    there and held after), made by a fit call of ``kind``."""

    at: int
    end: int
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "end": self.end, "kind": self.kind}


@dataclass(frozen=True)
class Plan:
    """The moves of a schedule's plan, in order of ``at`` (the schedule's steps)."""

    moves: tuple[Move, ...] = ()

    def to_list(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.moves]

    @classmethod
    def from_list(cls, rows: Sequence[Any] | None) -> Plan:
        """Rebuild a plan from :meth:`to_list`; ``ValueError`` for a malformed one."""
        moves = []
        for row in rows or ():
            if not (
                isinstance(row, dict)
                and all(isinstance(row.get(k), int) and row[k] >= 0 for k in ("at", "end"))
                and row.get("kind") in KINDS
            ):
                raise ValueError(f"a schedule plan move must be {{at, end, kind}}; got {row!r}")
            moves.append(Move(row["at"], row["end"], row["kind"]))
        if any(b.at < a.at for a, b in itertools.pairwise(moves)):
            raise ValueError(f"the schedule plan's moves are out of order: {rows!r}")
        return cls(tuple(moves))

    def added(self, moves: Sequence[Move]) -> Plan:
        return Plan(self.moves + tuple(moves))

    def shaped(self) -> Plan:
        """The moves a schedule evaluates itself (a ``rewarm`` is the caller's)."""
        return Plan(tuple(m for m in self.moves if m.kind != "rewarm"))

    def shifted(self, n: int) -> Plan:
        """The plan of a schedule that starts ``n`` steps later (the ``then`` of a
        warm-up): moves that happened before its start become its first plan."""
        if not n:
            return self
        out: list[Move] = []
        for m in self.moves:
            at, end = max(0, m.at - n), max(1, m.end - n)
            if at == 0:
                out = []  # an earlier move at 0 is replaced by this one
            out.append(Move(at, end, m.kind))
        return Plan(tuple(out))


#: value(hi, lo, t): the decay from ``hi`` (t=0) to ``lo`` (t=1).
Shape = Callable[[float, float, float], float]


def cosine_shape(hi: float, lo: float, t: float) -> float:
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * t))


def linear_shape(hi: float, lo: float, t: float) -> float:
    return lo + (hi - lo) * (1.0 - t)


def sqrt_shape(hi: float, lo: float, t: float) -> float:
    return lo + (hi - lo) * (1.0 - math.sqrt(t))


SHAPES: dict[str, Shape] = {"cosine": cosine_shape, "linear": linear_shape, "sqrt": sqrt_shape}


#: segment(step, move, anchor) -> (rate, in a decay): a schedule's value at ``step`` under
#: ``move``, given (rate, in a decay) at the step before the move (None for a first plan).
Segment = Callable[[int, Move, "tuple[float, bool] | None"], "tuple[float, bool]"]


def through_moves(step: int, moves: Sequence[Move], segment: Segment) -> tuple[float, bool]:
    """The value at ``step`` under ``moves``: the move in effect there (the last that
    starts at or before it), given the value at its anchor — the step before it, under
    the moves before it. ``segment`` must be hashable (a bound method of a frozen
    schedule): the anchors of a plan are worked out once, in order, each from the
    earlier ones (no recursion), and kept for the next steps."""
    moves = tuple(moves)
    i = bisect.bisect_right([m.at for m in moves], step) - 1
    return segment(step, moves[i], _anchors(moves, segment)[i])


@functools.lru_cache(maxsize=64)
def _anchors(moves: tuple[Move, ...], segment: Segment) -> list[tuple[float, bool] | None]:
    """For each move, (rate, in a decay) at the step before it (None: a first plan)."""
    ats = [m.at for m in moves]
    anchors: list[tuple[float, bool] | None] = [None] * len(moves)
    for j in range(1, len(moves)):
        if moves[j].at > 0:  # the value of the step before move j, under moves[:j]
            k = moves[j].at - 1
            before = bisect.bisect_right(ats, k, 0, j) - 1
            anchors[j] = segment(k, moves[before], anchors[before])
    return anchors


def moves_for_call(
    schedule: Any, plan: Plan, *, step: int, end: int, policy: str | None, cooldown: bool
) -> list[Move]:
    """The moves a new fit call makes to ``plan``: the call starts at ``step`` and ends at
    ``end`` (the schedule's steps); ``policy`` is the call's ``past_horizon`` (None: the
    schedule's own). ``schedule`` is checked by :func:`check_call` first."""
    asked, policy = policy, schedule.past_horizon_policy(policy)  # refuses one it cannot follow
    moves: list[Move] = []
    if schedule.needs_plan() and not plan.moves:
        moves.append(Move(0, end, "plan"))
        plan = plan.added(moves)
    cycling = any(m.kind == "rewarm" for m in plan.moves)
    if cooldown:
        if cycling:
            raise ValueError(
                "cooldown=True after the schedule was rewarmed (past_horizon='rewarm' made "
                "it cycle): a cooldown decays from one rate to the end, not from a cycle. "
                "Pass schedule=... with a schedule of its own for this call."
            )
        return [Move(0, end, "cooldown")] if step == 0 else [*moves, Move(step, end, "cooldown")]
    if cycling and asked in ("hold", "extend"):
        since = next(m.at for m in plan.moves if m.kind == "rewarm")
        raise ValueError(
            f"past_horizon={asked!r} after the schedule was rewarmed: it cycles since its "
            f"step {since} and has no horizon left to hold or extend. Pass schedule=... "
            "with a new schedule (mode='warm' starts it at 0), or leave past_horizon out."
        )
    if moves or cycling:
        return moves  # just planned; or cycling already
    current = current_end(schedule, plan)
    if end == current or policy == "hold":
        return []
    if policy == "extend" and (schedule.needs_plan() or end > current):
        return [Move(step, end, "extend")]
    if policy == "rewarm" and end > current:
        return [Move(max(step, current), end, "rewarm")]
    return []


def current_end(schedule: Any, plan: Plan) -> int:
    """Where the schedule's plan ends now: the last move's end, or its fixed horizon."""
    shaped = plan.shaped().moves
    if shaped:
        return shaped[-1].end
    horizon = schedule.horizon_steps(plan)
    assert horizon is not None
    return int(horizon)


def check_call(schedule: Any, *, policy: str | None, cooldown: bool) -> None:
    """Refuse ``past_horizon=`` or ``cooldown=True`` for a schedule they mean nothing
    for, before anything changes."""
    asked = [f"past_horizon={policy!r}"] if policy is not None else []
    asked += ["cooldown=True"] if cooldown else []
    if not asked:
        return
    if getattr(schedule, "cyclic", False):
        raise ValueError(
            f"{' and '.join(asked)} does not apply to a cyclic schedule (it restarts every "
            "horizon and never goes past it). Pass a schedule with cyclic=False."
        )
    if not isinstance(schedule, Schedule) or not schedule.decays():
        raise ValueError(
            f"{' and '.join(asked)} needs a schedule that ends: a warmfit schedule with a "
            "horizon (schedules.cosine, linear or wsd, alone or after a warmup). The "
            f"schedule in effect is {_described(schedule)}. Pass schedule=... with one, or "
            "leave these out."
        )


def _described(schedule: Any) -> str:
    if schedule is None:
        return "none (the optimizer's own learning rate)"
    return repr(schedule)


class Schedule:
    """Base class: ``schedule(step) -> learning rate``, pure and JSON-describable.

    A subclass defines ``__call__`` (a schedule without a horizon) or :meth:`at` (one
    whose end a plan may move); each is the other's default.
    """

    def __call__(self, step: int) -> float:
        return self.at(step, Plan())

    def at(self, step: int, plan: Plan) -> float:
        """The learning rate of ``step`` under ``plan`` (the moves of its horizon)."""
        return self(step)

    def needs_plan(self) -> bool:
        """Whether its horizon is the plan's end (``horizon="plan"``)."""
        return False

    def decays(self) -> bool:
        """Whether it reaches an end value at a horizon (the policies past a horizon and
        ``cooldown=True`` apply to it)."""
        return False

    def horizon_steps(self, plan: Plan) -> int | None:
        """The step where it reaches its end value under its first plan; None: never."""
        return None

    def cycle_start(self) -> int:
        """The step where the schedule's own course starts (a ``shifted`` one waits
        before it): where a ``rewarm`` cycle starts it again."""
        return 0

    def past_horizon_policy(self, asked: str | None = None) -> str:
        """What a fit call that goes past its horizon does (see :mod:`warmfit.horizons`):
        ``asked`` (the call's ``past_horizon``), else the schedule's own; ``ValueError``
        for a policy the schedule cannot follow."""
        return asked or "hold"

    def planned(self, end: int) -> Planned:
        """This schedule as a function of the step, planned to end at step ``end`` (what
        a fit call ending there does; to evaluate or plot a ``horizon="plan"`` one)."""
        return Planned(self, Plan((Move(0, check_int("end", end, "planned", minimum=1), "plan"),)))

    def config(self) -> dict[str, Any]:
        """A JSON description from which :func:`from_config` rebuilds an equal schedule."""
        d = {
            k: (v.config() if isinstance(v, Schedule) else v)
            for k, v in asdict_shallow(self).items()
            if not (k == "past_horizon" and v is None)  # older configs have none
        }
        return {"kind": type(self).__name__, **d}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in asdict_shallow(self).items())
        return f"{type(self).__name__}({args})"


def asdict_shallow(obj: object) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def set_field(schedule: Schedule, name: str, value: object) -> None:
    """Store a checked parameter of a frozen schedule as the plain number the check
    returned (a NumPy scalar would not go into the checkpoint's JSON)."""
    object.__setattr__(schedule, name, value)


def check_step(step: int) -> int:
    if step < 0:
        raise ValueError(f"A schedule step must be >= 0. Got {step} instead.")
    return step


class Planned:
    """A schedule under a plan: ``planned(step)`` is ``schedule.at(step, plan)``, and from
    a ``rewarm`` move on, the schedule's cycle again and again — from the step where the
    schedule itself starts (its :meth:`~Schedule.cycle_start`: after a ``shifted``'s
    wait) to its horizon under its first plan — what the Trainer evaluates each step."""

    def __init__(self, schedule: Schedule, plan: Plan) -> None:
        self.schedule, self.plan = schedule, plan
        rewarms = [m for m in plan.moves if m.kind == "rewarm"]
        self._rewarm = rewarms[0].at if rewarms else None
        if self._rewarm is not None:
            # The first plan: a move from step 0 (a "plan" horizon's), else the fixed one.
            self._first = Plan(tuple(m for m in plan.shaped().moves if m.at == 0)[-1:])
            self._start = schedule.cycle_start()
            self._cycle = (schedule.horizon_steps(self._first) or 0) - self._start

    def __call__(self, step: int) -> float:
        step = check_step(step)
        if self._rewarm is not None and step >= self._rewarm and self._cycle > 0:
            k = self._start + (step - self._rewarm) % self._cycle
            return self.schedule.at(k, self._first)
        return self.schedule.at(step, self.plan)

    def __repr__(self) -> str:
        return f"{self.schedule!r} planned {self.plan.to_list()}"
