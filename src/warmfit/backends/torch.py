"""PyTorch backend: an ``nn.Module``, an optimizer factory, and a loss or a step.

In-memory arrays, tensors and structures of them are moved to the device once per fit
call and batched by indexing with the epoch's permutation (one index tensor per epoch,
sliced per step); map-style ``Dataset``s go through a ``DataLoader`` driven by warmfit's
batch sampler, starting at the cursor's offset (the data side: :mod:`.torch_data`).
Losses stay on the device and are read once per epoch, except on the CPU, where reading
one is free and lets a NaN be caught before the optimizer step.

The step: ``loss(model(x), y)`` by default (``model(**x)`` for a dict x, ``model(*x)``
for a tuple); with ``loss=None`` the output's ``.loss`` (the Hugging Face convention);
with ``step=fn`` the user's ``fn(model, batch) -> loss``. Either way warmfit does the
rest: ``zero_grad``, ``backward``, the optimizer and scheduler steps.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import inspect
import math
import numbers
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import nn

from .. import jsonstate
from ..data import epoch_batches, shard
from ..distributed import DistContext
from ..errors import StateMismatchError, invalid_param
from ..schedules import TorchScheduler
from ..state import derive_seed
from .base import Backend, NonFiniteLoss, check_keys, check_samples
from .torch_data import (
    DatasetData,
    OrderSampler,
    SeededSamples,
    TensorData,
    Tree,
    as_tree,
    call_model,
    check_item,
    compose,
    count_rows,
    dataset_fingerprint,
    describe,
    forward_problem,
    isolated_streams,
    item_error,
    join_outputs,
    kind_of,
    pick,
    refuse_stream,
    rows_of,
    split,
    take,
    tensor_fingerprint,
    to_device,
    tree_rows,
)
from .torch_step import EMA, EpochStats, Precision, StepOptions, micro_batches

#: Read by tests/test_dataset_workers.py under its former name.
_SeededSamples = SeededSamples

_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "nll": nn.NLLLoss,
}


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max (or >0 for one output) equals the target."""
    if pred.ndim > 1 and pred.shape[-1] > 1:
        hit = pred.argmax(dim=-1) == target
    else:
        hit = (pred.reshape(-1) > 0).to(target.dtype) == target.reshape(-1)
    return hit.float().mean()


_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"accuracy": accuracy}

# What a torch scheduler factory must build: the methods warmfit calls.
_SCHEDULER_METHODS = ("step", "state_dict", "load_state_dict")

