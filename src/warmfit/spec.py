"""The training SPEC: a TOML file that names everything ``warmfit train`` needs.

Owns: reading and checking a spec (:func:`load_spec`), importing the Python factories
it names, building a :class:`~warmfit.trainer.Trainer` from it
(:meth:`Spec.build_trainer`) and loading its data (:meth:`Spec.load_data`).

Does not own: training (the Trainer) or the command line (:mod:`warmfit.cli`).

A spec names code, it never contains code: every Python object is given as
``"module:function"`` and imported with :mod:`importlib` (the spec file's folder is put
on ``sys.path`` first, so a module next to the spec is found). Nothing is ``exec``'d or
``eval``'d. Example (``examples/digits.toml``)::

    model = "digits:model"            # zero-argument factory -> torch.nn.Module
    data = "digits:data"              # zero-argument factory -> (x, y), (x, y, x_val, y_val)
                                      #   or {"x":, "y":, "x_val":, "y_val":}
    optimizer = "digits:adam"         # params -> torch.optim.Optimizer
    loss = "cross_entropy"            # a loss name, or "module:function"; without it the
                                      #   model's output .loss is the loss (Hugging Face)
    schedule = "digits:schedule"      # optional
    batch_size = 64
    seed = 0
    epochs = 5                        # what `warmfit train SPEC` trains when given no --epochs
    metrics = ["accuracy"]
    validation_split = 0.2
    checkpoint_every = 50
    keep_last = 3
    callbacks = [{ name = "EarlyStopping", patience = 3 }]

The torch training step's options (``examples/charlm.toml`` uses them all)::

    step = "charlm:step"              # optional: (model, batch) -> loss, your forward
    precision = "bf16"                # "32" (default), "bf16" or "fp16"
    accumulate = 4                    # micro-batches per global batch
    clip_grad_norm = 1.0
    ema = 0.99                        # an EMA of the weights; validation uses it
    ema_warmup = true

``loss`` and ``schedule`` given as ``"module:function"``: an object that takes no
argument (a class such as ``torch.nn:CrossEntropyLoss``, or a function without
required parameters) is called once to build the loss or schedule; anything else (a
function ``(prediction, target) -> loss``, ``step -> lr`` or ``optimizer -> scheduler``)
is used as it is. A callback's ``name`` is a warmfit callback (``EarlyStopping``,
``ReduceLROnPlateau``, ``OverfittingMonitor``) or ``"module:Class"``; the table's other
keys are its keyword arguments.

``run_dir`` in a spec is relative to the spec's folder; without it, ``warmfit train``
uses ``runs/<spec stem>`` in the current directory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import WarmfitError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: key -> (required, what it must be). The order is the order of the docs.
KEYS: dict[str, tuple[bool, str]] = {
    "model": (True, "'module:function'"),
    "data": (True, "'module:function'"),
    "optimizer": (True, "'module:function'"),
    "loss": (False, "a loss name such as 'cross_entropy' or 'module:function'"),
    "step": (False, "'module:function' (model, batch) -> loss"),
    "schedule": (False, "'module:function'"),
    "batch_size": (False, "an int >= 1"),
    "seed": (False, "an int >= 0"),
    "epochs": (False, "an int >= 1"),
    "metrics": (False, "a list of metric names"),
    "callbacks": (False, 'a list of tables like { name = "EarlyStopping", patience = 3 }'),
    "checkpoint_every": (False, "an int >= 1"),
    "keep_last": (False, "an int >= 1"),
    "validation_split": (False, "a float in (0, 1)"),
    "run_dir": (False, "a path (relative to the spec's folder)"),
    "device": (False, "a device name such as 'cpu' or 'cuda'"),
    "deterministic": (False, "true or false"),
    "monitor": (False, "a history key such as 'val_loss'"),
    "monitor_mode": (False, "'min' or 'max'"),
    "verbose": (False, "an int >= 0"),
    "precision": (False, "'32', 'bf16' or 'fp16'"),
    "accumulate": (False, "an int >= 1"),
    "clip_grad_norm": (False, "a number > 0"),
    "ema": (False, "a decay in (0, 1)"),
    "ema_warmup": (False, "true or false"),
}
BUILTIN_CALLBACKS = ("EarlyStopping", "ReduceLROnPlateau", "OverfittingMonitor")


class SpecError(WarmfitError, ValueError):
    """A spec file is missing, not TOML, or has a key that is wrong; says how to fix it."""


@dataclass
class TrainData:
    """What a spec's ``data`` factory returned, ready for ``Trainer.fit``."""

    x: Any
    y: Any
    validation_data: tuple[Any, Any] | None = None
    validation_split: float | None = None

    def fit_kwargs(self) -> dict[str, Any]:
        """``validation_data=`` or ``validation_split=`` (or nothing) for ``fit``."""
        if self.validation_data is not None:
            return {"validation_data": self.validation_data}
        if self.validation_split is not None:
            return {"validation_split": self.validation_split}
        return {}


