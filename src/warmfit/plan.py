"""The parameters of ``Trainer`` and of a fit call, declared: what each accepts, checked
in one place with one message template, before anything changes.

In the spirit of scikit-learn's ``_parameter_constraints``: every public parameter of
``Trainer.__init__`` and ``Trainer.fit`` has an entry (a test checks it), either a
constraint checked here or :class:`Delegated`, which names the component that checks
it (the backend checks the model, the data and the device; ``schedules.as_schedule``
the schedule). A value is accepted if any of its entry's constraints accepts it; the
error lists what is accepted: ``The 'mode' parameter of Trainer.fit must be one of
{'continue', 'warm', 'restart'}. Got 'resum' instead.``

Owns: the declarations and :func:`validate`. Does not own: what a valid value means
(the Trainer and the modes table).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import FRAMEWORK_TEXT, FRAMEWORKS, is_backend_class
from .errors import invalid_param
from .modes import MODES


class Constraint:
    """One kind of value a parameter accepts."""

    text = ""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def convert(self, value: Any) -> Any:
        """The value as the Trainer stores it (a NumPy integer as an int, say)."""
        return value


@dataclass(frozen=True)
class Int(Constraint):
    """An int (a NumPy integer too; not a bool) of at least ``minimum``."""

    minimum: int

    @property
    def text(self) -> str:  # type: ignore[override]
        return f"an int >= {self.minimum}"

    def accepts(self, value: Any) -> bool:
        return bool(
            isinstance(value, (int, np.integer))
            and not isinstance(value, bool)
            and value >= self.minimum
        )

    def convert(self, value: Any) -> int:
        return int(value)


@dataclass(frozen=True)
class OpenUnit(Constraint):
    """A float strictly between 0 and 1."""

    text = "a float in (0, 1)"

    def accepts(self, value: Any) -> bool:
        return bool(isinstance(value, (float, np.floating)) and 0.0 < value < 1.0)

    def convert(self, value: Any) -> float:
        return float(value)


@dataclass(frozen=True)
class OneOf(Constraint):
    options: tuple[Any, ...]

    @property
    def text(self) -> str:  # type: ignore[override]
        return "one of {" + ", ".join(repr(o) for o in self.options) + "}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options


@dataclass(frozen=True)
class Bool(Constraint):
    text = "a bool"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def convert(self, value: Any) -> bool:
        return bool(value)


@dataclass(frozen=True)
class Verbosity(Constraint):
    """0 (silent), 1 (a line per epoch), or a bool."""

    text = "an int >= 0 or a bool"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (bool, numbers.Integral)) and int(value) >= 0

    def convert(self, value: Any) -> int:
        return int(value)


@dataclass(frozen=True)
class Text(Constraint):
    text = "a str"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)


@dataclass(frozen=True)
class Names(Constraint):
    """An iterable of str (a tuple or list of setting names; a lone str is refused:
    ``override="batch_size"`` would be a set of letters)."""

    text = "a tuple of setting names, e.g. ('batch_size',)"

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, Iterable)
            and not isinstance(value, (str, bytes, Mapping))
            and all(isinstance(v, str) for v in list(value))
        )

    def convert(self, value: Any) -> tuple[str, ...]:
        return tuple(value)


@dataclass(frozen=True)
class PathLike(Constraint):
    text = "a path (str or os.PathLike)"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, os.PathLike))


@dataclass(frozen=True)
class Options(Constraint):
    """A mapping of options (``backend_options``)."""

    text = "a dict of options"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, Mapping)


@dataclass(frozen=True)
class Framework(Constraint):
    """A built-in backend's name, or a subclass of
    :class:`~warmfit.backends.base.Backend` (a third party's backend)."""

    text = FRAMEWORK_TEXT

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, str) and value in FRAMEWORKS) or is_backend_class(value)


@dataclass(frozen=True)
class Delegated(Constraint):
    """Checked by ``by`` (which raises its own, more specific message)."""

    by: str

    def accepts(self, value: Any) -> bool:
        return True