class HostSnapshot:
    """Reused host buffers for background saving, filled from torch tensors.

    :meth:`copy` copies each tensor into a host tensor of the same dtype and shape,
    allocated on first use (again if the dtype or shape changes) and then reused, and
    returns NumPy views of those buffers (bfloat16 as int16 bits, like
    :func:`_to_numpy`). For tensors on a GPU the buffers are pinned (page-locked): every
    copy is queued with ``non_blocking=True`` on the current stream, after the work
    that produced the tensor, and one synchronisation per device waits for them all —
    instead of a pageable ``.cpu()`` per tensor, each a synchronisation and a fresh
    allocation. On the CPU it is one ``copy_`` per tensor.

    The returned arrays *are* the buffers: the next :meth:`copy` overwrites them (the
    same contract as :class:`warmfit.background.SnapshotBuffers`).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        buffers: dict[str, torch.Tensor] = {}
        devices: set[torch.device] = set()
        for name, t in tensors.items():
            pinned = t.device.type == "cuda"
            buf = self._buffers.get(name)
            if (
                buf is None
                or buf.shape != t.shape
                or buf.dtype != t.dtype
                or (pinned and not buf.is_pinned())
            ):
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
            buf.copy_(t.detach(), non_blocking=pinned)
            if pinned:
                devices.add(t.device)
            buffers[name] = buf
        for device in devices:
            torch.cuda.synchronize(device)
        self._buffers = buffers
        return {name: _to_numpy(buf) for name, buf in buffers.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for b in self._buffers.values())

    @property
    def pinned(self) -> bool:
        """Whether every buffer is pinned (False when there are none)."""
        return bool(self._buffers) and all(b.is_pinned() for b in self._buffers.values())


class TorchBackend(Backend):
    framework = "torch"
    _last_loss: torch.Tensor | None = None  # the previous step's loss (see train_step)
    _snapshot: HostSnapshot | None = None  # made by the first snapshot_tensors()
    _no_rows: tuple[Tree, Tree | None] | None = None  # see _zero_rows

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        *,
        optimizer: Callable[[Any], torch.optim.Optimizer],
        loss: Callable[..., torch.Tensor] | str | None = None,
        step: Callable[[Any, Any], torch.Tensor] | None = None,
        metrics: Any = (),
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        precision: str = "32",
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
        ema: float | None = None,
        ema_warmup: bool = False,
        use_ema: bool | None = None,
    ) -> None:
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "The 'optimizer' parameter of Trainer must be a factory params -> "
                "torch.optim.Optimizer, e.g. lambda params: torch.optim.Adam(params, lr=1e-3), "
                f"so that 'warm' and 'restart' can build a fresh one. Got {optimizer!r} instead."
            )
        _check_step(step, loss, metrics)
        options = StepOptions.checked(precision, accumulate, clip_grad_norm, ema, ema_warmup)
        if use_ema and options.ema is None:
            raise ValueError("use_ema=True needs an EMA of the weights: pass ema=<decay> too.")
        self.device = _check_device(device)
        self.dist = DistContext.from_env(self.device)
        self.device = self.dist.device
        # The training step's options (torch_step): the plain step when all are default.
        self.step_options, self._plain = options, options == StepOptions()
        self.use_ema = options.ema is not None and use_ema is not False
        self.precision = Precision(options.precision, self.device)
        self.ema: EMA | None = None  # built with the model (init_model)
        self.stats = EpochStats(self.device)
        self.last_grad_norm: torch.Tensor | None = None
        self.ddp: nn.Module | None = None
        self.optimizer_factory = optimizer
        self.factory_takes = factory_takes(optimizer)
        self.step = step
        self.loss_fn = _resolve_loss(loss)
        self.loss_name = None if loss is None else loss if isinstance(loss, str) else _name(loss)
        self.metrics = _resolve_metrics(metrics)
        self.num_workers = num_workers
        self.model_factory = None if isinstance(model, nn.Module) else model
        if self.model_factory is None:
            self.model: nn.Module = model.to(self.device)  # type: ignore[union-attr]
        elif callable(model):
            self.model = None  # type: ignore[assignment]  # built by init_model
        else:
            raise TypeError(
                "The 'model' parameter of Trainer must be a torch.nn.Module or a zero-argument "
                f"factory returning one. Got {model!r} instead."
            )
        self.initial: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # Read from each fresh optimizer before a scheduler touches it (init_optimizer):
        # its settings (describe) and its groups' learning rates (set_learning_rate).
        self._built: dict[str, Any] = {"class": "NoneType", "hyper": []}
        self._set_factory_lr([])
        self.scheduler: Any = None
        self.scheduler_interval = "step"
        # On the CPU reading a loss is free, so a NaN is caught before the optimizer
        # step. Under DDP a rank cannot stop alone: losses are read at readout points.
        self.check_each_step = self.device.type == "cpu" and not self.dist.active

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle: everything but the previous step's loss (a
        graph's output, which deepcopy refuses; the next step replaces it) and the host
        buffers of background saves (rebuilt by the next save)."""
        state = self.__dict__.copy()
        state.pop("_last_loss", None)
        state.pop("_snapshot", None)
        return state

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def rank(self) -> int:
        return self.dist.rank

    def any_rank(self, flag: bool) -> bool:
        return self.dist.any_rank(flag)

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        return self.dist.gather_bytes(payload)

    def barrier(self) -> None:
        self.dist.barrier()

    # -- construction, warm and restart --------------------------------------------
    def init_model(self, seed: int, *, first: bool) -> None:
        self.seed = seed
        self._last_loss = None
        if self.model_factory is not None:
            # Seed the CPU generator (and CUDA's, for a factory that builds on the GPU)
            # inside fork_rng, so the user's streams are left as they were. Not
            # torch.manual_seed: it also queues lazy seeding of every accelerator
            # backend, each capturing a stack trace (~5 ms per call on the CPU).
            init_seed = derive_seed(seed, "init")
            cuda = torch.cuda.is_available()
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
                torch.default_generator.manual_seed(init_seed)
                if cuda:
                    torch.cuda.manual_seed_all(init_seed)
                fresh = self.model_factory()
            if not isinstance(fresh, nn.Module):
                raise TypeError(f"The model factory must return a torch.nn.Module. Got {fresh!r}.")
            if self.model is None:
                self.model = fresh.to(self.device)
            else:  # keep the user's object: load the fresh weights into it
                with torch.no_grad():
                    self.model.load_state_dict(fresh.state_dict())
        elif first:
            self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            assert self.initial is not None
            with torch.no_grad():
                self.model.load_state_dict(self.initial)
        # A tensor no checkpoint can hold exactly is refused now, not at the first save.
        _storable({f"model/{k}": v for k, v in self.model.state_dict().items()})
        if self.step_options.ema is not None:  # a new run's average starts at its weights
            if self.ema is None:
                self.ema = EMA(self.model, self.step_options.ema, self.step_options.ema_warmup)
            else:
                self.ema.reset(self.model)
        if self.dist.active and self.ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            # Release the wrapper before the process group ends (atexit runs handlers in
            # reverse order: this one before the group's). A DDP wrapper that outlives
            # its group is destroyed during interpreter teardown, which can abort.
            atexit.register(_release, weakref.ref(self))

    def close(self) -> None:
        """Drop the DDP wrapper (and its hold on the process group)."""
        self._last_loss = None
        if self.ddp is not None:
            self.ddp = None
            gc.collect()

    def check_mode(self, mode: str) -> None:
        """Refuse, before anything changes, a fit call that would differ from what it
        says without a word: one made under a global torch mode
        (:func:`check_global_modes`); a ``continue`` on a model whose parameters are not
        those the optimizer was built over (a module added since would never train); a
        ``restart`` that cannot rebuild the model as it is now; fp16 gradient scaling of
        float16 weights (torch's scaler refuses them in the middle of the first step)."""
        check_global_modes(self.device.type)
        if self.precision.scaler is not None:
            half = [n for n, p in self.model.named_parameters() if p.dtype == torch.float16]
            if half:
                raise ValueError(
                    f"precision='fp16' scales the gradients of weights kept in float32 (mixed "
                    f"precision), but this model's weights are float16 ({half[0]}"
                    f"{', ...' if len(half) > 1 else ''}), whose gradients torch's scaler "
                    "cannot unscale. Keep the weights in float32 (autocast computes in "
                    "float16), or train the float16 model with precision='32'."
                )
        names = [name for name, _ in self.model.named_parameters()]
        if mode == "continue" and names != self._optimized:
            added = [n for n in names if n not in self._optimized]
            gone = [n for n in self._optimized if n not in names]
            raise ValueError(
                "The model's parameters changed since its optimizer was built"
                + (f"; added: {added}" if added else "")
                + (f"; removed: {gone}" if gone else "")
                + (". " if added or gone else " (their order). ")
                + "The optimizer would never train the new ones, and a checkpoint of this "
                "state could not be resumed. Fit with mode='warm' to build a fresh optimizer "
                "over the model as it is (the weights are kept), or mode='restart'."
            )
        if mode == "restart":
            self._check_restart()
        numerics = _numerics()
        if mode == "continue" and self._numerics not in (None, numerics):
            diffs = [
                f"{k}: {self._numerics[k]!r} then, {v!r} now"
                for k, v in numerics.items()
                if self._numerics[k] != v
            ]
            raise ValueError(
                f"torch's global numerics changed since the previous fit call ({'; '.join(diffs)})"
                ": a 'continue' would not compute what the uninterrupted run computes. Set "
                "them back (torch.set_float32_matmul_precision, torch.set_default_dtype), or "
                "fit with mode='warm' to continue on purpose under the new ones."
            )
        self._numerics = numerics

    def _check_restart(self) -> None:
        """Refuse a restart whose initial weights no longer fit the model (a module added
        to it, a factory that now builds another model, e.g. under another default
        dtype): it would fail half-way, or train another model."""
        own = self.model.state_dict()
        if self.model_factory is None:
            initial = self.initial or {}
            what = "the initial weights the Trainer kept"
        else:
            with isolated_streams([], seed=0):  # its values do not matter here
                initial = self.model_factory().state_dict()
            what = "the model the factory builds now"
        diffs = sorted(set(own) ^ set(initial)) + [
            f"{k}: {initial[k].dtype}{list(initial[k].shape)} vs {own[k].dtype}{list(own[k].shape)}"
            for k in sorted(set(own) & set(initial))
            if (initial[k].shape, initial[k].dtype) != (own[k].shape, own[k].dtype)
        ]
        if diffs:
            raise ValueError(
                f"mode='restart' rebuilds the model from {what}, which no longer matches "
                f"the model: {diffs[:8]}. Build a new Trainer for the changed model (a "
                "restart makes the trainer a fresh one of the same model)."
            )

    def set_deterministic(self) -> Callable[[], None]:
        """``Trainer(deterministic=True)``: torch's deterministic algorithms for a fit call;
        returns what puts the previous setting back."""
        return use_deterministic_algorithms()

    def init_optimizer(self, schedule: Any) -> None:
        """A fresh optimizer from the factory, and its scheduler. What the factory built
        is recorded first, before a scheduler changes it (OneCycleLR and CyclicLR set the
        rate and momentum): :meth:`describe` reports those settings and
        :meth:`set_learning_rate` keeps the groups' learning-rate ratios."""
        optimizer = self._fresh_optimizer()
        built = _built_settings(optimizer)
        scheduler = self._build_scheduler(schedule, optimizer)  # may raise: nothing changed
        self.optimizer, self.scheduler = optimizer, scheduler
        self._optimized = [name for name, _ in self.model.named_parameters()]
        self._built = built[0]
        self._set_factory_lr(built[1])
        self.scheduler_interval = getattr(schedule, "interval", "step")
        # The gradient scaler belongs to the optimizer it scales for: fresh with it
        # (warm, restart); the epoch's statistics start again with the new regime.
        self.precision = Precision(self.step_options.precision, self.device)
        self.stats.reset()

    def _fresh_optimizer(self) -> torch.optim.Optimizer:
        """The factory's optimizer, over what the factory asks for (:func:`factory_takes`):
        the module, its named parameters, or its parameters."""
        given: Any = self.model.parameters()
        if self.factory_takes == "model":
            given = self.model
        elif self.factory_takes == "named_parameters":
            given = list(self.model.named_parameters())
        optimizer = self.optimizer_factory(given)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "The optimizer factory must return a torch.optim.Optimizer. "
                f"Got {optimizer!r} instead."
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "torch.optim.LBFGS evaluates the model several times per step through a "
                "closure, and warmfit's step calls optimizer.step() once, without one. Use "
                "an optimizer that steps on one gradient (SGD, Adam, AdamW, ...)."
            )
        return optimizer

    def set_schedule(self, schedule: Any) -> None:
        """Called when ``fit(schedule=...)`` replaces the schedule (after
        :meth:`check_schedule`)."""
        assert self.optimizer is not None  # built at construction by init_optimizer
        self.scheduler = self._build_scheduler(schedule, self.optimizer)
        self.scheduler_interval = getattr(schedule, "interval", "step")

    def check_schedule(self, schedule: Any) -> None:
        """Refuse a torch scheduler factory that does not build a scheduler, before the
        Trainer changes: it is tried on a throwaway optimizer from the factory (a
        scheduler changes its optimizer's rates)."""
        if isinstance(schedule, TorchScheduler) and self.model is not None:
            # (before init_model: init_optimizer builds it, with the same refusals)
            self._build_scheduler(schedule, self._fresh_optimizer())

    def _build_scheduler(self, schedule: Any, optimizer: torch.optim.Optimizer) -> Any:
        if not isinstance(schedule, TorchScheduler):
            return None
        why = (
            f" It was taken for one because {schedule.probe}; a step -> learning rate "
            "function must return a real number for every step >= 0, 0 included."
            if schedule.probe
            else ""
        )
        try:
            scheduler = schedule.factory(optimizer)
        except Exception as err:
            raise TypeError(
                f"The schedule {schedule.factory!r} is used as a factory optimizer -> torch "
                f"LRScheduler, but calling it with the optimizer raised "
                f"{type(err).__name__}: {err}.{why}"
            ) from err
        if not all(callable(getattr(scheduler, m, None)) for m in _SCHEDULER_METHODS):
            raise TypeError(
                f"The schedule {schedule.factory!r} is used as a factory optimizer -> torch "
                f"LRScheduler, but it returned {scheduler!r}, which has no "
                f"{'/'.join(_SCHEDULER_METHODS)}.{why}"
            )
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError(
                "torch's ReduceLROnPlateau needs the monitored metric at each step() and "
                "warmfit steps a torch scheduler without one. Use the callback "
                "warmfit.ReduceLROnPlateau (it keeps its state across calls and resumes) "
                "with a warmfit schedule or none."
            )
        # Its state must come back exactly: refused now, not at the first save.
        jsonstate.encode(scheduler.state_dict(), "scheduler")
        return scheduler

    def seeded_rng(self, seed: int) -> dict[str, np.ndarray]:
        # Rank 0's streams are those of a single process; other ranks get their own.
        extra = (self.dist.rank,) if self.dist.rank else ()
        gen = torch.Generator().manual_seed(derive_seed(seed, "torch", *extra))
        state = {"torch_cpu": gen.get_state().numpy().copy()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            cuda = torch.Generator(device=self.device).manual_seed(
                derive_seed(seed, "cuda", *extra)
            )
            state["cuda"] = cuda.get_state().numpy().copy()
        return state

    def capture_rng(self) -> dict[str, np.ndarray]:
        state = {"torch_cpu": torch.get_rng_state().numpy().copy()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device).numpy().copy()
        return state

    def install_rng(self, state: Mapping[str, np.ndarray]) -> None:
        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch_cpu"], dtype=np.uint8).copy()))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(
                torch.from_numpy(np.asarray(state["cuda"]).copy()), self.device
            )

    # -- data ------------------------------------------------------------------------
    def prepare(self, x: Any, y: Any) -> TensorData | DatasetData:
        refuse_stream(x)
        if isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor):
            if y is not None:
                raise ValueError(
                    "When x is a torch Dataset it must yield (input, target) pairs itself; "
                    "pass y=None."
                )
            if not hasattr(x, "__len__"):
                raise TypeError(
                    "warmfit needs a map-style Dataset with __len__ (got an iterable one)."
                )
            if len(x) == 0:
                raise ValueError(
                    f"x is a Dataset with no items (len(x) == 0): nothing to train on. Pass "
                    f"a Dataset with at least one item ({type(x).__name__} has none)."
                )
            return DatasetData(x)
        xt = as_tree(x, "x", self.device)
        yt = None if y is None else as_tree(y, "y", self.device)
        if torch.is_tensor(xt) and (yt is None or torch.is_tensor(yt)):
            check_samples(x, len(xt) if xt.ndim else None, None if yt is None else len(yt))
        else:  # a structure: every leaf has the same rows
            try:
                check_samples(x, tree_rows(xt, "x"), None if yt is None else tree_rows(yt, "y"))
            except ValueError as err:
                raise ValueError(f"{err}{_rows_hint(x)}") from None
        return TensorData(xt, yt)

    def subset(self, data: Any, rows: np.ndarray) -> Any:
        if isinstance(data, DatasetData):
            return DatasetData(torch.utils.data.Subset(data.dataset, rows.tolist()), data.probe)
        idx = torch.from_numpy(rows).to(self.device)
        return TensorData(pick(data.x, idx), None if data.y is None else pick(data.y, idx))

    def fingerprint(self, data: Any) -> tuple[str, list[int]]:
        if isinstance(data, DatasetData):  # its items' structure is checked here
            return dataset_fingerprint(data, self._cuda_devices(), split_it=self.step is None)
        return tensor_fingerprint(data)

    def batches(
        self, data: Any, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        if isinstance(data, DatasetData):
            yield from self._loader_batches(data, order, offset, batch_size, epoch)
            return
        x, y = data.x, data.y
        if self.dist.active:
            for idx in epoch_batches(order, batch_size, offset):
                local = torch.from_numpy(shard(idx, self.dist.rank, self.dist.world_size))
                local = local.to(self.device)
                yield (pick(x, local), None if y is None else pick(y, local), len(idx))
            return
        if offset >= len(order):
            return
        # The epoch's index batches are cut in one split, not a slice per step; and
        # index_select is x[idx] without the advanced-indexing machinery (the same rows,
        # the same bits: ~6 µs a step on a small MLP, 45 on a wide one). Only for
        # contiguous data: x[idx] keeps a channels-last layout, index_select does not.
        # A structure's leaves are cut the same way, each by the same index tensor.
        steps = torch.from_numpy(order[offset:]).to(self.device).split(batch_size)
        if not data.plain:
            for idx in steps:
                yield (take(x, idx), None if y is None else take(y, idx))
        elif x.is_contiguous() and (y is None or y.is_contiguous()):
            for idx in steps:
                yield (x.index_select(0, idx), None if y is None else y.index_select(0, idx))
        else:
            for idx in steps:
                yield (x[idx], None if y is None else y[idx])

    def _loader_batches(
        self, data: DatasetData, order: np.ndarray, offset: int, batch_size: int, epoch: int
    ) -> Iterator[Any]:
        # Each sample's randomness comes from (seed, epoch, index) (SeededSamples); the
        # loader's own generator, which seeds its workers, keeps it off the trainer's
        # global torch stream.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "loader", epoch, offset))
        sampler = OrderSampler(order, offset, batch_size, self.dist.rank, self.dist.world_size)
        loader = torch.utils.data.DataLoader(
            SeededSamples(data.dataset, self.seed, epoch),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            generator=gen,
            pin_memory=self.device.type == "cuda",
        )
        if not self.dist.active:
            for batch in loader:
                yield self._to_device(batch)
            return
        # Under DDP a short global batch can leave this rank no rows; it still takes the
        # step (DDP's collectives must match on every rank), on a batch of zero rows.
        loaded, self._no_rows = iter(loader), None
        for global_n, rows in sampler.shards():
            if len(rows):
                xb, yb = self._to_device(next(loaded))
                self._no_rows = (rows_of(xb, 0, 0), None if yb is None else rows_of(yb, 0, 0))
            else:
                xb, yb = self._zero_rows(data)
            yield xb, yb, global_n

    def _to_device(self, batch: Any) -> tuple[Tree, Tree | None]:
        """A collated batch on the device as (x, y-or-None): split by the default step's
        rule (:func:`~.torch_data.split`); whole, as x, for a ``step=``."""
        xb, yb = (batch, None) if self.step is not None else split(batch)
        return to_device(xb, self.device, True), None if yb is None else to_device(
            yb, self.device, True
        )

    def _zero_rows(self, data: DatasetData) -> tuple[Tree, Tree | None]:
        """A batch of zero rows shaped like the Dataset's: the last loaded batch's, or,
        before any (a global batch smaller than the world, a resume at an epoch's short
        last batch), sample 0's, read with every stream forked and fixed."""
        if self._no_rows is None:
            with isolated_streams(self._cuda_devices(), seed=0):
                item = torch.utils.data.default_collate([data.dataset[0]])
            xb, yb = self._to_device(item)
            self._no_rows = (rows_of(xb, 0, 0), None if yb is None else rows_of(yb, 0, 0))
        return self._no_rows

    _numerics: dict[str, str] | None = None  # torch's global numerics at the last fit call

    # -- training --------------------------------------------------------------------
    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def set_learning_rate(self, lr: float) -> None:
        """Set parameter group 0's learning rate to ``lr`` and every other group's to
        ``lr`` times its ratio to group 0 in the optimizer as the factory built it: a
        schedule drives group 0 and the other groups keep their ratio (what torch's
        ``LambdaLR`` does per group). The ratios are saved with the optimizer, so a
        ``continue`` keeps the checkpoint's and ``warm`` takes the factory's again. If the
        factory gave group 0 a rate of 0, every group gets ``lr``."""
        groups = self.optimizer.param_groups  # type: ignore[union-attr]
        lr = float(lr)
        if len(groups) == 1:
            groups[0]["lr"] = lr
            return
        self.check_lr_groups()
        for group, ratio in zip(groups, self._lr_ratios, strict=True):
            group["lr"] = lr * ratio

    def check_lr_groups(self) -> None:
        """Raise ``ValueError`` if the optimizer no longer has the parameter groups its
        factory built (one was added afterwards): :meth:`set_learning_rate` has no
        ratio for it. The Trainer calls this before a fit call changes anything."""
        n, built = len(self.optimizer.param_groups), len(self._lr_ratios)  # type: ignore[union-attr]
        if n != built and n > 1:
            raise ValueError(
                f"The optimizer has {n} parameter groups, but its factory built {built}. "
                "warmfit sets each group's learning rate from the ratios of the groups the "
                "factory built (and a checkpoint restores those groups): add parameter "
                "groups in the optimizer factory, not to the optimizer afterwards."
            )

    def _set_factory_lr(self, lrs: list[float]) -> None:
        """The groups' learning rates as the factory built them, and their ratios to
        group 0's (1.0 for group 0, exactly, so its rate is the schedule's to the bit)."""
        self._factory_lr = lrs
        first = lrs[0] if lrs else 0.0
        self._lr_ratios = [1.0] + [lr / first if first else 1.0 for lr in lrs[1:]]

    def learning_rate(self) -> float:
        """Parameter group 0's learning rate (the one a schedule drives)."""
        return _lr_value(self.optimizer.param_groups[0]["lr"])  # type: ignore[union-attr]

    def train_step(self, batch: Any) -> Any:
        if not self._plain:  # precision, accumulation, clipping or EMA: torch_step
            if self.dist.active:
                xs, ys, global_n = batch
                return self._full_step(xs, ys, global_n)
            return self._full_step(batch[0], batch[1], None)
        if self.dist.active:
            return self._ddp_step(*batch)
        xb, yb = batch
        if self.step is not None:  # the user's forward and loss, checked before any change
            loss = self._step_loss(self.step(self.model, xb if yb is None else (xb, yb)))
        else:  # model(x), model(**x) for a dict, model(*x) for a tuple or list
            out = (
                self.model(xb) if torch.is_tensor(xb)
                else self.model(**xb) if isinstance(xb, Mapping)
                else self.model(*xb)
            )  # fmt: skip
            loss = self.loss_fn(out, yb) if yb is not None else self.loss_fn(out)
        value: float | torch.Tensor
        if self.check_each_step:
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(value)
        else:
            value = loss.detach()
        self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        loss.backward()
        self.optimizer.step()  # type: ignore[union-attr]
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        # Held until the next step, as a hand-written loop's `loss` variable is: the
        # freed graph keeps the weights' AccumulateGrad nodes, which torch would
        # otherwise destroy and rebuild every step (~3 µs). No activation is kept.
        self._last_loss = loss
        return value

    def _full_step(self, xb: Tree, yb: Tree | None, global_n: int | None) -> Any:
        """One optimizer step with the step options (:mod:`.torch_step`): ``accumulate``
        micro-batches, each forward under autocast and its loss weighted by its share
        of the global batch (so the update is the gradient of the global batch's mean
        loss whatever ``accumulate`` and the world size, up to summation order), the
        scaler, clipping of the unscaled gradients, the optimizer step (skipped by the
        fp16 scaler on inf/NaN gradients), the EMA update. Under DDP the gradients are
        all-reduced once, at the last micro-batch (``no_sync`` on the others)."""
        opts, dist, scaler = self.step_options, self.dist, self.precision.scaler
        model = self.ddp if dist.active else self.model
        n = count_rows(xb)
        total = n if global_n is None else global_n
        self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        micro = micro_batches(n, opts.accumulate, keep_empty=dist.active)
        loss: torch.Tensor | None = None
        for i, (a, b) in enumerate(micro):
            xm, ym = rows_of(xb, a, b), None if yb is None else rows_of(yb, a, b)
            last = i == len(micro) - 1
            ddp: Any = self.ddp
            sync = ddp.no_sync() if dist.active and not last else contextlib.nullcontext()
            with sync:
                with self.precision.autocast():
                    mean = self._batch_loss(model, xm, ym, b - a)
                part = self._no_rows_part() if mean is None else mean * ((b - a) / total)
                scaled = part * dist.world_size if dist.active else part
                (scaled if scaler is None else scaler.scale(scaled)).backward()
            loss = part.detach() if loss is None else loss + part.detach()
        assert loss is not None
        value: float | torch.Tensor = loss
        if self.check_each_step:  # before the optimizer step: the last good step's state
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(value)
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # type: ignore[arg-type]
        norm = None
        if opts.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.clip_grad_norm)
        skipped = False
        if scaler is not None:
            scale = scaler.get_scale()  # a host sync, as the scaler's own inf check is
            scaler.step(self.optimizer)  # type: ignore[arg-type]
            scaler.update()
            skipped = scaler.get_scale() < scale  # the scale backs off only on inf/NaN
        else:
            self.optimizer.step()  # type: ignore[union-attr]
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.stats.add(None if skipped else norm, skipped)
        self.last_grad_norm = norm
        return value

    def _batch_loss(self, model: Any, xb: Tree, yb: Tree | None, rows: int) -> Any:
        """The mean loss of a (micro-)batch through ``model`` (the DDP wrapper under
        torchrun, whose forward runs even with no rows: it may be a collective); None
        for no rows."""
        if self.step is not None:
            returned = self.step(model, compose(xb, yb))
            return self._step_loss(returned) if rows else None
        out = call_model(model, xb)
        if not rows:
            return None
        return self.loss_fn(out, yb) if yb is not None else self.loss_fn(out)

    def _no_rows_part(self) -> torch.Tensor:
        """A rank's share when a short global batch left it no rows: zero, through every
        parameter (each times 0 before the sum: a float16 sum could overflow to inf), so
        that the all-reduce finds a gradient for each (a tensor, not sum's start 0: the
        optimizer refused a model without parameters)."""
        return cast(torch.Tensor, sum((p * 0.0).sum() for p in self.model.parameters()))

    def epoch_logs(self) -> dict[str, float]:
        """The epoch's pre-clip gradient norms (mean, max) and fp16 steps skipped."""
        logs = self.stats.logs(
            self.step_options.clip_grad_norm is not None, self.precision.scaler is not None
        )
        self.stats.reset()
        return logs

    def _step_loss(self, value: Any, *, training: bool = True) -> torch.Tensor:
        """What a ``step=`` returned, if it is a loss warmfit can train on: a 0-dim
        floating tensor (which, ``training``, requires grad); else :class:`StepError`
        naming what it returned, before the optimizer step."""
        if not (torch.is_tensor(value) and value.ndim == 0 and value.is_floating_point()):
            raise StepError(
                f"The step {_name(self.step)} returned {_returned(value)}; it must return "
                "the loss as a scalar tensor (0-dim, floating point), e.g. `return "
                "F.cross_entropy(model(x), y)` or `loss.mean()`. Nothing was trained on it."
            )
        if training and not value.requires_grad:
            raise StepError(
                f"The step {_name(self.step)} returned a loss that does not require grad "
                "(computed under torch.no_grad(), .detach()ed, or from no parameter), so "
                "no gradient can be computed from it. Return the loss computed from the "
                "model's output. Nothing was trained on it."
            )
        return value

    def _ddp_step(self, xb: Tree, yb: Tree | None, global_n: int) -> Any:
        """One step on this rank's shard of a global batch.

        DDP averages gradients over ranks; weighting each rank's mean loss by
        ``world * local_n / global_n`` makes that average the gradient of the mean loss
        over the whole global batch, whatever the split — so the batch composition and
        the update do not depend on the world size (up to float summation order). A
        ``step=`` gets the DDP wrapper as its model (call it as the model).
        """
        assert self.ddp is not None
        local_n = count_rows(xb)
        mean = self._batch_loss(self.ddp, xb, yb, local_n)  # DDP's forward even with no rows
        part = self._no_rows_part() if mean is None else mean * (local_n / global_n)
        self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        (part * self.dist.world_size).backward()
        self.optimizer.step()  # type: ignore[union-attr]
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return part.detach()

    def end_epoch(self) -> None:
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()

    def read_losses(self, handles: list[Any]) -> np.ndarray:
        if not handles:
            return np.zeros(0)
        if isinstance(handles[0], float):
            return np.asarray(handles, dtype=np.float64)
        stacked = torch.stack(handles).double()
        if self.dist.active:  # each rank holds its share of every global batch's mean
            stacked = self.dist.all_sum(stacked)
        return stacked.cpu().numpy()

    def _all_rows(
        self, data: Any, batch_size: int, *, split_it: bool
    ) -> Iterator[tuple[Tree, Tree | None]]:
        """Every row in order, unsharded: evaluation and prediction run whole on each
        rank. A Dataset's batches are split into (x, y) (``split_it``) or kept whole, as
        x (a ``step=`` evaluating); its first batch is checked as the fingerprint checks
        a training Dataset's items."""
        if isinstance(data, DatasetData):
            loader = torch.utils.data.DataLoader(
                data.dataset,
                batch_size=batch_size,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(0),  # keeps off the global stream
            )
            for i, batch in enumerate(loader):
                if i == 0:
                    self._check_item(batch, "A batch of its items", split_it=split_it)
                xb, yb = split(batch) if split_it else (batch, None)
                yield to_device(xb, self.device), None if yb is None else to_device(yb, self.device)
            return
        for start in range(0, len(data), batch_size):
            xb = rows_of(data.x, start, start + batch_size)
            yield xb, None if data.y is None else rows_of(data.y, start, start + batch_size)

    def _eval_weights(self) -> contextlib.AbstractContextManager[Any]:
        """The weights evaluation uses: the EMA's (``ema=``, unless ``use_ema=False``),
        swapped in for the block and the trained ones put back bit for bit."""
        if self.ema is not None and self.use_ema:
            return self.ema.swapped_in(self.model)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, data: Any, batch_size: int) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._eval_weights(), self.precision.autocast():
                n = len(data)
                totals: dict[str, torch.Tensor] = {}
                for xb, yb in self._all_rows(data, batch_size, split_it=self.step is None):
                    w = count_rows(xb)
                    if self.step is not None:  # the step's loss (metrics are refused with it)
                        returned = self.step(self.model, compose(xb, yb))
                        vals = {"loss": self._step_loss(returned, training=False)}
                    else:
                        out = call_model(self.model, xb)
                        loss = self.loss_fn(out, yb) if yb is not None else self.loss_fn(out)
                        vals = {"loss": loss}
                        for name, fn in self.metrics.items():
                            vals[name] = fn(out, yb)
                    for k, v in vals.items():
                        totals[k] = totals.get(k, 0) + v.detach().double() * w
                return {k: float(v.item()) / n for k, v in totals.items()}
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def predict(self, x: Any, batch_size: int) -> Any:
        """The model's outputs, ``model(x)`` (``model(**x)``, ``model(*x)``), joined over
        the batches (:func:`~.torch_data.join_outputs`); a step's or not."""
        data = self.prepare(x, None)
        self.check_data(data, with_target=False, what="predict:")
        was_training = self.model.training
        self.model.eval()
        try:
            rows = self._all_rows(data, batch_size, split_it=True)
            with self._eval_weights(), self.precision.autocast():
                outs = [call_model(self.model, xb) for xb, _ in rows]
            return join_outputs(outs) if outs else torch.empty(0)
        finally:
            self.model.train(was_training)

    # -- state -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        return {k: _to_numpy(v) for k, v in _storable(self._state_torch()).items()}

    def snapshot_tensors(self) -> dict[str, np.ndarray]:
        """:meth:`state_tensors` copied into reused host buffers (pinned on a GPU, one
        synchronisation per save); valid until the next call. See :class:`HostSnapshot`."""
        if self._snapshot is None:
            self._snapshot = HostSnapshot()
        return self._snapshot.copy(_storable(self._state_torch()))

    def _state_torch(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state, named as in the checkpoint; live, on the device."""
        out: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            out[f"model/{k}"] = v
        if self.initial is not None:
            for k, v in self.initial.items():
                out[f"initial/{k}"] = v
        for idx, slots in self.optimizer.state_dict()["state"].items():  # type: ignore[union-attr]
            for slot, v in slots.items():
                if torch.is_tensor(v):
                    out[f"optim/{idx}/{slot}"] = v
        if self.ema is not None:
            out.update(self.ema.state_tensors())
        return out

    def state_meta(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()  # type: ignore[union-attr]
        # The plain-Python parts as exact JSON (jsonstate): types come back as they were
        # (MultiStepLR's Counter of int milestones, Adam's betas tuple, a tensor lr).
        scalars = {
            str(i): {
                s: jsonstate.encode(v, f"optimizer.state[{i}].{s}")
                for s, v in slots.items()
                if not torch.is_tensor(v)
            }
            for i, slots in sd["state"].items()
        }
        dtypes = {k: str(v.dtype) for k, v in self.model.state_dict().items()}
        # Every tensor's torch dtype, so that each one (optimizer slots too) is read back
        # as what it was: _to_numpy stores bfloat16 as int16 bits, complex as real pairs.
        tensor_dtypes = {k: str(v.dtype) for k, v in self._state_torch().items()}
        return {
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "param_groups": jsonstate.encode(sd["param_groups"], "optimizer.param_groups"),
                "scalars": scalars,
                "factory_lr": list(self._factory_lr),  # for set_learning_rate's ratios
            },
            "scheduler": None
            if self.scheduler is None
            else jsonstate.encode(self.scheduler.state_dict(), "scheduler"),
            "dtypes": dtypes,
            "tensor_dtypes": tensor_dtypes,
            **({} if self._plain else {"step": self._step_meta()}),
        }

    def _step_meta(self) -> dict[str, Any]:
        """What the step options carry from one step to the next: the fp16 scaler's
        state, the EMA's update count (its shadow weights are ``ema/*`` tensors) and the
        epoch's gradient-norm and skipped-step statistics."""
        return {
            "options": self.step_options.describe(),
            "scaler": self.precision.state_meta(),
            "ema_updates": None if self.ema is None else self.ema.updates,
            "stats": self.stats.state_meta(),
        }

    def _stage_step(
        self, meta: Any, tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """A checkpoint's step state, checked (nothing changes): what of it this
        trainer's options can take. A checkpoint written with other options (a setting
        the resume names, refused on 'continue') leaves the parts it lacks fresh."""
        if self._plain:
            return None
        if meta is None:
            return {}
        if not isinstance(meta, Mapping):
            raise StateMismatchError(f"step is malformed: {meta!r}")
        staged: dict[str, Any] = {}
        if self.precision.scaler is not None and meta.get("scaler") is not None:
            self.precision.check_state(meta["scaler"])
            staged["scaler"] = meta["scaler"]
        if self.ema is not None and isinstance(meta.get("ema_updates"), int):
            own = self.ema.shadow
            saved = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
            check_keys("ema", _encoded(own), saved)
            shadow = {k: _decode(f"ema/{k}", v, dtypes.get(f"ema/{k}")) for k, v in saved.items()}
            for k, t in shadow.items():
                if t.dtype != own[k].dtype:
                    raise StateMismatchError(
                        f"ema/{k} has dtype {t.dtype} in the checkpoint, {own[k].dtype} here."
                    )
            staged["ema"] = (shadow, meta["ema_updates"])
        if meta.get("stats") is not None:
            EpochStats.check_state(meta["stats"])
            staged["stats"] = meta["stats"]
        return staged

    def _apply_step(self, staged: dict[str, Any] | None) -> None:
        if staged is None:
            return
        if "scaler" in staged:
            self.precision.load_state(staged["scaler"])
        if self.ema is not None:
            if "ema" in staged:
                shadow, updates = staged["ema"]
                for k, t in shadow.items():
                    self.ema.shadow[k].copy_(t)
                self.ema.updates = updates
            else:  # written without an EMA: it starts at the loaded weights
                self.ema.reset(self.model)
        if "stats" in staged:
            self.stats.load_state(staged["stats"])

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore weights, initial weights, optimizer and scheduler. Everything is checked
        and converted first, so a mismatch or a malformed entry leaves the model and the
        optimizer untouched (:class:`StateMismatchError` names the entry)."""
        own = self.model.state_dict()
        saved = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        check_keys("model", _encoded(own), saved)
        opt_meta = meta["optimizer"]
        if opt_meta["class"] != type(self.optimizer).__name__:
            raise StateMismatchError(
                f"the checkpoint's optimizer is {opt_meta['class']}, this Trainer's is "
                f"{type(self.optimizer).__name__}. Pass the same optimizer factory, or resume "
                "with mode='warm' to start a fresh optimizer."
            )
        current = self.optimizer.state_dict()["param_groups"]  # type: ignore[union-attr]
        groups = jsonstate.decode(opt_meta["param_groups"])
        if not isinstance(groups, list) or len(groups) != len(current):
            raise StateMismatchError(
                f"the checkpoint's optimizer has {len(groups)} parameter groups, this one "
                f"{len(current)}. Build the optimizer the same way as the run that wrote it."
            )
        # Checkpoints written before the groups' ratios were saved keep the factory's.
        factory_lr = opt_meta.get("factory_lr", self._factory_lr)
        if (
            not isinstance(factory_lr, list)
            or len(factory_lr) != len(current)
            or not all(type(v) in (int, float) for v in factory_lr)
        ):
            raise StateMismatchError(
                f"optimizer.factory_lr must list a learning rate per parameter group "
                f"({len(current)}); got {factory_lr!r}."
            )
        # Every tensor's torch dtype by its state name; checkpoints from before it was
        # recorded have the model's only ("dtypes", by parameter name).
        dtypes = {f"model/{k}": v for k, v in meta.get("dtypes", {}).items()}
        dtypes.update({f"initial/{k}": v for k, v in meta.get("dtypes", {}).items()})
        dtypes.update(meta.get("tensor_dtypes", {}))
        # load_state_dict copies into the parameters: no copy is needed before it.
        weights = {
            k: _decode(f"model/{k}", v, dtypes.get(f"model/{k}"), copy=False)
            for k, v in saved.items()
        }
        for k, t in weights.items():
            if t.dtype != own[k].dtype:
                raise StateMismatchError(
                    f"model/{k} has dtype {t.dtype} in the checkpoint, {own[k].dtype} in the model."
                )
        initial = {
            k[len("initial/") :]: _decode(k, v, dtypes.get(k))
            for k, v in tensors.items()
            if k.startswith("initial/")
        }
        if initial:
            check_keys("model", own, initial)  # decoded: the model's own shapes
        for i, (g, cur) in enumerate(zip(groups, current, strict=True)):
            if len(g.get("params", ())) != len(cur["params"]):  # tied or untied weights
                raise StateMismatchError(
                    f"the checkpoint's optimizer group {i} has {len(g.get('params', ()))} "
                    f"parameters, this optimizer's {len(cur['params'])} (weights tied in one "
                    "model and not in the other?). Build the model and the optimizer the same "
                    "way as the run that wrote the checkpoint."
                )
        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # type: ignore[union-attr]
        state: dict[int, dict[str, Any]] = {}
        for key, arr in tensors.items():
            if key.startswith("optim/"):
                parts = key.split("/", 2)
                if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
                    raise StateMismatchError(f"{key}: not a slot of this optimizer's parameters.")
                idx, slot = int(parts[1]), parts[2]
                # The arrays are ours to keep (Backend.load_state): the optimizer takes
                # them as its slots, with no copy.
                dtype = dtypes.get(key)
                if dtype is None and arr.dtype == np.int16 and params[idx].dtype == torch.bfloat16:
                    dtype = "torch.bfloat16"  # written before tensor_dtypes was recorded
                t = _decode(key, arr, dtype, copy=False)
                if t.ndim and tuple(t.shape) != tuple(params[idx].shape):
                    raise StateMismatchError(
                        f"{key}: shape {list(t.shape)}, the parameter's is "
                        f"{list(params[idx].shape)}."
                    )
                state.setdefault(idx, {})[slot] = t
        for idx, scalars in opt_meta["scalars"].items():
            state.setdefault(int(idx), {}).update(jsonstate.decode(scalars))
        # Parameters of one rank (ndim) have the same slots (Adafactor factors matrices
        # only): one that lacks a slot its likes have is an incomplete checkpoint.
        for ndim in {params[i].ndim for i in state}:
            slots = {i: set(s) for i, s in state.items() if params[i].ndim == ndim}
            every = set().union(*slots.values())
            lacking = {i: sorted(every - s) for i, s in slots.items() if every - s}
            if lacking:
                raise StateMismatchError(
                    "the optimizer state lacks slots other parameters have: "
                    + "; ".join(f"optim/{i} has no {v}" for i, v in sorted(lacking.items()))
                    + ". The checkpoint is incomplete; resume from another one."
                )
        groups = [  # checkpoints from before jsonstate stored tuples as lists
            {k: (tuple(v) if isinstance(cur.get(k), tuple) else v) for k, v in g.items()}
            for g, cur in zip(groups, current, strict=True)
        ]
        for i, (g, cur) in enumerate(zip(groups, current, strict=True)):
            indices = g.get("params")
            if not (
                isinstance(indices, list)
                and all(type(j) is int for j in indices)
                and indices == cur["params"]
            ):  # torch maps the slots to parameters by these: any other list misplaces them
                raise StateMismatchError(
                    f"optimizer.param_groups[{i}].params is {indices!r}, this optimizer's "
                    f"group {i} holds parameters {cur['params']}. Build the optimizer the same "
                    "way as the run that wrote the checkpoint."
                )
            if g.get("amsgrad") is True:  # Adam's AMSGrad keeps one more slot per parameter
                missing = [j for j in indices if j in state and "max_exp_avg_sq" not in state[j]]
                if missing:
                    raise StateMismatchError(
                        f"optimizer.param_groups[{i}].amsgrad is True, but optim/{missing[0]} "
                        "has no max_exp_avg_sq slot, which AMSGrad needs for every parameter "
                        "it has state for. The checkpoint is inconsistent; resume from another."
                    )
            for key in sorted(set(g) | set(cur)):
                if key != "params" and not _same_kind(g.get(key, _MISSING), cur.get(key, _MISSING)):
                    raise StateMismatchError(
                        f"optimizer.param_groups[{i}].{key} is {g.get(key, 'missing')!r} in the "
                        f"checkpoint, where this optimizer has {cur.get(key, 'no such key')!r}: "
                        "not a value of the same kind. Build the optimizer the same way as the "
                        "run that wrote the checkpoint."
                    )
        scheduler_state = meta.get("scheduler")
        if scheduler_state is not None:
            scheduler_state = jsonstate.decode(scheduler_state)
        step_state = self._stage_step(meta.get("step"), tensors, dtypes)
        # Apply: nothing below is expected to fail on data that passed the checks above;
        # the optimizer first, as torch checks more there (and changes nothing on a refusal).
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})  # type: ignore[union-attr]
        with torch.no_grad():
            self.model.load_state_dict(weights)
        if initial and self.model_factory is None:
            self.initial = initial
        self._set_factory_lr([float(v) for v in factory_lr])
        if self.scheduler is not None and scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
        self._apply_step(step_state)

    def check_rng(self, state: Mapping[str, np.ndarray]) -> None:
        """Refuse random-stream entries that torch would reject, before anything changes."""
        expected = torch.get_rng_state().numel()
        cpu = state.get("torch_cpu")
        if cpu is None or np.asarray(cpu).dtype != np.uint8 or np.asarray(cpu).size != expected:
            got = None if cpu is None else f"{np.asarray(cpu).dtype}[{np.asarray(cpu).size}]"
            raise StateMismatchError(
                f"rng/torch_cpu must be uint8[{expected}] (a torch generator state); got {got}."
            )

    def check_data(self, data: Any, *, with_target: bool, what: str) -> None:
        """Run the model (and the loss, or the ``step=``) on the first two rows, in eval
        mode, with the random streams put back afterwards: a mismatch of features, dtypes
        or targets is a ValueError naming the data before anything changes, not a torch
        error deep inside training. A structure the model's ``forward`` cannot take is
        refused first, naming its keys and the forward's parameters.

        A map-style Dataset is probed on its item 0 as the fingerprint read it (never a
        sample more: reading samples has effects a user may count), and only where the
        loss is the step's or the model's own (``step=``, ``loss=None``); a Dataset no
        fingerprint has read (evaluate, predict) is checked at its first batch."""
        if isinstance(data, DatasetData):
            if data.probe is None:
                return
            self._check_item(data.probe, "Item 0", split_it=self.step is None)
            if not with_target or (self.step is None and self.loss_fn is not output_loss):
                return
            xb, yb = self._to_device(torch.utils.data.default_collate([data.probe]))
            x_all, y_all, where = xb, yb, "item 0"
        else:
            if self.step is None or not with_target:
                problem = forward_problem(self.model, data.x)
                if problem is not None:
                    call = "model(**x)" if isinstance(data.x, Mapping) else "model(*x)"
                    raise ValueError(
                        f"The data does not fit the model's forward: {what} x is a "
                        f"{kind_of(data.x)}, passed to it as {call}, and {problem}. Name the "
                        "keys (or order the parts) as the forward's parameters, or pass "
                        "step=fn(model, batch) -> loss, which calls the model as it wants."
                        + _rows_hint(data.x)
                    )
            xb, yb = rows_of(data.x, 0, 2), None if data.y is None else rows_of(data.y, 0, 2)
            x_all, y_all, where = data.x, data.y, "first rows"
        stepped = with_target and self.step is not None
        try:
            # A step's loss is checked with autograd on (a graph is built, never used):
            # one that cannot train (detached) is refused here too.
            with self._trial(grad=stepped):
                if not with_target:
                    call_model(self.model, xb)
                elif self.step is not None:
                    self._step_loss(self.step(self.model, compose(xb, yb)))
                else:
                    out = call_model(self.model, xb)
                    loss = self.loss_fn(out, yb) if yb is not None else self.loss_fn(out)
                    if not torch.is_tensor(loss) or loss.numel() != 1:
                        raise ValueError(f"the loss returned {loss!r}, not a scalar tensor")
        except StepError:
            raise
        except Exception as err:  # any other failure here is the data's or the model's
            y_desc = "None" if y_all is None else describe(y_all)
            raise ValueError(
                f"The data does not fit the model or the loss: {what} x {describe(x_all)}, "
                f"y {y_desc}. On its {where} {type(err).__name__}: {err}. Check the number "
                "of features, the dtypes, and that y matches the loss."
            ) from None

    def _check_item(self, item: Any, which: str, *, split_it: bool) -> None:
        """A Dataset's item (or collated batch) that training cannot batch or the model's
        forward cannot take (:func:`~.torch_data.item_error`), refused."""
        check_item(item, which, split_it=split_it)
        if split_it and self.step is None:
            problem = forward_problem(self.model, split(item)[0])
            if problem is not None:
                raise item_error(item, which, forward=problem)

    def check_zero_rows(self, data: Any, batch_size: int) -> None:
        """Under DDP, if a global batch of this data leaves a rank no rows (``batch_size``
        below the world size, or a last batch of fewer rows than ranks), check that the
        model runs on a batch of zero rows, as such a rank's step does; a ``ValueError``
        on every rank if not, before anything changes."""
        world, n = self.dist.world_size, len(data)
        last = n % batch_size
        if world <= 1 or (batch_size >= world and (last == 0 or last >= world)):
            return
        problem = None
        try:
            if isinstance(data, TensorData):
                xb = rows_of(data.x, 0, 0)
                yb = None if data.y is None else rows_of(data.y, 0, 0)
            else:
                xb, yb = self._zero_rows(data)
            with self._trial():
                if self.step is not None:
                    self.step(self.model, compose(xb, yb))
                else:
                    call_model(self.model, xb)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        if self.dist.any_rank(problem is not None):
            raise ValueError(
                f"Under DDP, {n} rows in global batches of {batch_size} over {world} ranks "
                "leave some ranks no rows in a batch"
                + (f" (the last batch has {last})" if batch_size >= world else "")
                + "; such a rank still takes the step, on a batch of zero rows, and the "
                f"model cannot run on zero rows ({problem or 'on another rank'}). Make the "
                "model accept an empty batch (x.flatten(1), not x.view(x.size(0), -1)), or "
                "pick a batch_size that leaves a last batch of 0 or at least "
                f"{world} rows."
            )

    @contextlib.contextmanager
    def _trial(self, *, grad: bool = False) -> Iterator[None]:
        """A forward pass that changes nothing: the model in eval mode, no gradients
        (unless ``grad``: a graph, never used for a backward pass), every random stream
        forked; the model's mode is put back afterwards. It runs under the precision's
        autocast, as the training step's forward does."""
        was_training = self.model.training
        try:
            with isolated_streams(self._cuda_devices()), torch.set_grad_enabled(grad), \
                    self.precision.autocast():
                self.model.eval()
                yield
        finally:
            self.model.train(was_training)

    def _cuda_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def load_weights(
        self, tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None
    ) -> None:
        """Load the ``model/*`` entries of ``tensors`` (copies) into the model."""
        own = self.model.state_dict()
        saved = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        check_keys("model", _encoded(own), saved)
        dtypes = dtypes or {k: str(v.dtype) for k, v in own.items()}
        weights = {k: _decode(f"model/{k}", v, dtypes.get(k)) for k, v in saved.items()}
        with torch.no_grad():
            self.model.load_state_dict(weights)

    def describe(self) -> dict[str, Any]:
        """The settings a resume compares. The optimizer's are those the factory built
        (every hyper-parameter of every group, ``lr`` included), read before a scheduler
        or training changed them: a scheduler that cycles momentum (OneCycleLR) does not
        make a resume differ, and a changed learning rate in the factory does."""
        return {
            "framework": "torch",
            "model": {k: list(v.shape) for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self._built),
            "loss": self.loss_name,
            "device": str(self.device),
            # A parameter's layout changes the order of its kernels' sums: part of it.
            "memory_format": _memory_formats(self.model),
            "numerics": _numerics(),
            "threads": torch.get_num_threads(),
            **({"step": _name(self.step)} if self.step is not None else {}),
            # Recorded for plain steps too: a resume with other options is then named.
            "step_options": self.step_options.describe(),
            # A Hugging Face model's attention kernel (sdpa, eager...): each is exact,
            # but they compute other bits, so a resume must build the same one.
            **_attention(self.model),
        }


_MISSING = object()


def _attention(model: nn.Module) -> dict[str, Any]:
    """``{"attn_implementation": ...}`` for a model with a Hugging Face config, else {}."""
    name = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"attn_implementation": name} if isinstance(name, str) else {}


def _same_kind(saved: Any, own: Any) -> bool:
    """Whether a checkpoint's optimizer hyper-parameter is a value of the kind this
    optimizer's is (a number for a number, a pair for a pair, a flag for a flag; a flag
    may be None, torch's "decide for me")."""
    if saved is _MISSING or own is _MISSING:
        return saved is own
    if isinstance(own, bool) or own is None:
        return saved is None or isinstance(saved, bool)
    if torch.is_tensor(own):
        return torch.is_tensor(saved) and saved.shape == own.shape
    if isinstance(own, numbers.Real):
        return isinstance(saved, numbers.Real) and not isinstance(saved, bool)
    if isinstance(own, (tuple, list)):
        return (
            isinstance(saved, (tuple, list))
            and len(saved) == len(own)
            and all(_same_kind(a, b) for a, b in zip(saved, own, strict=True))
        )
    return type(saved) is type(own)


def check_global_modes(
    device_type: str,
    precision: str = "pass Trainer(precision='bf16') (or 'fp16'), which enters autocast "
    "around each step",
) -> None:
    """Raise ``RuntimeError`` if training is asked for inside a global torch mode that
    would change it silently or break it deep inside the first step:

    - ``torch.autocast`` around ``fit``: autocast caches its low-precision casts of the
      weights for the whole block, so every step after the first would train against
      stale copies of the weights (measured: loss 4.43 where 3.27 was right);
    - ``torch.no_grad()`` / ``torch.inference_mode()`` around ``fit``: no gradient
      could be computed.
    """
    for kind in dict.fromkeys((device_type, "cpu")):
        if _autocast_enabled(kind):
            raise RuntimeError(
                f"Trainer.fit was called inside torch.autocast (enabled for {kind!r}, dtype "
                f"{torch.get_autocast_dtype(kind)}). autocast keeps its casts of the weights "
                "for the whole block, so every step after the first would train against "
                "stale low-precision copies of the weights: a silently different result. "
                f"Call fit outside autocast; for mixed precision, {precision}."
            )
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        which = "torch.inference_mode()" if torch.is_inference_mode_enabled() else (
            "torch.no_grad() (or set_grad_enabled(False))"
        )  # fmt: skip
        raise RuntimeError(
            f"Trainer.fit was called inside {which}: training needs gradients. Call fit "
            "outside that block (evaluate and predict run without gradients on their own)."
        )


def _numerics() -> dict[str, str]:
    """torch's global settings that change what a step computes on any device."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()),
    }


def _memory_formats(model: nn.Module) -> dict[str, str]:
    """The state's tensors stored channels-last (the others are contiguous or strided
    as torch made them): a model built without it would resume into another layout."""
    out = {}
    for name, t in model.state_dict().items():
        if t.ndim in (4, 5) and not t.is_contiguous():
            fmt = torch.channels_last if t.ndim == 4 else torch.channels_last_3d
            if t.is_contiguous(memory_format=fmt):
                out[name] = "channels_last" if t.ndim == 4 else "channels_last_3d"
    return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def use_deterministic_algorithms() -> Callable[[], None]:
    """Turn on ``torch.use_deterministic_algorithms``; return what restores the previous
    setting, ``warn_only`` included. (On CUDA, torch also needs
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before the process starts; it says so.)"""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    return lambda: torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _release(ref: weakref.ref) -> None:
    backend = ref()
    if backend is not None:
        backend.close()


def _name(obj: object) -> str:
    return type(obj).__name__ if isinstance(obj, nn.Module) else getattr(obj, "__name__", repr(obj))


class StepError(ValueError):
    """A loss warmfit cannot train on: what a ``step=`` returned, or a model's own
    ``.loss`` that is not there. Its message is whole: the data probe raises it as it is."""


def output_loss(out: Any, target: Any = None) -> torch.Tensor:
    """The loss of ``loss=None``: the one the model computed itself, its output's
    ``.loss`` attribute or ``"loss"`` key (the Hugging Face convention)."""
    if target is not None:
        raise StepError(
            "loss=None takes the loss the model computes itself (its output's .loss, the "
            "Hugging Face convention), which never sees a separate target y, and this data "
            "has one. Pass loss= (a callable (output, target) -> loss, or a name) to "
            "compare the output with y, put the target among the model's inputs (x={..., "
            "'labels': y}), or pass step=fn(model, batch) -> loss."
        )
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        has = (isinstance(out, Mapping) and "loss" in out) or hasattr(out, "loss")
        raise StepError(
            "The Trainer has no loss=, and the model's output, "
            + (
                f"{_returned(out)}, has loss None (a Hugging Face model computes it only when "
                "given labels: put them among the model's inputs, e.g. x['labels']). "
                if has
                else f"{_returned(out)}, has no .loss attribute or 'loss' key (the Hugging "
                "Face convention). "
            )
            + f"Pass loss= (a callable (output, target) -> loss, or one of {sorted(_LOSSES)}) "
            "or step=fn(model, batch) -> loss."
        )
    return cast(torch.Tensor, loss)


def _returned(value: Any) -> str:
    """What a function returned, for a message: "a Tensor of shape (16,) and dtype
    torch.float32", "a float (0.5)", "a dict with keys ['loss']", "None"."""
    if value is None:
        return "None"
    if torch.is_tensor(value):
        return f"a Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (numbers.Number, str)):
        return f"a {type(value).__name__} ({value!r})"
    return f"a {kind_of(value)}"