@dataclass
class Spec:
    """A checked spec. ``raw`` holds the TOML values; ``path`` the file they came from."""

    path: Path
    raw: dict[str, Any] = field(default_factory=dict)

    # -- the values, with their defaults --------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def epochs(self) -> int | None:
        return self.raw.get("epochs")

    @property
    def batch_size(self) -> int:
        return int(self.raw.get("batch_size", 32))

    @property
    def seed(self) -> int:
        return int(self.raw.get("seed", 0))

    def default_run_dir(self) -> Path:
        """The spec's ``run_dir`` (relative to the spec's folder), else ``runs/<stem>``."""
        if "run_dir" in self.raw:
            return self.path.parent / self.raw["run_dir"]
        return Path("runs") / self.path.stem

    # -- building -------------------------------------------------------------------------
    def resolve(self, key: str) -> Any:
        """Import the object the spec names under ``key`` (``"module:function"``)."""
        return _import_object(self, key, self.raw[key])

    def build_trainer(self, run_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Any:
        """A new :class:`~warmfit.trainer.Trainer` as the spec describes it.

        ``run_dir=None`` keeps the Trainer in memory (no checkpoints); pass
        :meth:`default_run_dir` (or any folder) to checkpoint there — a Trainer built on
        a folder that holds a checkpoint resumes from it. ``overrides`` are Trainer
        keyword arguments that replace the spec's (e.g. ``verbose=0``).
        """
        from .trainer import Trainer

        kwargs: dict[str, Any] = {
            "optimizer": self.resolve("optimizer"),
            "loss": self._loss() if "loss" in self.raw else None,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "callbacks": self._callbacks(),
        }
        if "schedule" in self.raw:
            kwargs["schedule"] = _build_if_factory(self.resolve("schedule"))
        if "step" in self.raw:
            kwargs["step"] = self.resolve("step")
        for key in (
            "metrics",
            "checkpoint_every",
            "keep_last",
            "device",
            "deterministic",
            "monitor",
            "monitor_mode",
            "verbose",
            "precision",
            "accumulate",
            "clip_grad_norm",
            "ema",
            "ema_warmup",
        ):
            if key in self.raw:
                kwargs[key] = self.raw[key]
        if run_dir is not None:
            kwargs["run_dir"] = run_dir
        kwargs.update(overrides)
        return Trainer(self.resolve("model"), **kwargs)

    def load_data(self) -> TrainData:
        """Call the ``data`` factory and check what it returned."""
        got = self.resolve("data")()
        split = self.raw.get("validation_split")
        if isinstance(got, Mapping):
            unknown = sorted(set(got) - {"x", "y", "x_val", "y_val"})
            if "x" not in got or unknown or ("y_val" in got and "x_val" not in got):
                raise self.error(
                    "data",
                    "returned a dict with keys "
                    f"{sorted(got)}; expected 'x' (and 'y' unless the model computes its own "
                    "loss), optionally 'x_val' (with 'y_val')",
                )
            x, y = got["x"], got.get("y")
            val = (got["x_val"], got.get("y_val")) if "x_val" in got else None
        elif isinstance(got, (tuple, list)) and len(got) in (2, 4):
            x, y = got[0], got[1]
            val = (got[2], got[3]) if len(got) == 4 else None
        else:
            what = f"a {type(got).__name__}" + (
                f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""
            )
            raise self.error(
                "data",
                f"returned {what}; expected (x, y), (x, y, x_val, y_val) or a dict with "
                "keys 'x', 'y' (and 'x_val', 'y_val')",
            )
        if val is not None and split is not None:
            raise self.error(
                "validation_split",
                "is set but the data factory returns validation data too; remove "
                "'validation_split' or return only (x, y)",
            )
        return TrainData(x, y, val, split)

    def error(self, key: str, problem: str) -> SpecError:
        return SpecError(f"spec {self.path}: {key!r} {problem}")

    def _loss(self) -> Any:
        value = self.raw["loss"]
        if ":" not in value:
            return value  # a loss name; the Trainer checks it
        return _build_if_factory(self.resolve("loss"))

    def _callbacks(self) -> list[Any]:
        from . import callbacks as builtin
        from .monitor import OverfittingMonitor

        classes = {
            "EarlyStopping": builtin.EarlyStopping,
            "ReduceLROnPlateau": builtin.ReduceLROnPlateau,
            "OverfittingMonitor": OverfittingMonitor,
        }
        out = []
        for i, table in enumerate(self.raw.get("callbacks", [])):
            key = f"callbacks[{i}]"
            kwargs = {k: v for k, v in table.items() if k != "name"}
            name = table["name"]
            cls = classes.get(name) if ":" not in name else _import_object(self, key, name)
            if cls is None:
                raise self.error(
                    key,
                    f"names an unknown callback {name!r}; use one of "
                    f"{{{', '.join(repr(n) for n in BUILTIN_CALLBACKS)}}} or 'module:Class'",
                )
            try:
                out.append(cls(**kwargs))
            except (TypeError, ValueError) as err:
                raise self.error(key, f"could not build {name}({_kwargs(kwargs)}): {err}") from None
        return out


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and check a spec file; raises :class:`SpecError` naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec {path}: no such file. Pass the path of a TOML spec file.")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"spec {path}: not valid TOML: {err}") from None
    spec = Spec(path, raw)
    _check(spec)
    return spec


def _check(spec: Spec) -> None:
    raw = spec.raw
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SpecError(
            f"spec {spec.path}: unknown key {unknown[0]!r}. The keys are: {', '.join(KEYS)}."
        )
    for key, (required, expected) in KEYS.items():
        if key not in raw:
            if required:
                raise spec.error(key, f"is missing; add {key} = {expected}")
            continue
        value = raw[key]
        if key in ("model", "data", "optimizer", "schedule", "step"):
            ok = isinstance(value, str) and _is_reference(value)
        elif key == "loss":
            ok = isinstance(value, str) and (":" not in value or _is_reference(value))
        elif key in ("batch_size", "epochs", "checkpoint_every", "keep_last", "accumulate"):
            ok = _is_int(value) and value >= 1
        elif key in ("seed", "verbose"):
            ok = _is_int(value) and value >= 0
        elif key == "metrics":
            ok = isinstance(value, list) and all(isinstance(m, str) for m in value)
        elif key == "callbacks":
            ok = isinstance(value, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) for t in value
            )
        elif key == "validation_split":
            ok = isinstance(value, float) and 0.0 < value < 1.0
        elif key in ("deterministic", "ema_warmup"):
            ok = isinstance(value, bool)
        elif key == "precision":
            ok = value in ("32", "bf16", "fp16")
        elif key == "clip_grad_norm":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        elif key == "ema":
            ok = isinstance(value, float) and 0.0 < value < 1.0
        elif key == "monitor_mode":
            ok = value in ("min", "max")
        else:  # run_dir, device, monitor
            ok = isinstance(value, str) and value != ""
        if not ok:
            raise spec.error(key, f"must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_reference(value: str) -> bool:
    module, sep, attr = value.partition(":")
    return (
        bool(sep)
        and bool(module)
        and bool(attr)
        and all(part.isidentifier() for part in module.split(".") + attr.split("."))
    )


def _import_object(spec: Spec, key: str, reference: str) -> Any:
    if not _is_reference(reference):
        raise spec.error(key, f"must be 'module:function', got {reference!r}")
    module_name, _, attr = reference.partition(":")
    folder = str(spec.path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise spec.error(
            key,
            f"names module {module_name!r}, which cannot be imported ({err}). Put "
            f"{module_name}.py next to the spec or make it importable (pip install, "
            "PYTHONPATH).",
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise spec.error(
                key, f"names {reference!r}, but module {module_name!r} has no {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise spec.error(
            key, f"names {reference!r}, which is not callable (a {type(obj).__name__})"
        )
    return obj


def _build_if_factory(obj: Any) -> Any:
    """Call ``obj()`` if it takes no arguments (a class or a zero-argument factory)."""
    if inspect.isclass(obj):
        return obj()
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return obj
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return obj() if not required else obj


def _kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
