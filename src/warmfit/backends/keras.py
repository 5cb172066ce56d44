"""Keras 3 backend: a ``keras.Model`` (or a factory of one), an optimizer and a loss.

Owns, for a Keras model: building and re-initialising it from the seed, its optimizer
(a fresh one of the same config on ``warm``/``restart``), the data as ``model.fit`` takes
it — one array, or a dict, list or tuple of arrays (nested as the model's inputs and
outputs), each leaf cut by the same row indices — and the refusal of a structure that is
not the model's inputs (:func:`_inputs_problem`), the probe that refuses data the
model or the loss cannot take before anything changes (:meth:`KerasBackend.check_data`),
deterministic algorithms on the torch backend (``deterministic=True``), one optimizer
step, evaluation and prediction loops that draw no random number, and the Keras state
as plain arrays:
every ``model.variables`` entry (weights, non-trainable statistics and every
SeedGenerator state) and every ``optimizer.variables`` entry (iteration counter,
learning rate, moments), 0-d shapes kept.

Random streams (DESIGN §2, E4). Keras draws from three places:

- a layer's own ``SeedGenerator`` (a variable in ``model.variables``: saved with the
  weights);
- the global ``SeedGenerator`` used by ``keras.random.*`` ops called with ``seed=None``
  (captured here as the ``keras_global`` stream);
- on the torch backend only, torch's global CPU generator: ``keras.layers.Dropout``
  without a seed takes torch's fast unseeded dropout path (captured as ``torch_cpu``).

Python's and NumPy's global streams (Keras draws default seeds from Python's ``random``)
are the Trainer's. Evaluation and prediction iterate by slicing, without a DataLoader,
so they draw from no stream at all.

Everything goes through Keras's API (``model.variables``, ``keras.ops``,
``model.compute_loss``/``compute_metrics``) except the optimizer step on the torch
backend, which is Keras's own ``TorchTrainer.train_step`` without per-step metrics and
with the NaN check before the update. Other Keras backends step with
``model.train_on_batch`` (a NaN is then caught after the update).

A model whose class overrides ``train_step``, ``test_step`` or ``predict_step`` (Keras's
way to customise training) is trained, validated and predicted through its own methods
on the torch backend (:meth:`KerasBackend._custom_torch_step`): before each step the
gradients are cleared and the metric trackers reset (neither is saved, so no step may
depend on what an earlier one left there), the step's ``logs["loss"]`` is its loss, and
the probe runs the step once on the first rows, putting every variable back, to refuse
before anything changes a step that returns no scalar ``loss``, does not apply
``model.optimizer`` (whose state is the only optimizer state saved) or builds variables.
On the other Keras backends a ``test_step``/``predict_step`` override is refused.

State names are stable: ``variable.path`` carries auto-numbered scopes
(``sequential_1/dense_2/kernel`` for the second model built in a process), so names are
canonicalised per model (``sequential/dense/kernel``, ``sequential/dense_1/kernel``) and
optimizer slots are named after the model variable they belong to.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np

from ..background import SnapshotBuffers
from ..data import fingerprint
from ..errors import StateMismatchError
from ..state import derive_seed
from .base import Backend, NonFiniteLoss, check_keys, check_samples, leaf_rows

_GLOBAL_SEED_GENERATOR = "global_seed_generator"  # keras.src.random.seed_generator


#: A NumPy array or backend tensor (a leaf), or a dict, tuple or list of trees.
Tree = Any


class ArrayData:
    """Training arrays: ``x`` and ``y`` as NumPy arrays (``x_np``, ``y_np``) and as
    backend tensors (``x``, ``y``). Each is one array or a structure of them (a dict,
    tuple or list, nested: the model's inputs), with as many rows in every leaf; ``y``
    may be None."""

    def __init__(self, x: Tree, y: Tree | None) -> None:
        self.x_np, self.y_np = x, y
        self.x = _tree_map(keras.ops.convert_to_tensor, x)
        self.y = None if y is None else _tree_map(keras.ops.convert_to_tensor, y)
        self.n = len(_leaves(x, "x")[0][1])

    def __len__(self) -> int:
        return self.n


class KerasBackend(Backend):
    framework = "keras"

    def __init__(
        self,
        model: keras.Model | Callable[[], keras.Model],
        *,
        optimizer: Any = None,
        loss: Any = None,
        metrics: Any = (),
        device: str = "cpu",
        num_workers: int = 0,
        step: Any = None,
    ) -> None:
        if step is not None:
            raise ValueError(
                "The 'step' parameter of Trainer is for torch models only (for now). A Keras "
                "model takes its own step: override train_step (and test_step) in a "
                f"keras.Model subclass, and warmfit runs it. Got step={step!r}."
            )
        if isinstance(model, keras.Model):
            self.model_factory: Callable[[], keras.Model] | None = None
            self.model: keras.Model = model
        elif callable(model):
            self.model_factory, self.model = model, None
        else:
            raise TypeError(
                "The 'model' parameter of Trainer must be a keras.Model or a zero-argument "
                f"factory returning one. Got {model!r} instead."
            )
        self.optimizer_arg = optimizer
        self.loss_arg = loss
        self.metrics_arg = list(metrics) if metrics else None
        self.device = device  # Keras places variables itself; recorded in describe()
        self.optimizer: Any = None
        self.initial: dict[str, np.ndarray] | None = None
        self._snapshot: Any = None  # made by the first snapshot_tensors()
        self.torch = keras.backend.backend() == "torch"
        self._fresh_optimizer: Callable[[], Any] | None = None
        self._names: list[str] = []
        self._opt_names: list[str] = []
        self._training = True
        self._custom: dict[str, bool] = dict.fromkeys(_STEPS, False)
        if self.model is not None:
            self._check_model(self.model)

    # -- construction, warm and restart --------------------------------------------
    def init_model(self, seed: int, *, first: bool) -> None:
        self.seed = seed
        if self.model_factory is not None:
            fresh = self._build_seeded(seed)
            if self.model is None:
                self.model = fresh
            else:  # keep the user's object (and its compiled state): copy the fresh values
                own, new = self.model.variables, fresh.variables
                if [tuple(v.shape) for v in own] != [tuple(v.shape) for v in new]:
                    raise StateMismatchError(
                        "the model factory returned a model with another architecture on "
                        "restart. Expected the same variables; got "
                        f"{[tuple(v.shape) for v in new]} instead of "
                        f"{[tuple(v.shape) for v in own]}."
                    )
                for v, w in zip(own, new, strict=True):
                    v.assign(w.value)
        self._names = _canonical_names([v.path for v in self.model.variables])
        self._custom = self._custom_steps(self.model)
        if self.model_factory is None and first:
            self.initial = {k: np.array(v, copy=True) for k, v in self._model_arrays().items()}
        elif self.model_factory is None:
            assert self.initial is not None
            self._assign_model(self.initial)

    def _build_seeded(self, seed: int) -> keras.Model:
        """Call the factory with every stream Keras draws from at build time seeded from
        ``seed`` (initializers and SeedGenerators draw default seeds from Python's
        ``random``), like ``keras.utils.set_random_seed``; the caller's streams are put
        back afterwards."""
        saved = (random.getstate(), np.random.get_state(), self.capture_rng())
        build_seed = derive_seed(seed, "keras")
        try:
            random.seed(build_seed)
            np.random.seed(build_seed % (1 << 32))
            self.install_rng(self.seeded_rng(build_seed))
            fresh = self.model_factory()  # type: ignore[misc]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            self.install_rng(saved[2])
        if not isinstance(fresh, keras.Model):
            raise TypeError(f"The model factory must return a keras.Model. Got {fresh!r}.")
        self._check_model(fresh)
        return fresh

    @staticmethod
    def _check_model(model: keras.Model) -> None:
        if not model.built:
            raise ValueError(
                "The Keras model is not built: warmfit needs its variables before training "
                "(to seed, save and restore them). Give it an input shape, e.g. "
                "keras.Sequential([keras.Input((8,)), ...]), or call model.build(shape)."
            )

    def _custom_steps(self, model: keras.Model) -> dict[str, bool]:
        """Which of Keras's step methods the model's class overrides. Off the torch
        backend warmfit cannot call ``test_step``/``predict_step`` (stateless on JAX):
        an override is refused there rather than skipped."""
        custom = {name: _overrides(model, name) for name in _STEPS}
        skipped = [name for name in ("test_step", "predict_step") if custom[name]]
        if skipped and not self.torch:
            raise ValueError(
                f"The Keras model {type(model).__name__} overrides {' and '.join(skipped)}: on "
                f"the Keras {keras.backend.backend()!r} backend warmfit evaluates with "
                "model.compute_loss and model.compute_metrics and predicts with model(x), "
                "so the override would be skipped. Use KERAS_BACKEND=torch, where warmfit "
                "calls the model's own test_step and predict_step, or remove the override."
            )
        return custom

    def init_optimizer(self, schedule: Any) -> None:
        model = self.model
        if self._fresh_optimizer is None:  # the first time: decide what the optimizer is
            self._setup_compile(model)
            if self._custom["train_step"]:
                _check_one_optimizer(model)
            first = model.optimizer
        else:
            first = self._fresh_optimizer()
            model.optimizer = first
        if not isinstance(first, keras.optimizers.Optimizer):
            raise TypeError(
                "The optimizer factory must return a keras.optimizers.Optimizer. "
                f"Got {first!r} instead."
            )
        if not first.built:
            first.build(model.trainable_variables)
        self.optimizer = first
        # The hyper-parameters, read once (get_config reads the LR variable back; the LR
        # itself is state: optim/learning_rate).
        config = first.get_config()
        self._opt_config = _jsonable(
            {k: v for k, v in config.items() if k not in ("name", "learning_rate")}
        )
        self.set_schedule(schedule)
        self._opt_names = _optimizer_names(
            [v.path for v in first.variables],
            {_flat_path(v.path): n for v, n in zip(model.variables, self._names, strict=True)},
        )

    def _setup_compile(self, model: keras.Model) -> None:
        """Compile with warmfit's optimizer/loss/metrics, or keep the model's own."""
        opt_arg = self.optimizer_arg
        compiled = getattr(model, "compiled", False) and model.optimizer is not None
        if opt_arg is None and not compiled:
            raise ValueError(
                "The Keras model is not compiled and no optimizer was given. Pass "
                "optimizer=lambda: keras.optimizers.Adam(1e-3) and loss=..., or call "
                "model.compile(optimizer=..., loss=...) before handing the model to warmfit."
            )
        if opt_arg is None:
            optimizer = model.optimizer
        elif isinstance(opt_arg, (str, keras.optimizers.Optimizer)):
            optimizer = keras.optimizers.get(opt_arg)
        elif callable(opt_arg):
            optimizer = opt_arg()
        else:
            raise TypeError(
                "The 'optimizer' parameter of Trainer must be a zero-argument factory "
                "returning a keras optimizer (e.g. lambda: keras.optimizers.Adam(1e-3)), an "
                f"optimizer or its name. Got {opt_arg!r} instead."
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "The optimizer factory must return a keras.optimizers.Optimizer. "
                f"Got {optimizer!r} instead."
            )
        if callable(opt_arg) and not isinstance(opt_arg, keras.optimizers.Optimizer):
            self._fresh_optimizer = opt_arg
        else:  # a fresh optimizer of the same config (read now, before any LR change)
            cls, config = type(optimizer), optimizer.get_config()
            self._fresh_optimizer = lambda: cls.from_config(dict(config))
        loss = self.loss_arg if self.loss_arg is not None else getattr(model, "loss", None)
        if loss is None and not self._custom["train_step"]:  # a custom step may need none
            raise ValueError(
                "The Keras model has no loss. Pass loss='sparse_categorical_crossentropy' "
                "(or a keras loss) to Trainer, or compile the model with one."
            )
        if opt_arg is not None or self.loss_arg is not None or self.metrics_arg is not None:
            metrics = self.metrics_arg
            if metrics is None and compiled:
                metrics = _compiled_metrics(model)  # keep the user's
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        self.loss_name = None if loss is None else loss if isinstance(loss, str) else _name(loss)

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        start = derive_seed(seed, "keras", 1) % 10**9 + 1  # Keras's own default seed range
        state = {"keras_global": np.array([start, 0], dtype=_seed_dtype())}
        if self.torch:
            import torch

            gen = torch.Generator().manual_seed(derive_seed(seed, "torch"))
            state["torch_cpu"] = gen.get_state().numpy().copy()
        return state

    def capture_rng(self) -> dict[str, np.ndarray]:
        gen = _global_seed_generator()
        state = {
            "keras_global": (
                np.zeros(0, dtype=_seed_dtype())
                if gen is None
                else np.array(_to_numpy(gen.state), copy=True)
            )
        }
        if self.torch:
            import torch

            state["torch_cpu"] = torch.get_rng_state().numpy().copy()
        return state

    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        own = np.asarray(state["keras_global"])
        if own.size == 0:  # the caller had no global seed generator yet: leave none
            _set_global_seed_generator(None)
        else:
            gen = _global_seed_generator()
            if gen is None:
                gen = keras.random.SeedGenerator(seed=int(own[0]))
                _set_global_seed_generator(gen)
            gen.state.assign(own.astype(gen.state.dtype))
        if self.torch and "torch_cpu" in state:
            import torch

            torch.set_rng_state(torch.from_numpy(np.asarray(state["torch_cpu"], np.uint8).copy()))

    # -- data ------------------------------------------------------------------------
    def prepare(self, x: Any, y: Any) -> ArrayData:
        """``x`` as ``model.fit`` takes it — one array, or a dict ``{input name: array}``
        or a list or tuple of arrays (nested as the model's inputs) — and ``y`` (one array
        or a structure, or None). Refused, naming what is wrong, before anything changes:
        a leaf that is not numeric, a structure that is not the model's inputs
        (:func:`_inputs_problem`), leaves with different numbers of rows."""
        xa = _as_tree(x, "x")
        ya = None if y is None else _as_tree(y, "y")
        struct = _input_struct(self.model)
        problem = None if struct is None else _inputs_problem(xa, struct, "x")
        if problem is not None:
            raise ValueError(problem)
        y_rows = None if ya is None else _rows(ya, "y")
        if ya is not None and y_rows is None:
            raise ValueError(f"y must have at least one dimension (samples first). Got {y!r}.")
        check_samples(x, _rows(xa, "x"), y_rows)
        return ArrayData(xa, ya)

    def subset(self, data: ArrayData, rows: np.ndarray) -> ArrayData:
        def pick(a: np.ndarray) -> np.ndarray:
            return a[rows]

        y = None if data.y_np is None else _tree_map(pick, data.y_np)
        return ArrayData(_tree_map(pick, data.x_np), y)

    def fingerprint(self, data: ArrayData) -> tuple[str, list[int]]:
        """One array for x and y: the hash of the arrays, as always. A structure: its
        leaves in sorted key order with their paths (renaming an input changes it), and
        the shape ``[n, *the first leaf's other dimensions]``."""
        x, y = data.x_np, data.y_np
        if not (_is_tree(x) or _is_tree(y)):
            return fingerprint(x, y), list(x.shape)
        named = _leaves(x, "x") + ([("y", None)] if y is None else _leaves(y, "y"))
        first = named[0][1]
        names = [p for p, _ in named]
        return fingerprint(*[a for _, a in named], names=names), [len(data), *first.shape[1:]]

    def batches(
        self, data: ArrayData, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        order_t = keras.ops.convert_to_tensor(order)
        for start in range(offset, len(order), batch_size):
            idx = order_t[start : start + batch_size]
            yield (_take(data.x, idx), None if data.y is None else _take(data.y, idx))

    def check_data(self, data: ArrayData, *, with_target: bool, what: str) -> None:
        """Run the model (and the loss) on the first two rows in inference mode: a
        mismatch of features, dtypes or targets is a ValueError naming the data before
        anything changes, not a Keras error in the middle of an epoch; so is a model whose
        layers build themselves on that call (``model.build`` of a subclassed model
        does not build its layers).

        A model with its own ``train_step`` (on the torch backend) is probed with one
        step of it on those rows, and with its own ``test_step`` for validation and
        evaluation data: a step that returns no dict of scalar logs (with a ``loss``
        for training), a ``train_step`` that does not apply ``model.optimizer`` or that
        keeps plain Python attributes on the model (state no checkpoint holds) is
        refused here (:meth:`_refuse_step`).

        Changes nothing: Python's, NumPy's, Keras's global and torch's random streams and
        the model's non-trainable variables (every ``SeedGenerator`` state, statistics)
        and metric trackers are put back afterwards, for layers that draw or count even
        in inference mode; after a probing ``train_step`` every model and optimizer
        variable too, and the gradients are cleared.
        """
        model = self.model
        xb = _head(data.x, 0, 2)
        yb = None if data.y is None else _head(data.y, 0, 2)
        step = None
        if with_target and self.torch:
            step = "train_step" if what == "fit:" else "test_step"
            step = step if self._custom[step] else None
        training = step == "train_step"
        host = (random.getstate(), np.random.get_state())
        streams = self.capture_rng()
        known = {id(v) for v in model.variables}
        opt_vars = list(self.optimizer.variables) if training else []
        known_opt = {id(v) for v in opt_vars}
        kept = [v for v in model.variables if training or not v.trainable] + opt_vars
        kept += [v for v in model.metrics_variables if id(v) not in known]
        fixed = [(v, np.array(_to_numpy(v), copy=True)) for v in kept]
        attrs = _public_attributes(model) if training else {}
        problem = None
        try:
            if training:
                before = int(_to_numpy(self.optimizer.iterations))
                logs = self._call_train_step(xb, yb)
                problem = _logs_problem(logs, loss=True)
                if problem is None and int(_to_numpy(self.optimizer.iterations)) == before:
                    problem = f"did not apply model.optimizer (its iterations stayed {before})"
            else:
                with _no_grad():
                    if step == "test_step":
                        model.reset_metrics()
                        problem = _logs_problem(model.test_step(_pack(xb, yb)), loss=False)
                    else:
                        out = model(xb, training=False)
                        if with_target:
                            loss = _compute_loss(model, xb, yb, out, training=False)
                            if loss is None or math.prod(loss.shape) != 1:
                                raise ValueError(f"the loss returned {loss!r}, not a scalar")
        except Exception as err:  # any failure here is the data's or the model's
            y_desc = "None" if data.y_np is None else _describe(data.y_np)
            got = f"x {_describe(data.x_np)}, y {y_desc}"
            spec = _input_spec(model)
            if spec is not None:
                got = f"expected x {spec}, got {got}"
            raise ValueError(
                f"The data does not fit the model or the loss: {what} {got}. On its first "
                f"rows {type(err).__name__}: {_first_line(err)}. Check the number of "
                "features, the dtypes, and that y matches the loss."
            ) from None
        finally:
            random.setstate(host[0])
            np.random.set_state(host[1])
            self.install_rng(streams)
            for v, value in fixed:
                v.assign(value)
            if training:
                model.zero_grad()
                changed = _restore_attributes(model, attrs)
                if changed and problem is None:
                    problem = f"changed the model's Python attributes {changed}"
        created = [v.path for v in model.variables if id(v) not in known]
        created += [v.path for v in (self.optimizer.variables if training else ())
                    if id(v) not in known_opt]  # fmt: skip
        if created:  # a layer built itself on this call: the optimizer does not know it
            raise ValueError(
                "The Keras model is not fully built: expected no new variables when it is "
                f"called, got {created} on {what} x {_describe(data.x_np)}. Build every "
                "layer before handing the model to warmfit: "
                "give it a keras.Input, or call it once on a batch (model(x[:1]))."
            )
        if problem is not None:
            self._refuse_step(step, problem)  # type: ignore[arg-type]

    def _refuse_step(self, step: str, problem: str) -> None:
        """What a probe of the model's own ``train_step``/``test_step`` found wrong."""
        name = f"{type(self.model).__name__}.{step}"
        if step == "test_step":
            fix = (
                "warmfit validates and evaluates through it and reports the logs of its "
                "last batch: return a dict of scalars (e.g. {m.name: m.result() for m in "
                "self.metrics}), as keras.Model.test_step does."
            )
        elif problem.startswith("returned"):
            fix = (
                "warmfit trains through it and takes each step's loss from its logs: "
                "return a dict with a scalar 'loss' entry (e.g. {m.name: m.result() for m "
                "in self.metrics}, with a tracker named 'loss'), as keras.Model.train_step "
                "does."
            )
        elif problem.startswith("did not apply"):
            fix = (
                "warmfit saves, schedules and rebuilds model.optimizer only, so updates by "
                "other means would neither follow the schedule nor resume exactly: apply "
                "the gradients with self.optimizer.apply(grads, self.trainable_variables)."
            )
        else:
            fix = (
                "warmfit saves Keras variables only, so that state would be lost on resume "
                "and a resumed run would differ: keep it in a variable (self.add_weight(..., "
                "trainable=False), updated with .assign) instead."
            )
        raise ValueError(f"The Keras model's own {step} ({name}) {problem}. {fix}")

    # -- training --------------------------------------------------------------------
    def train_mode(self, training: bool) -> None:
        self._training = training  # Keras takes ``training=`` per call

    def check_mode(self, mode: str) -> None:
        """On Keras's torch backend, refuse a fit call under a global torch mode that
        would change every step silently (``torch.autocast`` around fit): see
        :func:`warmfit.backends.torch.check_global_modes`."""
        if self.torch:
            from .torch import check_global_modes

            check_global_modes(
                _torch_device_type(),
                "build the model under a Keras dtype policy (keras.mixed_precision), which "
                "casts at each layer call",
            )

    def check_deterministic(self) -> None:
        """``Trainer(deterministic=True)``, checked at construction: honoured on the torch
        backend only. TensorFlow's op determinism is process-wide (warmfit could not turn
        it off after fit) and JAX's is an XLA flag read at start-up."""
        if not self.torch:
            raise ValueError(
                "Trainer(deterministic=True) is supported for Keras on the torch backend "
                f"only. Expected KERAS_BACKEND='torch', got {keras.backend.backend()!r}. "
                "Turn determinism on yourself (TensorFlow: "
                "tf.config.experimental.enable_op_determinism(); JAX: "
                "XLA_FLAGS=--xla_gpu_deterministic_ops=true before jax starts) and pass "
                "deterministic=False, or use KERAS_BACKEND=torch."
            )

    def set_deterministic(self) -> Callable[[], None]:
        """Turn on ``torch.use_deterministic_algorithms`` (the Keras ops are torch ops)
        for a fit call; returns what puts the previous setting back."""
        from .torch import use_deterministic_algorithms

        return use_deterministic_algorithms()

    def set_schedule(self, schedule: Any) -> None:
        """Called at construction and when ``fit(schedule=...)`` replaces the schedule."""
        self.check_schedule(schedule)

    def check_schedule(self, schedule: Any) -> None:
        """A warmfit schedule cannot drive an optimizer whose LR is a Keras schedule (nor
        can a torch LR scheduler drive a Keras optimizer)."""
        super().check_schedule(schedule)
        if schedule is not None and self.optimizer is not None:  # else: when it is built
            self.check_lr_settable(
                "a warmfit schedule",
                "Pass schedule=None to Trainer (the Keras schedule "
                "follows the optimizer's iteration counter, which warmfit saves)",
            )

    def check_lr_settable(self, who: str, instead: str) -> None:
        """Refuse ``who`` setting the learning rate of an optimizer whose learning rate
        is a Keras ``LearningRateSchedule`` (it cannot be assigned)."""
        own = getattr(self.optimizer, "_learning_rate", None)
        if not isinstance(own, keras.Variable):
            raise TypeError(
                f"The optimizer's learning rate is a keras LearningRateSchedule; {who} cannot "
                f"also set it. {instead}, or give the optimizer a float learning rate."
            )

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.learning_rate = lr  # assigns the optimizer's LR variable

    def learning_rate(self) -> float:
        lr = self.optimizer.learning_rate  # evaluates a Keras schedule at the iteration
        return float(lr.value if isinstance(lr, keras.Variable) else lr)

    def train_step(self, batch: Any) -> Any:
        xb, yb = batch
        if not self.torch:
            logs = self.model.train_on_batch(xb, yb, return_dict=True)
            value = float(logs["loss"])
            if not math.isfinite(value):
                raise NonFiniteLoss(value)
            return value
        if self._custom["train_step"]:
            return self._custom_torch_step(xb, yb)
        return self._torch_step(xb, yb)

    def _torch_step(self, xb: Any, yb: Any) -> Any:
        """Keras's ``TorchTrainer.train_step`` without per-step metrics."""
        import torch

        model, optimizer = self.model, self.optimizer
        y_pred = model(xb, training=True)
        loss = _compute_loss(model, xb, yb, y_pred, training=True)
        on_cpu = loss.device.type == "cpu"
        value = loss.item() if on_cpu else loss.detach()
        if on_cpu and not math.isfinite(value):
            raise NonFiniteLoss(value)
        model.zero_grad()
        trainable = model.trainable_variables
        optimizer.scale_loss(loss).backward()
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in trainable], trainable)
        return value

    def _call_train_step(self, xb: Any, yb: Any) -> Any:
        """One call of the model's own ``train_step`` on ``(x, y)`` (``x`` alone without
        labels), as ``model.fit`` passes it. Neither gradients nor metric trackers are
        saved, so a step must not depend on what an earlier one left there: both are
        cleared first (``model.fit`` resets the trackers once per epoch instead)."""
        model = self.model
        model.zero_grad()
        model.reset_metrics()
        return model.train_step(_pack(xb, yb))

    def _custom_torch_step(self, xb: Any, yb: Any) -> Any:
        """A step of the model's own ``train_step``; its ``logs["loss"]`` is the loss.

        The step updates the model before warmfit sees its loss. On the CPU the loss is
        read at once, so the variables (the model's and the optimizer's) are copied first
        and put back on a NaN: training stops with the state before the step, as with
        Keras's step. On a GPU the loss stays there and is read at the next readout.
        """
        variables = [*self.model.variables, *self.optimizer.variables]
        on_cpu = not variables or variables[0].value.device.type == "cpu"
        saved = [v.value.detach().clone() for v in variables] if on_cpu else None
        loss = self._call_train_step(xb, yb)["loss"]
        if keras.ops.is_tensor(loss):
            loss = loss.detach().reshape(())
        else:  # a Python or NumPy number
            loss = float(np.asarray(loss).reshape(()))
        if not on_cpu:  # a copy: the next step's reset must not reach it before readout
            return loss.clone() if keras.ops.is_tensor(loss) else loss
        value = loss if isinstance(loss, float) else loss.item()
        if not math.isfinite(value):
            for v, t in zip(variables, saved, strict=True):  # type: ignore[arg-type]
                v.assign(t)
            raise NonFiniteLoss(value)
        return value

    def end_epoch(self) -> None:
        pass

    def read_losses(self, handles: list[Any]) -> np.ndarray:
        if not handles:
            return np.zeros(0)
        if isinstance(handles[0], float):
            return np.asarray(handles, dtype=np.float64)
        stacked = keras.ops.stack(handles)
        return np.asarray(keras.ops.convert_to_numpy(stacked), dtype=np.float64)

    def evaluate(self, data: ArrayData, batch_size: int) -> dict[str, float]:
        """Loss (weighted by batch size, summed in float64) and the compiled metrics;
        slices the arrays itself, so no DataLoader draws a seed from torch's stream."""
        with _no_grad():
            return self._evaluate(data, batch_size)

    def _evaluate(self, data: ArrayData, batch_size: int) -> dict[str, float]:
        """Keras's ``test_step`` per batch with the loss summed in float64, or the
        model's own ``test_step`` (on torch), whose last logs are the result, as in
        ``model.evaluate``."""
        model = self.model
        custom = self._custom["test_step"] and self.torch
        model.reset_metrics()
        total, n, logs = 0.0, len(data), {}
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            xb = _head(data.x, start, stop)
            yb = None if data.y is None else _head(data.y, start, stop)
            if custom:
                logs = model.test_step(_pack(xb, yb))
                continue
            y_pred = model(xb, training=False)
            loss = _compute_loss(model, xb, yb, y_pred, training=False)
            total += float(loss) * (stop - start)
            logs = model.compute_metrics(xb, yb, y_pred, sample_weight=None)
        if not custom and not isinstance(logs, Mapping):  # an override returning nothing
            logs = model.get_metrics_result()
        out = {} if custom else {"loss": total / n}
        for k, v in _pythonify(logs).items():
            if custom or k != "loss":  # Keras's loss tracker: not updated here
                out[k] = float(v)
        model.reset_metrics()
        return out

    def predict(self, x: Any, batch_size: int) -> Any:
        """The model's outputs on ``x``, joined over the batches: one array, or for a
        model with several outputs their structure (a dict or list of arrays), as
        ``model.predict`` returns them. An own ``predict_step`` must return one tensor."""
        data = self.prepare(x, None)
        self.check_data(data, with_target=False, what="predict:")
        model, outs = self.model, []
        custom = self._custom["predict_step"] and self.torch
        with _no_grad():
            for s in range(0, len(data), batch_size):
                xb = _head(data.x, s, s + batch_size)
                out = model.predict_step(xb) if custom else model(xb, training=False)
                if custom and not keras.ops.is_tensor(out):
                    raise TypeError(
                        f"The Keras model's own predict_step ({type(model).__name__}."
                        f"predict_step) returned {type(out).__name__}; warmfit's predict "
                        "returns one array: return a tensor, or call model.predict."
                    )
                outs.append(_tree_map(keras.ops.convert_to_numpy, out))
        return _join(outs)

    # -- state -----------------------------------------------------------------------
    def _model_arrays(self) -> dict[str, np.ndarray]:
        return {n: _to_numpy(v) for n, v in zip(self._names, self.model.variables, strict=True)}

    def state_tensors(self) -> dict[str, np.ndarray]:
        out = {f"model/{k}": v for k, v in self._model_arrays().items()}
        if self.initial is not None:
            out.update({f"initial/{k}": v for k, v in self.initial.items()})
        for name, v in zip(self._opt_names, self.optimizer.variables, strict=True):
            out[f"optim/{name}"] = _to_numpy(v)
        return out

    def snapshot_tensors(self) -> dict[str, np.ndarray]:
        """:meth:`state_tensors` as private copies for the background writer, valid until
        the next call. On Keras's torch backend the variables' tensors are copied into
        reused host buffers (pinned on a GPU, one synchronisation per save: see
        :class:`warmfit.backends.torch.HostSnapshot`) instead of one ``convert_to_numpy``
        per variable; on other Keras backends into reused NumPy buffers. The ``initial/``
        arrays are not copied: they are replaced, never written in place."""
        if self.torch:
            from .torch import HostSnapshot

            if not isinstance(self._snapshot, HostSnapshot):
                self._snapshot = HostSnapshot()
            live = {
                f"model/{n}": _torch_value(v)
                for n, v in zip(self._names, self.model.variables, strict=True)
            }
            for name, v in zip(self._opt_names, self.optimizer.variables, strict=True):
                live[f"optim/{name}"] = _torch_value(v)
        else:
            if not isinstance(self._snapshot, SnapshotBuffers):
                self._snapshot = SnapshotBuffers()
            live = {k: v for k, v in self.state_tensors().items() if not k.startswith("initial/")}
        out = self._snapshot.copy(live)
        if self.initial is not None:
            out.update({f"initial/{k}": v for k, v in self.initial.items()})
        return out

    def state_meta(self) -> dict[str, Any]:
        return {
            "optimizer": {"class": type(self.optimizer).__name__, "config": self._opt_config},
            "keras": keras.__version__,
            "keras_backend": keras.backend.backend(),
        }

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        # Check everything first: a mismatch must leave the trainer untouched.
        self._check_model_keys(tensors)
        opt_meta = meta["optimizer"]
        if opt_meta["class"] != type(self.optimizer).__name__:
            raise StateMismatchError(
                f"the checkpoint's optimizer is {opt_meta['class']}, this Trainer's is "
                f"{type(self.optimizer).__name__}. Pass the same optimizer, or resume with "
                "mode='warm' to start a fresh optimizer."
            )
        own_opt = {n: v for n, v in zip(self._opt_names, self.optimizer.variables, strict=True)}
        saved_opt = _section(tensors, "optim/")
        check_keys("optimizer", own_opt, saved_opt)
        self.load_weights(tensors)
        initial = _section(tensors, "initial/")
        if initial and self.model_factory is None:
            self.initial = {k: np.array(v, copy=True) for k, v in initial.items()}
        for name, v in own_opt.items():
            v.assign(np.asarray(saved_opt[name]).astype(v.dtype, copy=False))

    def _check_model_keys(self, tensors: Mapping[str, np.ndarray]) -> None:
        own = dict(zip(self._names, self.model.variables, strict=True))
        check_keys("model", own, _section(tensors, "model/"))

    def load_weights(
        self, tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None
    ) -> None:
        """Load the ``model/*`` entries of ``tensors`` into the model's variables."""
        self._check_model_keys(tensors)
        self._assign_model(_section(tensors, "model/"))

    def _assign_model(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, v in zip(self._names, self.model.variables, strict=True):
            v.assign(np.asarray(arrays[name]).astype(v.dtype, copy=False))

    def describe(self) -> dict[str, Any]:
        return {
            "framework": f"keras/{keras.backend.backend()}",
            "model": {
                n: list(v.shape) for n, v in zip(self._names, self.model.variables, strict=True)
            },
            "optimizer": {"class": type(self.optimizer).__name__, "hyper": self._opt_config},
            "loss": getattr(self, "loss_name", None),
            "device": str(self.device),
        }


# -- helpers -----------------------------------------------------------------------------
_STEPS = ("train_step", "test_step", "predict_step")


def _overrides(model: keras.Model, name: str) -> bool:
    """Whether the model's class replaces Keras's own ``name`` (that of the backend's
    trainer, which ``keras.Model`` inherits)."""
    return getattr(type(model), name, None) is not getattr(keras.Model, name, None)


def _check_one_optimizer(model: keras.Model) -> None:
    """A model with its own ``train_step`` may step optimizers it holds besides
    ``model.optimizer``; warmfit saves and rebuilds that one only."""
    others = []
    for attr, value in vars(model).items():  # attributes, and lists or dicts of them
        if isinstance(value, Mapping):
            value = list(value.values())
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, keras.optimizers.Optimizer) and v is not model.optimizer:
                others.append(attr)
                break
    if others:
        raise ValueError(
            f"The Keras model {type(model).__name__} has its own train_step and holds "
            f"optimizers besides model.optimizer: {sorted(others)}. warmfit saves, schedules "
            "and rebuilds model.optimizer only: the state of the others would be lost on "
            "resume, and a resumed run would differ. Step with model.optimizer alone "
            "(self.optimizer.apply(grads, self.trainable_variables) in train_step), or "
            "train the model with model.fit."
        )


def _public_attributes(model: keras.Model) -> dict[str, Any]:
    """The model's public attributes, shallow (Keras keeps its own state private or in
    variables), to find plain Python values a probing ``train_step`` changes; not
    torch's ``training`` flag (``self.train()``), which Keras's steps do not read."""
    return {k: v for k, v in vars(model).items() if not k.startswith("_") and k != "training"}


def _restore_attributes(model: keras.Model, before: Mapping[str, Any]) -> list[str]:
    """Put back the public attributes holding plain Python values (a counter) that a
    probing ``train_step`` set or changed: state warmfit cannot save. Their names."""

    def plain(v: Any) -> bool:
        return v is None or isinstance(v, (bool, int, float, str))

    after, missing = _public_attributes(model), object()
    changed = []
    for k in sorted({*before, *after}):
        old, new = before.get(k, missing), after.get(k, missing)
        if old is new or not (plain(old) or plain(new)):
            continue
        if not (plain(old) and plain(new) and old == new):
            changed.append(k)
    for k in changed:
        if k in before:
            setattr(model, k, before[k])
        else:
            delattr(model, k)
    return changed


def _pack(xb: Any, yb: Any) -> Any:
    """A batch as ``model.fit`` hands it to ``train_step``/``test_step``."""
    return xb if yb is None else (xb, yb)


def _compute_loss(model: keras.Model, xb: Any, yb: Any, y_pred: Any, *, training: bool) -> Any:
    """``model.compute_loss`` as Keras's own steps call it (``Trainer._compute_loss``:
    positional arguments, ``sample_weight=None``, ``training`` only where an override
    takes it), so an override with Keras's documented signature works."""
    call = getattr(model, "_compute_loss", None)
    if call is None:  # before Keras 3.3
        return model.compute_loss(xb, yb, y_pred, None)
    return call(x=xb, y=yb, y_pred=y_pred, sample_weight=None, training=training)


def _pythonify(logs: Any) -> dict[str, Any]:
    """A step's logs flattened as Keras does (a dict result, e.g. the compiled
    metrics', becomes top-level entries)."""
    from keras.src.utils.python_utils import pythonify_logs

    return pythonify_logs(logs)


def _logs_problem(logs: Any, *, loss: bool) -> str | None:
    """What is wrong with the logs a step returned: not a dict; without a scalar
    ``loss`` (``loss=True``); an entry that is not a scalar."""
    if not isinstance(logs, Mapping):
        return f"returned {type(logs).__name__}, not a dict of logs"
    if loss:
        if "loss" not in logs:
            return f"returned logs without 'loss': {sorted(map(str, logs))}"
        shape = tuple(getattr(logs["loss"], "shape", ()))
        return None if math.prod(shape) == 1 else f"returned a 'loss' of shape {shape}"
    for k, v in logs.items():
        items = v.items() if isinstance(v, Mapping) else [(k, v)]
        for name, value in items:
            shape = tuple(getattr(value, "shape", ()))
            if math.prod(shape) != 1 or isinstance(value, (str, bytes, Mapping)):
                return f"returned {name!r} of shape {shape}, not a scalar"
    return None


_COUNTER = re.compile(r"^(.*?)(?:_(\d+))?$")


def _canonical_names(paths: list[str]) -> list[str]:
    """Variable paths without process-wide auto-numbering: each path component is
    renumbered by first appearance within this model (``sequential_1/dense_2/kernel`` ->
    ``sequential/dense/kernel``); duplicates that remain get ``#k``."""
    seen: dict[str, dict[str, str]] = {}
    out: list[str] = []
    used: set[str] = set()
    for path in paths:
        parts = []
        for comp in path.split("/"):
            base = _COUNTER.match(comp).group(1)  # type: ignore[union-attr]
            names = seen.setdefault(base, {})
            if comp not in names:
                names[comp] = base if not names else f"{base}_{len(names)}"
            parts.append(names[comp])
        name, k = "/".join(parts), 1
        while name in used:
            name, k = f"{'/'.join(parts)}#{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def _flat_path(path: str) -> str:
    return path.replace("/", "_")


def _optimizer_names(paths: list[str], by_flat: Mapping[str, str]) -> list[str]:
    """Optimizer variable names: ``iteration``, ``learning_rate``, and each slot as
    ``<canonical model variable>/<slot>`` (Keras names slots ``<flat path>_<slot>``)."""
    out, used = [], set()
    flats = sorted(by_flat, key=len, reverse=True)
    for path in paths:
        name = path.split("/", 1)[-1]  # drop the optimizer's own (auto-numbered) scope
        for flat in flats:
            if name.startswith(flat + "_"):
                name = f"{by_flat[flat]}/{name[len(flat) + 1 :]}"
                break
        base, k = name, 1
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def _compiled_metrics(model: keras.Model) -> Any:
    config = getattr(model, "_compile_config", None)
    return None if config is None else config.config.get("metrics")


def _no_grad() -> Any:
    """No autograd graph while evaluating (torch records one for eager calls)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _seed_dtype() -> str:
    from keras.src.backend import random_seed_dtype

    return random_seed_dtype()


def _global_seed_generator() -> Any:
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute(_GLOBAL_SEED_GENERATOR)


def _set_global_seed_generator(gen: Any) -> None:
    from keras.src.backend.common import global_state

    global_state.set_global_attribute(_GLOBAL_SEED_GENERATOR, gen)


def _to_numpy(v: Any) -> np.ndarray:
    """A variable's value as an array of the same shape (0-d stays 0-d)."""
    value = v.value
    if keras.backend.backend() == "torch" and value.device.type == "cpu":
        arr = value.detach().numpy()  # a view, as state_tensors promises where possible
    else:
        arr = np.asarray(keras.ops.convert_to_numpy(value))
    if tuple(arr.shape) != tuple(v.shape):
        arr = arr.reshape(tuple(v.shape))
    return arr


def _torch_value(v: Any) -> Any:
    """A variable's live torch tensor (Keras's torch backend), shaped like the variable;
    bfloat16 as float32, as ``convert_to_numpy`` gives it."""
    t = v.value
    if tuple(t.shape) != tuple(v.shape):
        t = t.reshape(tuple(v.shape))
    return t.float() if str(t.dtype) == "torch.bfloat16" else t


def _input_spec(model: keras.Model) -> str | None:
    """What the model takes, for a message: its one input as ``(None, 8) float32 (the
    model's input)``, several as ``{'a': (None, 8) float32, ...} (the model's inputs)``;
    None if it has no symbolic inputs (a subclassed model)."""
    try:
        inputs = model.inputs
    except Exception:  # subclassed models have no symbolic inputs
        return None
    if not isinstance(inputs, (list, tuple)) or not inputs:
        return None
    if len(inputs) == 1:
        return f"{tuple(inputs[0].shape)} {inputs[0].dtype} (the model's input)"
    struct = _input_struct(model)
    if isinstance(struct, (list, tuple)) and all(isinstance(t, keras.KerasTensor) for t in struct):
        struct = {t.name: t for t in struct}  # what a dict of them is keyed by
    return None if struct is None else f"{_describe(struct)} (the model's inputs)"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(err: Exception) -> str:
    """The line of a Keras error that says what is wrong (Keras wraps it in a header and
    a list of the call's arguments, with terminal colour codes)."""
    text = str(err)
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        text = err.args[0]  # str() of a KeyError is the repr of its message
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Exception encountered when")]
    return lines[0] if lines else repr(err)


def _section(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _as_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(keras.ops.convert_to_numpy(a)) if keras.ops.is_tensor(a) else np.asarray(a)
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise TypeError(f"{name} must be numeric (a NumPy array or tensor). Got dtype {arr.dtype}.")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr


# -- structures of arrays (several inputs) ---------------------------------------------------
def _is_tree(x: Any) -> bool:
    """Whether ``x`` (or ``y``) is a structure of arrays rather than one array-like, as
    ``model.fit`` reads it: a dict, or a tuple or list whose first element is an array, a
    tensor or a structure (nested lists of numbers are one array, as for NumPy)."""
    if isinstance(x, Mapping):
        return True
    if isinstance(x, (tuple, list)) and len(x):
        head = x[0]
        return isinstance(head, np.ndarray) or keras.ops.is_tensor(head) or _is_tree(head)
    return False


def _tree_map(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """``tree`` with ``fn`` applied to every leaf; a dict stays a dict (its order kept), a
    named tuple its type."""
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        parts = [_tree_map(fn, v) for v in tree]
        if isinstance(tree, list):
            return parts
        return type(tree)(*parts) if hasattr(tree, "_fields") else tuple(parts)
    return fn(tree)


def _leaves(tree: Tree, root: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of every leaf, a dict's keys in sorted order: ``x['ids']``,
    ``x[0][1]`` (the torch backend's paths and order, so a fingerprint is the same)."""
    if isinstance(tree, Mapping):
        return [leaf for k in sorted(tree, key=str) for leaf in _leaves(tree[k], f"{root}[{k!r}]")]
    if isinstance(tree, (tuple, list)):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{root}[{i}]")]
    return [(root, tree)]


def _as_tree(x: Any, name: str) -> Tree:
    """``x`` with every leaf a numeric NumPy array (:func:`_as_array`, named by its path);
    one array-like stays one array."""
    if isinstance(x, Mapping):
        return {k: _as_tree(v, f"{name}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (tuple, list)) and _is_tree(x):
        parts = [_as_tree(v, f"{name}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, list):
            return parts
        return type(x)(*parts) if hasattr(x, "_fields") else tuple(parts)
    return _as_array(x, name)


def _rows(tree: Tree, name: str) -> int | None:
    """The number of rows of one array (None for a scalar: :func:`check_samples` says
    so), or of every leaf of a structure: a ``ValueError`` naming each leaf and its length
    if they differ, a leaf without a first dimension, or a structure without leaves."""
    if not isinstance(tree, (Mapping, tuple, list)):
        return len(tree) if tree.ndim else None
    found = _leaves(tree, name)
    if not found:
        raise ValueError(
            f"{name} is an empty {type(tree).__name__}: it holds no arrays. Expected one "
            "array per input of the model."
        )
    return leaf_rows(found, name)


def _take(tree: Tree, idx: Any) -> Tree:
    """The rows ``idx`` of every leaf: one ``keras.ops.take`` per leaf."""
    if isinstance(tree, (Mapping, tuple, list)):
        return _tree_map(lambda t: keras.ops.take(t, idx, axis=0), tree)
    return keras.ops.take(tree, idx, axis=0)


def _head(tree: Tree, start: int, stop: int) -> Tree:
    """The rows ``start:stop`` of every leaf (a view)."""
    if isinstance(tree, (Mapping, tuple, list)):
        return _tree_map(lambda t: t[start:stop], tree)
    return tree[start:stop]


def _join(parts: list[Tree]) -> Tree:
    """The batches' outputs joined along the first axis, leaf by leaf (in the structure
    of the first batch's)."""
    head = parts[0]
    if isinstance(head, Mapping):
        return {k: _join([p[k] for p in parts]) for k in head}
    if isinstance(head, (tuple, list)):
        joined = [_join([p[i] for p in parts]) for i in range(len(head))]
        return joined if isinstance(head, list) else tuple(joined)
    return np.concatenate(parts)


def _describe(tree: Tree) -> str:
    """Shapes and dtypes, for a message: ``(64, 8) float32``, ``{'a': (64, 8) float32,
    'b': (64, 4) int64}``, ``[(64, 8) float32, ...]``; a model input as Keras shows it,
    ``(None, 8) float32``."""
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        inner = ", ".join(_describe(v) for v in tree)
        return f"({inner})" if isinstance(tree, tuple) else f"[{inner}]"
    return f"{tuple(tree.shape)} {tree.dtype}"


def _input_struct(model: keras.Model) -> Any:
    """The structure of the model's inputs as its graph was built — a functional model's
    ``model.input`` (symbolic tensors in dicts, lists and tuples), a Sequential's one
    input — or None where there is none to compare with (a subclassed model)."""
    from keras.src.models.functional import Functional

    if isinstance(model, Functional):
        return model.input
    if isinstance(model, keras.Sequential):
        try:
            inputs = model.inputs
        except Exception:  # built with model.build(shape): no symbolic input to name
            return None
        return inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else None
    return None


def _inputs_problem(x: Tree, struct: Any, path: str) -> str | None:
    """What keeps ``x`` (at ``path``) from being the model's inputs ``struct``, level by
    level, as ``model.fit`` would pair them: a dict whose keys are not the input names
    (Keras's rule: a functional model built from a list of inputs takes a dict keyed by
    their ``keras.Input(name=...)``; one built from a dict, that dict's keys), a list or
    tuple of another length than the inputs there, one array for several inputs. None
    when they match; Keras's own errors beyond that are the probe's."""
    if isinstance(struct, Mapping):
        by_name = dict(struct)
        order = [struct[k] for k in sorted(struct)]  # a list pairs with the sorted keys
    elif isinstance(struct, (list, tuple)):
        order = list(struct)
        named = all(isinstance(t, keras.KerasTensor) for t in struct)
        by_name = {t.name: t for t in struct} if named else {}
    else:  # one input, named as its keras.Input
        order, by_name = [struct], {struct.name: struct}
    names = list(by_name)
    if isinstance(x, Mapping):
        if not by_name:  # a nested list of inputs: Keras pairs no dict with it
            return None
        got = list(x)
        if set(got) != set(names):
            missing = [k for k in names if k not in got]
            extra = [k for k in got if k not in by_name]
            why = "; ".join(
                f"{w} {v}" for w, v in (("missing", missing), ("not inputs", extra)) if v
            )
            return (
                f"The keys of {path} are not the model's input names: expected "
                f"{sorted(names, key=str)}, got {sorted(got, key=str)} ({why}). Pass {path} as "
                "a dict with exactly these keys, one array per input (the names given to "
                "keras.Input(name=...), or the keys of the dict the model was built with)."
            )
        pairs = [(x[k], by_name[k], f"{path}[{k!r}]") for k in names]
    elif isinstance(x, (tuple, list)):
        if len(x) != len(order):
            stack = " (a list of rows of one input? Stack them: np.stack(x).)"
            return (
                f"{path} is a {type(x).__name__} of {_count(len(x), 'array')}, but "
                f"{_takes(path)} {_count(len(order), 'input')}{_named(names)}: expected one "
                f"array per input, in the model's order. Pass {_count(len(order), 'array')}, "
                "or a dict keyed by the input names." + (stack if len(order) == 1 else "")
            )
        pairs = [(v, s, f"{path}[{i}]") for i, (v, s) in enumerate(zip(x, order, strict=True))]
    else:
        if len(order) == 1:
            return None
        return (
            f"{path} is one array {_describe(x)}, but {_takes(path)} "
            f"{_count(len(order), 'input')}{_named(names)}: pass a dict keyed by the input "
            f"names, or a list of {len(order)} arrays in the model's order."
        )
    for v, s, p in pairs:
        if not isinstance(s, keras.KerasTensor) or isinstance(v, (Mapping, tuple, list)):
            problem = _inputs_problem(v, s, p)
            if problem is not None:
                return problem
    return None


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _takes(path: str) -> str:
    return "the model has" if path == "x" else f"the model takes at {path}"


def _named(names: list[str]) -> str:
    return f" {names}" if names else ""


def _name(obj: object) -> str:
    return getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _torch_device_type() -> str:
    """The device type Keras's torch backend computes on."""
    from keras.src.backend.torch.core import get_device

    return str(get_device()).split(":")[0]