#: ``None`` among a parameter's constraints: None is accepted (not listed in messages).
NONE = None

#: The torch training step's options and their defaults (Trainer passes the others on).
STEP_DEFAULTS: dict[str, Any] = {
    "precision": "32", "accumulate": 1, "clip_grad_norm": None, "ema": None,
    "ema_warmup": False, "use_ema": None,
}  # fmt: skip

TRAINER: dict[str, tuple[Constraint | None, ...]] = {
    "model": (Delegated("the backend: a torch Module, Keras model, estimator or a factory"),),
    "optimizer": (Delegated("the backend: a factory params -> optimizer"), NONE),
    "loss": (Delegated("the backend: a callable or a loss name"), NONE),
    "step": (Delegated("the backend: a function (model, batch) -> loss (torch only)"), NONE),
    "precision": (OneOf(("32", "bf16", "fp16")),),
    "accumulate": (Int(1),),
    "clip_grad_norm": (Delegated("the torch backend: a number > 0"), NONE),
    "ema": (Delegated("the torch backend: a decay in (0, 1)"), NONE),
    "ema_warmup": (Bool(),),
    "use_ema": (Bool(), NONE),
    "schedule": (Delegated("schedules.as_schedule and the backend"), NONE),
    "batch_size": (Int(1),),
    "seed": (Int(0),),
    "callbacks": (Delegated("Trainer: warmfit.Callback objects"),),
    "metrics": (Delegated("the backend: names or callables"),),
    "device": (Delegated("the backend: a device it can use"),),
    "run_dir": (PathLike(), NONE),
    "checkpoint_every": (Int(1), NONE),
    "keep_last": (Delegated("RunDir: an int >= 1"),),
    "monitor": (Text(),),
    "monitor_mode": (OneOf(("min", "max")),),
    "deterministic": (Bool(),),
    "num_workers": (Int(0),),
    "override": (Names(),),
    "verbose": (Verbosity(),),
    "backend_options": (Options(), NONE),
    "framework": (Framework(), NONE),
}

FIT: dict[str, tuple[Constraint | None, ...]] = {
    "x": (Delegated("the backend: arrays, tensors, structures of them or a Dataset"),),
    "y": (Delegated("the backend: arrays or tensors"), NONE),
    "epochs": (Int(1), NONE),
    "until_epoch": (Int(1), NONE),
    "mode": (OneOf(MODES),),
    "validation_data": (Delegated("Trainer: a pair (x_val, y_val)"), NONE),
    "validation_split": (OpenUnit(), NONE),
    "shuffle": (Bool(),),
    "schedule": (Delegated("schedules.as_schedule and the backend"), NONE),
    "verbose": (Verbosity(), NONE),
    "rounds": (Int(1), NONE),
    "steps": (Int(1), NONE),
    "new_data": (Bool(),),
    "past_horizon": (OneOf(("hold", "extend", "rewarm")), NONE),
    "cooldown": (Bool(),),
}


def arguments(frame_locals: Mapping[str, Any]) -> dict[str, Any]:
    """A method's arguments from its ``locals()`` at its first line (``self`` dropped)."""
    return {k: v for k, v in frame_locals.items() if k != "self"}


def validate(
    owner: str, constraints: Mapping[str, tuple[Constraint | None, ...]], values: Mapping
) -> dict[str, Any]:
    """``values`` checked against ``constraints`` (in their order) and converted;
    ``ValueError`` in the one template, naming ``owner``, for the first refused."""
    out = dict(values)
    for name, accepted in constraints.items():
        value = values[name]
        if value is None and NONE in accepted:
            continue
        for constraint in accepted:
            if constraint is not None and constraint.accepts(value):
                out[name] = constraint.convert(value)
                break
        else:
            texts = [c.text for c in accepted if c is not None]
            if len(accepted) == 1 and isinstance(accepted[0], OneOf):
                raise invalid_param(name, owner, accepted[0].options, value)
            raise invalid_param(name, owner, " or ".join(texts), value)
    return out