def _rows_hint(x: Any) -> str:
    """For a list of more than two arrays of one shape, taken as a structure (an input
    of the model per array), the other reading it may have been meant."""
    if not isinstance(x, list) or len(x) <= 2:
        return ""
    shapes = {tuple(np.shape(v)) for v in x if torch.is_tensor(v) or isinstance(v, np.ndarray)}
    if len(shapes) != 1:
        return ""
    return (
        f" (x is a list of {len(x)} arrays of one shape, taken as {len(x)} inputs of the "
        "model; if it holds one array per sample, pass np.stack(x).)"
    )


def _check_step(step: Any, loss: Any, metrics: Any) -> None:
    """Refuse a ``step=`` that is not a function, or that comes with a ``loss=`` or
    ``metrics=`` it leaves without a meaning."""
    if step is None:
        return
    if not callable(step):
        raise TypeError(
            "The 'step' parameter of Trainer must be a function (model, batch) -> loss, a "
            f"scalar tensor. Got {step!r} instead."
        )
    if loss is not None:
        raise ValueError(
            "Pass either 'loss' or 'step', not both: a step computes the loss itself "
            f"(step={_name(step)}, loss={loss!r})."
        )
    if metrics:
        raise ValueError(
            "metrics= are computed as metric(model(x), y), and with step= warmfit does not "
            "know how your step calls the model or which part of the batch is the target. "
            "Compute them in a callback (on_epoch_end, with trainer.model), or use loss= "
            "(any callable (output, target) -> loss) instead of step=."
        )


