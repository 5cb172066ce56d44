"""The training SPEC: a TOML file that names everything ``warmfit train`` needs.

Owns: reading and checking a spec (:func:`load_spec`), importing the Python factories
it names, the spec's framework (named, or inferred from what the model factory returns)
and which keys that framework can use (:meth:`Spec.resolve_framework`), building a
:class:`~warmfit.trainer.Trainer` from it (:meth:`Spec.build_trainer`) and loading its
data (:meth:`Spec.load_data`).

Does not own: training (the Trainer), the frameworks' own checks (their backends, picked
by :func:`warmfit.backends.select`) or the command line (:mod:`warmfit.cli`).

A spec names code, it never contains code: every Python object is given as
``"module:function"`` and imported with :mod:`importlib` (the spec file's folder is put
on ``sys.path`` first, so a module next to the spec is found). Nothing is ``exec``'d or
``eval``'d. Example (``examples/digits.toml``)::

    model = "digits:model"            # zero-argument factory -> the model
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

``framework`` is ``"torch"``, ``"keras"`` or ``"sklearn"``; left out, it is inferred
from what the model factory returns (which calls the factory once more: name the
framework of a model that is slow to build). A framework that does not match the model
is refused. The Trainer builds a PyTorch or Keras model from the factory, under the
seed; an estimator is the factory's return value, a new one per Trainer. A key the
framework cannot use (:data:`FRAMEWORK_KEYS`) is refused by name before anything is
built:

- ``torch``: ``optimizer`` is required (``params -> torch.optim.Optimizer``); ``loss``,
  ``step`` and the training step's options below are PyTorch's alone.
- ``keras`` (``examples/keras_mlp.toml``): ``optimizer`` is optional, a zero-argument
  factory ``() -> keras.optimizers.Optimizer`` (without it the model must come
  compiled); ``loss`` is a Keras loss name or ``"module:function"``.
- ``sklearn`` (``examples/sklearn_sgd.toml``): no ``optimizer`` or ``loss`` (set them in
  the estimator); ``estimators_per_round = N`` grows an ensemble (RandomForest,
  GradientBoosting, ...) by N estimators a round.

The torch training step's options (``examples/charlm.toml`` uses them all): ``step``
(``(model, batch) -> loss``, your forward), ``precision`` (``"32"``, ``"bf16"`` or
``"fp16"``), ``accumulate``, ``clip_grad_norm``, ``ema`` and ``ema_warmup``.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import FRAMEWORKS
from .errors import WarmfitError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: key -> (required, what it must be). The order is the order of the docs.
KEYS: dict[str, tuple[bool, str]] = {
    "model": (True, "'module:function'"),
    "framework": (False, f"one of {{{', '.join(map(repr, FRAMEWORKS))}}} or left out"),
    "data": (True, "'module:function'"),
    "optimizer": (False, "'module:function'"),
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
    "estimators_per_round": (False, "an int >= 1"),
}
BUILTIN_CALLBACKS = ("EarlyStopping", "ReduceLROnPlateau", "OverfittingMonitor")
TORCH_STEP_KEYS = ("precision", "accumulate", "clip_grad_norm", "ema", "ema_warmup")
#: The keys passed to the Trainer as they are.
_AS_THEY_ARE = ("metrics", "checkpoint_every", "keep_last", "device", "deterministic", "monitor",
                "monitor_mode", "verbose", *TORCH_STEP_KEYS)  # fmt: skip
_COUNTS = ("batch_size", "epochs", "checkpoint_every", "keep_last", "accumulate",
           "estimators_per_round")  # fmt: skip

#: The optimizer factory each framework takes: (whether it takes the parameters, whether
#: the framework needs one, what it is, an example). Another framework takes none.
OPTIMIZERS: dict[str, tuple[bool, bool, str, str]] = {
    "torch": (True, True, "params -> torch.optim.Optimizer",
              "def adam(params): return torch.optim.Adam(params, lr=1e-3)"),
    "keras": (False, False, "() -> keras.optimizers.Optimizer",
              "def adam(): return keras.optimizers.Adam(1e-3)"),
}  # fmt: skip
#: The keys only some frameworks can use: key -> (those frameworks, what the key is for).
#: Every other key means the same for every framework, a framework added later included.
FRAMEWORK_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "optimizer": (tuple(OPTIMIZERS), "for PyTorch and Keras models"),
    "loss": (("torch", "keras"), "for PyTorch and Keras models"),
    "step": (("torch",), "for PyTorch models"),
    **dict.fromkeys(TORCH_STEP_KEYS, (("torch",), "an option of the PyTorch training step")),
    "estimators_per_round": (
        ("sklearn",),
        "for scikit-learn estimators that grow by rounds (RandomForest*, ExtraTrees*, "
        "GradientBoosting*, HistGradientBoosting*, Bagging*)",
    ),
}
#: What to do instead of a key a framework cannot use, beyond removing it.
_INSTEAD: dict[tuple[str, str], str] = {
    ("optimizer", "sklearn"): "A scikit-learn estimator has its own optimizer: set it "
    "through the estimator's parameters in the model factory, e.g. "
    "SGDClassifier(learning_rate='constant', eta0=0.01).",
    ("loss", "sklearn"): "A scikit-learn estimator has its own loss: set it through the "
    "estimator's parameters in the model factory, e.g. SGDClassifier(loss='log_loss').",
    ("step", "keras"): "A Keras model takes its own step: override train_step in a "
    "keras.Model subclass, and warmfit runs it.",
    ("step", "sklearn"): "A scikit-learn estimator trains with its own partial_fit or fit.",
}
#: How a message names each framework's models (another's: "a model of the 'x' framework").
MODEL_WORDS = {"torch": "a PyTorch model", "keras": "a Keras model", "sklearn": "a scikit-learn "
               "estimator", "xgboost": "an XGBoost model", "lightgbm": "a LightGBM model"}
#: The frameworks whose Trainer builds the model from the factory, under the seed; any
#: other framework's Trainer takes the model the factory returns.
BUILT_FROM_FACTORY = ("torch", "keras")


#: What each framework's models are instances of, in the order of
#: :func:`warmfit.backends.select` (a Keras model on the torch backend is a torch
#: ``nn.Module`` too): (framework, module, class). ``sklearn``: any estimator with
#: scikit-learn's API, whose backend select picks.
MODEL_CLASSES = (
    ("xgboost", "warmfit.boosting", "XGBoost"), ("lightgbm", "warmfit.boosting", "LightGBM"),
    ("xgboost", "xgboost", "XGBModel"), ("lightgbm", "lightgbm", "LGBMModel"),
    ("keras", "keras", "Model"), ("torch", "torch.nn", "Module"),
    ("sklearn", "sklearn.base", "BaseEstimator"))  # fmt: skip


def model_framework(model: Any) -> str | None:
    """The framework ``model`` belongs to (:data:`MODEL_CLASSES`), or None. A framework
    that is not imported yet (the factory did not import it) is not looked at."""
    for framework, module, name in MODEL_CLASSES:
        imported = module.partition(".")[0] in sys.modules
        if imported and isinstance(model, getattr(importlib.import_module(module), name)):
            return framework
    return None


def _words(framework: str) -> str:
    return MODEL_WORDS.get(framework, f"a model of the {framework!r} framework")


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
    # The framework once resolved; inferred: the model's type, and the estimator returned.
    _framework: str | None = field(default=None, init=False, repr=False, compare=False)
    _returned: str = field(default="", init=False, repr=False, compare=False)
    _spare: Any = field(default=None, init=False, repr=False, compare=False)

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

    # -- the framework --------------------------------------------------------------------
    def resolve_framework(self) -> str:
        """The spec's ``framework``, or the one of the model the factory returns (called
        once per Spec for that; a named PyTorch or Keras model is checked as the Trainer
        builds it). Every key is checked against it (:data:`FRAMEWORK_KEYS`, the optimizer
        factory's parameters): :class:`SpecError` before a Trainer is built."""
        if self._framework is not None:
            return self._framework
        framework = self.raw.get("framework")
        if framework not in BUILT_FROM_FACTORY:  # inferred, or an estimator: built here
            model = self.resolve("model")()
            if framework is None:
                framework = model_framework(model)
                if framework is None:
                    raise self.error(
                        "model",
                        f"names {self.raw['model']!r}, which returned a "
                        f"{type(model).__name__}: warmfit cannot tell its framework. Return a "
                        "torch.nn.Module, a keras.Model or a scikit-learn estimator from it, "
                        "or name its framework: framework = one of "
                        f"{', '.join(map(repr, FRAMEWORKS))}.",
                    )
                self._returned = type(model).__name__
            else:
                self._check_returned(model, framework)
            if framework not in BUILT_FROM_FACTORY:
                self._spare = model
        self._check_keys(framework)
        self._framework = framework
        return framework

    def _check_keys(self, framework: str) -> None:
        how = (
            f"framework = {framework!r}"
            if "framework" in self.raw
            else f"inferred from what the model factory returned: {self._returned}"
        )
        model = _words(framework)
        for key, (frameworks, what) in FRAMEWORK_KEYS.items():
            if key in self.raw and framework not in frameworks:
                instead = _INSTEAD.get((key, framework))
                raise self.error(
                    key,
                    f"is {what}; this spec's model is {model} ({how}). Remove {key!r}."
                    + (f" {instead}" if instead else ""),
                )
        if framework not in OPTIMIZERS:
            return
        takes_params, required, what, example = OPTIMIZERS[framework]
        if "optimizer" not in self.raw:
            if required:
                raise self.error(
                    "optimizer",
                    f"is missing; add optimizer = 'module:function', a factory {what}: "
                    f"{model} needs one ({how}), e.g. {example}",
                )
            return
        factory = self.resolve("optimizer")
        takes = _takes(factory, 1 if takes_params else 0)
        if takes is not None:
            raise self.error(
                "optimizer",
                f"names {self.raw['optimizer']!r}, which takes {takes}: for {model} ({how}) "
                f"it must be a factory {what}, e.g. {example}",
            )

    def _model(self, framework: str) -> tuple[Any, str | None]:
        """The Trainer's ``model`` and ``framework`` arguments. A PyTorch or Keras model:
        the factory (named: checked when the Trainer calls it). An estimator: what the
        factory returns, a new one per Trainer; ``framework`` None where it was inferred,
        so that :func:`~warmfit.backends.select` picks the backend of its type."""
        factory: Callable[[], Any] = self.resolve("model")
        named = self.raw.get("framework")
        if framework in BUILT_FROM_FACTORY:
            if named is None:
                return factory, framework

            def checked() -> Any:
                model = factory()
                self._check_returned(model, framework)
                return model

            return checked, framework
        model, self._spare = self._spare, None  # checked when made
        if model is None:
            model = factory()
            if named is not None:
                self._check_returned(model, named)
        return model, named

    def _check_returned(self, model: Any, framework: str) -> None:
        """Refuse a model of another framework than the one the spec names. Between
        frameworks whose models are estimators, the named one's backend judges."""
        found = model_framework(model)
        if found == framework or (
            found not in BUILT_FROM_FACTORY and framework not in BUILT_FROM_FACTORY
        ):
            return
        returned = f"the model factory {self.raw['model']!r} returned a {type(model).__name__}"
        raise self.error(
            "framework",
            f"is {framework!r}, but {returned}, which is not {_words(framework)}. Return "
            "one from the factory, or set 'framework' to the model's framework."
            if found is None
            else f"is {framework!r}, but {returned}, {_words(found)}. Set framework = "
            f"{found!r}, or remove 'framework' to infer it from the model.",
        )

    # -- building -------------------------------------------------------------------------
    def resolve(self, key: str) -> Any:
        """Import the object the spec names under ``key`` (``"module:function"``)."""
        return _import_object(self, key, self.raw[key])

    def build_trainer(self, run_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Any:
        """A new :class:`~warmfit.trainer.Trainer` as the spec describes it, for the
        spec's framework (:meth:`resolve_framework`).

        ``run_dir=None`` keeps the Trainer in memory (no checkpoints); pass
        :meth:`default_run_dir` (or any folder) to checkpoint there — a Trainer built on
        a folder that holds a checkpoint resumes from it. ``overrides`` are Trainer
        keyword arguments that replace the spec's (e.g. ``verbose=0``).
        """
        from .trainer import Trainer

        framework = self.resolve_framework()
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "seed": self.seed,
                                  "callbacks": self._callbacks()}  # fmt: skip
        if "optimizer" in self.raw:
            kwargs["optimizer"] = self.resolve("optimizer")
        if "loss" in self.raw:
            kwargs["loss"] = self._loss()
        if "schedule" in self.raw:
            kwargs["schedule"] = _build_if_factory(self.resolve("schedule"))
        if "step" in self.raw:
            kwargs["step"] = self.resolve("step")
        if "estimators_per_round" in self.raw:
            kwargs["backend_options"] = {"estimators_per_round": self.raw["estimators_per_round"]}
        kwargs.update((key, self.raw[key]) for key in _AS_THEY_ARE if key in self.raw)
        if run_dir is not None:
            kwargs["run_dir"] = run_dir
        kwargs.update(overrides)
        model, named = self._model(framework)
        return Trainer(model, framework=named, **kwargs)

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
        elif key == "framework":
            ok = isinstance(value, str) and value in FRAMEWORKS
        elif key in _COUNTS:
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


def _takes(fn: Any, n: int) -> str | None:
    """None if ``fn`` can be called with ``n`` positional arguments (or has no signature),
    else what it takes: ``"(params)"``, ``"no argument"``."""
    try:
        inspect.signature(fn).bind(*([None] * n))
    except ValueError:  # no signature
        return None
    except TypeError:
        params = inspect.signature(fn).parameters.values()
        names = [
            p.name
            for p in params
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return f"({', '.join(names)})" if names else "no argument"
    return None
