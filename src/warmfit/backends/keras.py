"""Keras 3 backend: a ``keras.Model`` (or a factory of one), an optimizer and a loss.

Owns, for a Keras model: building and re-initialising it from the seed, its optimizer
(a fresh one of the same config on ``warm``/``restart``), the probe that refuses data the
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
from .base import NonFiniteLoss, check_keys, check_samples

_GLOBAL_SEED_GENERATOR = "global_seed_generator"  # keras.src.random.seed_generator


class ArrayData:
    """Training arrays: the source NumPy arrays and their backend tensors."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None) -> None:
        self.x_np, self.y_np = x, y
        self.x = keras.ops.convert_to_tensor(x)
        self.y = None if y is None else keras.ops.convert_to_tensor(y)

    def __len__(self) -> int:
        return len(self.x_np)


class KerasBackend:
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
    ) -> None:
        if isinstance(model, keras.Model):
            self.model_factory: Callable[[], keras.Model] | None = None
            self.model: keras.Model = model
        elif callable(model):
            self.model_factory, self.model = model, None  # type: ignore[assignment]
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
        if self.model is not None:
            self._check_model(self.model)

    # -- construction, warm and restart --------------------------------------------
    def init_model(self, seed: int, *, first: bool) -> None:
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

    def init_optimizer(self, schedule: Any) -> None:
        model = self.model
        if self._fresh_optimizer is None:  # the first time: decide what the optimizer is
            self._setup_compile(model)
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
        if loss is None:
            raise ValueError(
                "The Keras model has no loss. Pass loss='sparse_categorical_crossentropy' "
                "(or a keras loss) to Trainer, or compile the model with one."
            )
        if opt_arg is not None or self.loss_arg is not None or self.metrics_arg is not None:
            metrics = self.metrics_arg
            if metrics is None and compiled:
                metrics = _compiled_metrics(model)  # keep the user's
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        self.loss_name = loss if isinstance(loss, str) else _name(loss)

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
        xa, ya = _as_array(x, "x"), None if y is None else _as_array(y, "y")
        check_samples(x, len(xa) if xa.ndim else None, None if ya is None else len(ya))
        return ArrayData(xa, ya)

    def subset(self, data: ArrayData, rows: np.ndarray) -> ArrayData:
        return ArrayData(data.x_np[rows], None if data.y_np is None else data.y_np[rows])

    def fingerprint(self, data: ArrayData) -> tuple[str, list[int]]:
        return fingerprint(data.x_np, data.y_np), list(data.x_np.shape)

    def batches(
        self, data: ArrayData, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        order_t = keras.ops.convert_to_tensor(order)
        take = keras.ops.take
        for start in range(offset, len(order), batch_size):
            idx = order_t[start : start + batch_size]
            yield (take(data.x, idx, axis=0), None if data.y is None else take(data.y, idx, axis=0))

    _seed = 0  # set by the Trainer; unused (no loader workers)

    def check_data(self, data: ArrayData, *, with_target: bool, what: str) -> None:
        """Run the model (and the loss) on the first two rows in inference mode: a
        mismatch of features, dtypes or targets is a ValueError naming the data before
        anything changes, not a Keras error in the middle of an epoch; so is a model whose
        layers build themselves on that call (``model.build`` of a subclassed model
        does not build its layers).

        Changes nothing: Python's, NumPy's, Keras's global and torch's random streams and
        the model's non-trainable variables (every ``SeedGenerator`` state, statistics)
        are put back afterwards, for layers that draw or count even in inference mode.
        """
        model = self.model
        xb = data.x[:2]
        yb = None if data.y is None else data.y[:2]
        host = (random.getstate(), np.random.get_state())
        streams = self.capture_rng()
        known = {id(v) for v in model.variables}
        fixed = [(v, np.array(_to_numpy(v), copy=True)) for v in model.variables if not v.trainable]
        try:
            with _no_grad():
                out = model(xb, training=False)
                if with_target:
                    loss = model.compute_loss(x=xb, y=yb, y_pred=out, training=False)
                    if loss is None or math.prod(loss.shape) != 1:
                        raise ValueError(f"the loss returned {loss!r}, not a scalar")
        except Exception as err:  # any failure here is the data's or the model's
            x_desc = f"x {tuple(data.x_np.shape)} {data.x_np.dtype}"
            y_desc = "None" if data.y_np is None else f"{tuple(data.y_np.shape)} {data.y_np.dtype}"
            got = f"{x_desc}, y {y_desc}"
            spec = _input_spec(model)
            if spec is not None:
                got = f"expected x {spec} (the model's input), got {got}"
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
        created = [v.path for v in model.variables if id(v) not in known]
        if created:  # a layer built itself on this call: the optimizer does not know it
            raise ValueError(
                "The Keras model is not fully built: expected no new variables when it is "
                f"called, got {created} on {what} x {tuple(data.x_np.shape)} "
                f"{data.x_np.dtype}. Build every layer before handing the model to warmfit: "
                "give it a keras.Input, or call it once on a batch (model(x[:1]))."
            )

    # -- training --------------------------------------------------------------------
    def train_mode(self, training: bool) -> None:
        self._training = training  # Keras takes ``training=`` per call

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
        """A warmfit schedule cannot drive an optimizer whose LR is a Keras schedule."""
        if schedule is not None:
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
        return self._torch_step(xb, yb)

    def _torch_step(self, xb: Any, yb: Any) -> Any:
        """Keras's ``TorchTrainer.train_step`` without per-step metrics."""
        import torch

        model, optimizer = self.model, self.optimizer
        y_pred = model(xb, training=True)
        loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=True)
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
        model = self.model
        model.reset_metrics()
        total, n = 0.0, len(data)
        for start in range(0, n, batch_size):
            xb = data.x[start : start + batch_size]
            yb = None if data.y is None else data.y[start : start + batch_size]
            y_pred = model(xb, training=False)
            loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=False)
            total += float(loss) * int(xb.shape[0])
            model.compute_metrics(xb, yb, y_pred)
        out = {"loss": total / n}
        for k, v in model.get_metrics_result().items():
            if k != "loss":
                out[k] = float(v)
        model.reset_metrics()
        return out

    def predict(self, x: Any, batch_size: int) -> np.ndarray:
        data = self.prepare(x, None)
        self.check_data(data, with_target=False, what="predict:")
        with _no_grad():
            outs = [
                keras.ops.convert_to_numpy(self.model(data.x[s : s + batch_size], training=False))
                for s in range(0, len(data), batch_size)
            ]
        return np.concatenate(outs)

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
    """The model's one input as ``(None, 8) float32``; None if it has no input spec (a
    subclassed model) or several."""
    try:
        inputs = model.inputs
    except Exception:  # subclassed models have no symbolic inputs
        return None
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 1:
        return None
    return f"{tuple(inputs[0].shape)} {inputs[0].dtype}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(err: Exception) -> str:
    """The line of a Keras error that says what is wrong (Keras wraps it in a header and
    a list of the call's arguments, with terminal colour codes)."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines()]
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
