"""Learning-rate schedules as pure functions of the step.

Owns: ``Schedule`` objects mapping a step (counted from the schedule's origin) to a
learning rate, their composition, and their JSON config so a checkpoint can rebuild
the schedule in effect. Because a schedule is a pure function, resuming it needs only
the step counter — no scheduler state to save, nothing to replay.

The Trainer evaluates ``schedule(global_step - origin)`` before every optimizer step.
``origin`` is 0 for a run and moves to the current step on ``mode="warm"`` (the schedule
starts again) — see the modes table in ``docs/design.md``.

Past its ``horizon`` a schedule holds its last value, unless it is declared ``cyclic``,
in which case it starts over every ``horizon`` steps, or its ``past_horizon`` policy
says otherwise (``"extend"``, ``"rewarm"``: see :mod:`warmfit.horizons`). A horizon may
be ``"plan"``: the end of the fit call in progress, re-planned by a later call that ends
elsewhere; such a schedule is evaluated under its :class:`~warmfit.horizons.Plan`
(:meth:`Schedule.at`), which the Trainer keeps and saves.

A learning rate is a finite number >= 0: the schedules below refuse other parameters
when they are built, and :func:`lr_at` (what the Trainer evaluates a schedule with)
refuses a value that is not, naming the step.

A factory for a PyTorch ``LRScheduler`` is accepted too (:func:`from_torch`); such a
scheduler keeps state of its own, which warmfit saves and restores.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .decays import WSD as WSD
from .decays import Cosine as Cosine
from .decays import Linear as Linear
from .errors import check_int, check_real, invalid_param
from .horizons import Plan, check_step, set_field
from .horizons import Planned as Planned
from .horizons import Schedule as Schedule
from .horizons import asdict_shallow as asdict_shallow


def _power(gamma: float, n: int) -> float:
    """``gamma ** n``, inf where it overflows (``lr_at`` refuses it, naming the step)."""
    try:
        return gamma**n
    except OverflowError:
        return math.inf


@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    lr: float

    def __post_init__(self) -> None:
        set_field(self, "lr", check_real("lr", self.lr, "Constant"))

    def __call__(self, step: int) -> float:
        check_step(step)
        return float(self.lr)


@dataclass(frozen=True, repr=False)
class StepDecay(Schedule):
    """``lr * gamma ** (step // step_size)``."""

    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        set_field(self, "lr", check_real("lr", self.lr, "StepDecay"))
        set_field(self, "step_size", check_int("step_size", self.step_size, "StepDecay", minimum=1))
        set_field(self, "gamma", check_real("gamma", self.gamma, "StepDecay"))

    def __call__(self, step: int) -> float:
        return float(self.lr * _power(self.gamma, check_step(step) // self.step_size))


@dataclass(frozen=True, repr=False)
class Exponential(Schedule):
    """``lr * gamma ** step``, held at ``min_lr`` from below."""

    lr: float
    gamma: float
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        set_field(self, "lr", check_real("lr", self.lr, "Exponential"))
        set_field(self, "gamma", check_real("gamma", self.gamma, "Exponential"))
        set_field(self, "min_lr", check_real("min_lr", self.min_lr, "Exponential"))

    def __call__(self, step: int) -> float:
        return float(max(self.min_lr, self.lr * _power(self.gamma, check_step(step))))


@dataclass(frozen=True, repr=False)
class Warmup(Schedule):
    """Linear warm-up from ``start_factor * then(0)`` to ``then(0)`` over ``steps``,
    then ``then(step - steps)``."""

    steps: int
    then: Schedule
    start_factor: float = 0.0

    def __post_init__(self) -> None:
        set_field(self, "steps", check_int("steps", self.steps, "Warmup", minimum=0))
        set_field(self, "start_factor", check_real("start_factor", self.start_factor, "Warmup"))

    def at(self, step: int, plan: Plan) -> float:
        step = check_step(step)
        then = self.then.at
        if step < self.steps:
            base = then(0, plan.shifted(self.steps))
            frac = self.start_factor + (1.0 - self.start_factor) * step / self.steps
            return float(base * frac)
        return then(step - self.steps, plan.shifted(self.steps))

    def needs_plan(self) -> bool:
        return self.then.needs_plan()

    def decays(self) -> bool:
        return self.then.decays()

    def horizon_steps(self, plan: Plan) -> int | None:
        inner = self.then.horizon_steps(plan.shifted(self.steps))
        return None if inner is None else self.steps + inner

    def past_horizon_policy(self, asked: str | None = None) -> str:
        return self.then.past_horizon_policy(asked)


@dataclass(frozen=True, repr=False)
class Sequential(Schedule):
    """``schedules[i]`` from ``boundaries[i-1]`` on, each evaluated from its own 0."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        bounds = tuple(check_int("boundaries", b, "Sequential", minimum=1) for b in self.boundaries)
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise invalid_param("boundaries", "Sequential", "increasing steps", self.boundaries)
        set_field(self, "boundaries", bounds)
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(
                "Sequential needs exactly one more schedule than boundaries. Got "
                f"{len(self.schedules)} schedules and {len(self.boundaries)} boundaries."
            )
        if any(sched.needs_plan() for sched in self.schedules[:-1]):
            raise ValueError(
                "Only the last schedule of a Sequential may end with the plan "
                "(horizon='plan'): the others end at their boundary. Give them a horizon "
                "in steps."
            )

    def at(self, step: int, plan: Plan) -> float:
        step = check_step(step)
        start = 0
        for sched, bound in zip(self.schedules, self.boundaries, strict=False):
            if step < bound:
                return sched(step - start)
            start = bound
        return self.schedules[-1].at(step - start, plan.shifted(start))

    @property
    def _last(self) -> tuple[Schedule, int]:
        return self.schedules[-1], (self.boundaries[-1] if self.boundaries else 0)

    def needs_plan(self) -> bool:
        return self._last[0].needs_plan()

    def decays(self) -> bool:
        return self._last[0].decays()

    def horizon_steps(self, plan: Plan) -> int | None:
        last, start = self._last
        inner = last.horizon_steps(plan.shifted(start))
        return None if inner is None else start + inner

    def past_horizon_policy(self, asked: str | None = None) -> str:
        return self._last[0].past_horizon_policy(asked)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "Sequential",
            "schedules": [s.config() for s in self.schedules],
            "boundaries": list(self.boundaries),
        }


@dataclass(frozen=True, repr=False)
class Shifted(Schedule):
    """``schedule(step - start)``, and ``schedule(0)`` before ``start``: begin a new schedule
    at the current step while continuing (``mode="continue"`` keeps the optimizer)."""

    schedule: Schedule
    start: int

    def __post_init__(self) -> None:
        set_field(self, "start", check_int("start", self.start, "Shifted", minimum=0))

    def at(self, step: int, plan: Plan) -> float:
        return self.schedule.at(max(0, check_step(step) - self.start), plan.shifted(self.start))

    def needs_plan(self) -> bool:
        return self.schedule.needs_plan()

    def decays(self) -> bool:
        return self.schedule.decays()

    def horizon_steps(self, plan: Plan) -> int | None:
        inner = self.schedule.horizon_steps(plan.shifted(self.start))
        return None if inner is None else self.start + inner

    def cycle_start(self) -> int:
        return self.start + self.schedule.cycle_start()

    def past_horizon_policy(self, asked: str | None = None) -> str:
        return self.schedule.past_horizon_policy(asked)


# Short, lower-case constructors: the public spelling.
def constant(lr: float) -> Constant:
    return Constant(lr)


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> StepDecay:
    return StepDecay(lr, step_size, gamma)


def exponential(lr: float, gamma: float, min_lr: float = 0.0) -> Exponential:
    return Exponential(lr, gamma, min_lr)


def cosine(
    lr: float,
    horizon: int | str,
    min_lr: float = 0.0,
    cyclic: bool = False,
    past_horizon: str | None = None,
) -> Cosine:
    """Cosine decay from ``lr`` to ``min_lr`` over ``horizon`` steps; ``horizon="plan"``:
    to the end of the fit call in progress (re-planned by a later call).
    ``past_horizon``: ``"hold"`` (default for a fixed horizon), ``"extend"`` (default
    for ``"plan"``) or ``"rewarm"``."""
    return Cosine(lr, horizon, min_lr, cyclic, past_horizon)


def linear(
    lr: float, horizon: int | str, end_lr: float = 0.0, past_horizon: str | None = None
) -> Linear:
    """Linear decay from ``lr`` to ``end_lr`` over ``horizon`` steps (or ``"plan"``)."""
    return Linear(lr, horizon, end_lr, past_horizon)


def wsd(
    lr: float,
    warmup: int = 0,
    decay: int | float | None = None,
    decay_to: float = 0.0,
    shape: str = "linear",
) -> WSD:
    """Warmup-stable-decay (see :class:`WSD`): stable for as long as the plan lasts;
    ``fit(steps=k, cooldown=True)`` decays to ``decay_to`` over those k steps."""
    return WSD(lr, warmup, decay, decay_to, shape)


def warmup(steps: int, then: Schedule, start_factor: float = 0.0) -> Warmup:
    return Warmup(steps, then, start_factor)


def sequential(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Sequential:
    return Sequential(tuple(schedules), tuple(boundaries))


def shifted(schedule: Schedule, start: int) -> Shifted:
    return Shifted(schedule, start)


_KINDS: dict[str, type[Schedule]] = {
    c.__name__: c
    for c in (Constant, StepDecay, Exponential, Cosine, Linear, WSD, Warmup, Sequential, Shifted)
}


def from_config(config: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.config`; never evaluates code."""
    if not isinstance(config, dict) or config.get("kind") not in _KINDS:
        raise ValueError(
            f"Not a warmfit schedule config: {config!r}. Expected a dict whose 'kind' is one "
            f"of {sorted(_KINDS)}."
        )
    kind = config["kind"]
    args = {k: v for k, v in config.items() if k != "kind"}
    if kind == "Sequential":
        return Sequential(
            tuple(from_config(s) for s in args["schedules"]), tuple(args["boundaries"])
        )
    for key in ("then", "schedule"):
        if key in args:
            args[key] = from_config(args[key])
    return _KINDS[kind](**args)


@dataclass
class TorchScheduler:
    """A factory ``optimizer -> torch.optim.lr_scheduler.LRScheduler``.

    warmfit builds the scheduler on every fresh optimizer (construction, ``warm``,
    ``restart``), steps it once per optimizer step (``interval="step"``) or once per
    epoch (``interval="epoch"``), and saves its ``state_dict()``. As PyTorch's own docs
    say for ``LambdaLR``, functions inside a scheduler are not saved: the factory
    rebuilds them on resume.

    ``probe`` says why :func:`as_schedule` took a plain callable for such a factory
    (what calling it with step 0 did), so that a step function it misread gets an error
    that says so when the factory fails; empty for :func:`from_torch`.
    """

    factory: Callable[[Any], Any]
    interval: str = "step"
    extra: dict[str, Any] = field(default_factory=dict)
    probe: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.interval not in ("step", "epoch"):
            raise ValueError(
                "The 'interval' parameter of from_torch must be one of {'step', 'epoch'}. "
                f"Got {self.interval!r} instead."
            )


def from_torch(factory: Callable[[Any], Any], interval: str = "step") -> TorchScheduler:
    """Use a PyTorch LR scheduler factory (``lambda opt: StepLR(opt, 100)``) as the schedule."""
    return TorchScheduler(factory, interval)


def as_schedule(obj: object) -> Schedule | TorchScheduler | Callable[[int], float] | None:
    """Interpret the ``schedule=`` argument: None, a number, a step function, or a torch
    factory.

    A plain callable is probed with ``obj(0)``: a real number (a Python, NumPy or 0-d
    array/tensor one) means a step function, whose value at step 0 must be a learning
    rate (:func:`lr_at`); anything else, or an exception, means a factory for a torch
    scheduler (wrapped with :func:`from_torch`; the backend refuses it, naming the probe,
    if it does not build one).
    """
    if obj is None or isinstance(obj, (Schedule, TorchScheduler)):
        return obj
    lr = _real(obj)
    if lr is not None:
        return Constant(lr)  # Constant refuses a negative or non-finite rate
    if not callable(obj):
        raise TypeError(
            "The 'schedule' parameter must be a function step -> learning rate, a "
            "warmfit.schedules object, a factory optimizer -> torch LRScheduler, or None. "
            f"Got {obj!r} instead."
        )
    try:
        value = obj(0)
    except Exception as err:
        probe = f"calling it with step 0 raised {type(err).__name__}: {err}"
        return TorchScheduler(obj, probe=probe)
    if _real(value) is None:
        return TorchScheduler(obj, probe=f"calling it with step 0 returned {value!r}")
    _checked(obj, 0, value)  # a bad rate at step 0 is refused now, before anything changes
    return obj


def lr_at(schedule: Callable[[int], Any], step: int) -> float:
    """``schedule(step)`` as a float, checked: a real number (NumPy scalars and 0-d
    tensors included), finite and >= 0, else a ``TypeError``/``ValueError`` naming the
    step and the value. The Trainer evaluates schedules through this, so one that goes
    negative, NaN or infinite (an ``exponential`` with ``gamma > 1``, a user function)
    stops training before the step that would use it."""
    return _checked(schedule, step, schedule(step))


def _checked(schedule: object, step: int, value: Any) -> float:
    lr = value if type(value) is float else _real(value)
    if lr is None:
        raise TypeError(
            f"The schedule {_qualname(schedule)} returned {value!r} at step {step}. A "
            "schedule must return a learning rate (a real number) for every step >= 0."
        )
    if not 0.0 <= lr < math.inf:  # False for NaN too
        raise ValueError(
            f"The schedule {_qualname(schedule)} gave the learning rate {lr!r} at step "
            f"{step}. A learning rate must be a finite number >= 0: fix the schedule "
            "(warmfit's schedules hold min_lr from below) or clamp what it returns."
        )
    return lr


def _real(value: object) -> float | None:
    """``float(value)`` for a real number: Python and NumPy scalars, and 0-d numeric
    arrays or tensors (found by their ``ndim`` and ``dtype``: no framework import);
    None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = str(getattr(value, "dtype", None))
    if getattr(value, "ndim", None) == 0 and dtype != "None":
        if "bool" in dtype or "complex" in dtype:
            return None
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
    return None


def describe(schedule: object) -> Any:
    """What the ledger records about a schedule."""
    if schedule is None:
        return None
    if isinstance(schedule, Schedule):
        return schedule.config()
    if isinstance(schedule, TorchScheduler):
        return {
            "kind": "torch",
            "factory": _qualname(schedule.factory),
            "interval": schedule.interval,
        }
    return {"kind": "function", "name": _qualname(schedule)}


def _qualname(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
