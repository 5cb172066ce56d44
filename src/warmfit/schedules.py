"""Learning-rate schedules as pure functions of the step.

Owns: ``Schedule`` objects mapping a step (counted from the schedule's origin) to a
learning rate, their composition, and their JSON config so a checkpoint can rebuild
the schedule in effect. Because a schedule is a pure function, resuming it needs only
the step counter — no scheduler state to save, nothing to replay.

The Trainer evaluates ``schedule(global_step - origin)`` before every optimizer step.
``origin`` is 0 for a run and moves to the current step on ``mode="warm"`` (the schedule
starts again) — see the modes table in ``docs/design.md``.

Past its ``horizon`` a schedule holds its last value, unless it is declared ``cyclic``,
in which case it starts over every ``horizon`` steps.

A factory for a PyTorch ``LRScheduler`` is accepted too (:func:`from_torch`); such a
scheduler keeps state of its own, which warmfit saves and restores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class Schedule:
    """Base class: ``schedule(step) -> learning rate``, pure and JSON-describable."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """A JSON description from which :func:`from_config` rebuilds an equal schedule."""
        d = {
            k: (v.config() if isinstance(v, Schedule) else v)
            for k, v in asdict_shallow(self).items()
        }
        return {"kind": type(self).__name__, **d}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in asdict_shallow(self).items())
        return f"{type(self).__name__}({args})"


def asdict_shallow(obj: object) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def _check_step(step: int) -> int:
    if step < 0:
        raise ValueError(f"A schedule step must be >= 0. Got {step} instead.")
    return step


@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    lr: float

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.lr)


@dataclass(frozen=True, repr=False)
class StepDecay(Schedule):
    """``lr * gamma ** (step // step_size)``."""

    lr: float
    step_size: int
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        return float(self.lr * self.gamma ** (_check_step(step) // self.step_size))


@dataclass(frozen=True, repr=False)
class Exponential(Schedule):
    """``lr * gamma ** step``, held at ``min_lr`` from below."""

    lr: float
    gamma: float
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        return float(max(self.min_lr, self.lr * self.gamma ** _check_step(step)))


@dataclass(frozen=True, repr=False)
class Cosine(Schedule):
    """Cosine decay from ``lr`` to ``min_lr`` over ``horizon`` steps.

    Past the horizon it holds ``min_lr``; with ``cyclic=True`` it restarts every
    ``horizon`` steps (SGDR without the period growth).
    """

    lr: float
    horizon: int
    min_lr: float = 0.0
    cyclic: bool = False

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if self.cyclic:
            step %= self.horizon
        elif step >= self.horizon:
            return float(self.min_lr)
        t = step / self.horizon
        return float(self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t)))


@dataclass(frozen=True, repr=False)
class Warmup(Schedule):
    """Linear warm-up from ``start_factor * then(0)`` to ``then(0)`` over ``steps``,
    then ``then(step - steps)``."""

    steps: int
    then: Schedule
    start_factor: float = 0.0

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step < self.steps:
            base = self.then(0)
            frac = self.start_factor + (1.0 - self.start_factor) * step / self.steps
            return float(base * frac)
        return self.then(step - self.steps)


@dataclass(frozen=True, repr=False)
class Sequential(Schedule):
    """``schedules[i]`` from ``boundaries[i-1]`` on, each evaluated from its own 0."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(
                "Sequential needs exactly one more schedule than boundaries. Got "
                f"{len(self.schedules)} schedules and {len(self.boundaries)} boundaries."
            )

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        start = 0
        for sched, bound in zip(self.schedules, self.boundaries, strict=False):
            if step < bound:
                return sched(step - start)
            start = bound
        return self.schedules[-1](step - start)

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

    def __call__(self, step: int) -> float:
        return self.schedule(max(0, _check_step(step) - self.start))


# Short, lower-case constructors: the public spelling.
def constant(lr: float) -> Constant:
    return Constant(lr)


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> StepDecay:
    return StepDecay(lr, step_size, gamma)


def exponential(lr: float, gamma: float, min_lr: float = 0.0) -> Exponential:
    return Exponential(lr, gamma, min_lr)


def cosine(lr: float, horizon: int, min_lr: float = 0.0, cyclic: bool = False) -> Cosine:
    return Cosine(lr, horizon, min_lr, cyclic)


def warmup(steps: int, then: Schedule, start_factor: float = 0.0) -> Warmup:
    return Warmup(steps, then, start_factor)


def sequential(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Sequential:
    return Sequential(tuple(schedules), tuple(boundaries))


def shifted(schedule: Schedule, start: int) -> Shifted:
    return Shifted(schedule, start)


_KINDS: dict[str, type[Schedule]] = {
    c.__name__: c for c in (Constant, StepDecay, Exponential, Cosine, Warmup, Sequential, Shifted)
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
    """

    factory: Callable[[Any], Any]
    interval: str = "step"
    extra: dict[str, Any] = field(default_factory=dict)

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
    """Interpret the ``schedule=`` argument: None, a step function, or a torch factory.

    A plain callable is probed with ``obj(0)``: a number means a step function; an
    exception means a factory for a torch scheduler (wrapped with :func:`from_torch`).
    """
    if obj is None or isinstance(obj, (Schedule, TorchScheduler)):
        return obj  # type: ignore[return-value]
    if isinstance(obj, (int, float)):
        return Constant(float(obj))
    if not callable(obj):
        raise TypeError(
            "The 'schedule' parameter must be a function step -> learning rate, a "
            "warmfit.schedules object, a factory optimizer -> torch LRScheduler, or None. "
            f"Got {obj!r} instead."
        )
    try:
        value = obj(0)
    except Exception:
        return TorchScheduler(obj)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return obj  # type: ignore[return-value]
    return TorchScheduler(obj)


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