def factory_takes(factory: Callable[..., Any]) -> str:
    """What an optimizer factory is called with, by the name of its first parameter:
    ``model`` -> the module (``"model"``); ``named_parameters`` or ``named_params`` ->
    the list of ``(name, parameter)`` pairs, for groups by name (``"named_parameters"``);
    any other name, or a signature that cannot be read -> ``model.parameters()``
    (``"parameters"``)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return "parameters"
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first = params[0].name if params and params[0].kind in kinds else ""
    if first == "model":
        return "model"
    return "named_parameters" if first in ("named_parameters", "named_params") else "parameters"


def _resolve_loss(loss: Any) -> Callable[..., torch.Tensor]:
    if loss is None:
        return output_loss
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(
                f"The 'loss' parameter of Trainer must be a callable or one of "
                f"{set(_LOSSES)}. Got {loss!r} instead."
            )
        return _LOSSES[loss]()
    if not callable(loss):
        raise TypeError(f"The 'loss' parameter of Trainer must be callable. Got {loss!r} instead.")
    return loss


def _resolve_metrics(metrics: Any) -> dict[str, Callable]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out = {}
    for m in metrics or ():
        if isinstance(m, str):
            if m not in _METRICS:
                raise ValueError(
                    f"Unknown metric {m!r}. Expected one of {set(_METRICS)} or a callable."
                )
            out[m] = _METRICS[m]
        else:
            out[_name(m)] = m
    return out


def _encodable(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be stored in a checkpoint exactly (None if it can)."""
    if t.layout != torch.strided:
        return (
            f"its layout is {t.layout} (only dense tensors are stored); convert it with "
            ".to_dense()"
        )
    if t.is_quantized:
        return "it is quantized; store its dequantized values or its int_repr() instead"
    if t.device.type == "meta":
        return "it is on the meta device (it holds no values); materialise the model first"
    if t.dtype in _VIEWED or t.is_complex() or t.dtype in _NUMPY_DTYPES:
        return None
    return f"its dtype {t.dtype} has no exact encoding in a checkpoint"


def _storable(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``tensors``, if a checkpoint can hold every one of them bit for bit; else a
    ``TypeError`` naming the first that it cannot (never stored lossily)."""
    for name, t in tensors.items():
        why = _encodable(t)
        if why is not None:
            raise TypeError(
                f"The training state entry {name!r} cannot be saved exactly: {why}. "
                "warmfit stores every tensor of the state bit for bit or refuses it."
            )
    return tensors


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a NumPy array holding its exact bits: dtypes NumPy lacks are viewed as an
    integer of the same size (bfloat16 as int16, the float8 types as uint8) and complex
    tensors as their real pairs (a trailing dimension of 2); the state records each
    tensor's torch dtype (``tensor_dtypes``) and :func:`_from_numpy` undoes the view."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    viewed = _VIEWED.get(t.dtype)
    if viewed is not None:
        t = t.view(viewed)
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: str | None, *, copy: bool = True) -> torch.Tensor:
    """The torch tensor :func:`_to_numpy` encoded as ``a``, of the recorded ``dtype`` (a
    string such as ``"torch.bfloat16"``; None: ``a``'s own). Raises
    :class:`StateMismatchError` if ``a`` cannot hold a tensor of that dtype."""
    a = np.asarray(a)
    if copy or not a.flags.writeable:
        a = np.array(a)
    t = torch.from_numpy(a)
    if dtype is None or dtype == str(t.dtype):
        return t
    want = _torch_dtype(dtype)
    if want.is_complex:
        real = _REAL_OF_COMPLEX[want]
        if t.dtype != real or not t.ndim or t.shape[-1] != 2:
            raise StateMismatchError(
                f"an array of dtype {a.dtype} and shape {list(a.shape)} cannot hold {dtype} "
                f"(expected {real} pairs: a trailing dimension of 2)"
            )
        return torch.view_as_complex(t.contiguous())
    if _VIEWED.get(want) != t.dtype:
        raise StateMismatchError(f"an array of dtype {a.dtype} cannot hold {dtype}")
    return t.view(want)


class _Encoded(NamedTuple):
    shape: tuple[int, ...]


def _encoded(tensors: Mapping[str, torch.Tensor]) -> dict[str, _Encoded]:
    """The shapes ``tensors`` have in a checkpoint (complex: a trailing 2), for
    :func:`~warmfit.backends.base.check_keys`."""
    return {
        k: _Encoded((*t.shape, 2) if t.is_complex() else tuple(t.shape))
        for k, t in tensors.items()
    }


def _decode(name: str, a: np.ndarray, dtype: str | None, *, copy: bool = True) -> torch.Tensor:
    """:func:`_from_numpy` for the state entry ``name``: a mismatch names the entry."""
    try:
        return _from_numpy(a, dtype, copy=copy)
    except StateMismatchError as err:
        raise StateMismatchError(f"{name}: {err}") from None


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise StateMismatchError(f"{name!r} is not a torch dtype")
    return dtype


# dtypes NumPy lacks, stored as the bits of an integer of the same size
_VIEWED: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.int16,
    **{
        getattr(torch, name): torch.uint8
        for name in (
            "float8_e4m3fn",
            "float8_e4m3fnuz",
            "float8_e5m2",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
            "float4_e2m1fn_x2",
        )
        if hasattr(torch, name)
    },
}
_REAL_OF_COMPLEX: dict[torch.dtype, torch.dtype] = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
# dtypes stored as they are (the unsigned ones beyond uint8 exist from torch 2.3)
_NUMPY_DTYPES = frozenset(
    getattr(torch, name)
    for name in (
        "float16", "float32", "float64", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool",
    )
    if hasattr(torch, name)
)


def _built_settings(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[float]]:
    """A fresh optimizer's class and hyper-parameters per group (JSON), and its groups'
    learning rates."""
    groups = optimizer.param_groups
    hyper = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in groups]
    lrs = [_lr_value(g["lr"]) for g in groups]
    return {"class": type(optimizer).__name__, "hyper": hyper}, lrs


def _lr_value(lr: Any) -> float:
    return float(lr.item() if torch.is_tensor(lr) else lr)


def _check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` this process can use; a ``ValueError`` that says
    what to pass instead of torch's errors for a bad name or a device not here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise invalid_param(
            "device", "Trainer", "a torch device such as 'cpu', 'cuda' or 'cuda:1'", device
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"The 'device' parameter of Trainer is {device!r}, but this torch "
            f"{torch.__version__} sees no CUDA device. Use device='cpu', or run where a GPU "
            "and a CUDA build of torch are."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"The 'device' parameter of Trainer is {device!r}, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s). Use one of cuda:0..."
            f"cuda:{torch.cuda.device_count() - 1}."
        )
    return dev


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)
