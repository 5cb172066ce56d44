"""The training state: everything a resume needs, as one object with ``state_dict()``.

A checkpoint is the training state's :meth:`TrainingState.state_dict`, composed — the
way a PyTorch checkpoint composes ``state_dict()``s — of its parts' own: the counters
(:class:`~warmfit.state.Counters`), the random streams (:class:`~warmfit.runtime.Streams`,
every rank's under DDP), the epoch's partial loss, the schedule, the data record and
fixed validation rows, the fit call in progress, each callback's ``state_dict()`` and
``state_arrays()``, the history and the ledger — and the backend's (model, optimizer,
framework streams). ``docs/design.md`` ("State manifest") and :data:`warmfit.state.MANIFEST`
list the entries and where each lives.

Loading is all or nothing: :meth:`TrainingState.load_state_dict` reads and checks every
entry first (on copies), then applies them; a malformed or mismatched state raises
:class:`~warmfit.errors.StateMismatchError` naming the entry, and nothing changed.

Owns: the parts of a run's state, their assembly and restoration, the learning rate
of a step (schedule x callbacks) and the comparison of settings with a checkpoint's.
Does not own: when to save, or files (:mod:`warmfit.checkpointer`), or the loop.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import __version__
from .backends.base import Backend
from .background import SnapshotBuffers
from .callbacks import Callback
from .errors import StateMismatchError
from .history import History, Ledger
from .horizons import Plan
from .runtime import Streams
from .schedules import Planned, Schedule, TorchScheduler, describe, from_config, lr_at
from .state import Counters, HostStreams

#: Settings whose change breaks exactness of a ``continue`` after a resume.
EXACTNESS_SETTINGS = (
    "batch_size", "seed", "memory_format", "numerics", "step_options", "attn_implementation",
)  # fmt: skip

#: The arguments of a fit call that make it "the same call" (a requeue finishes it).
REQUEST_KEYS = (
    "mode", "epochs", "until_epoch", "steps", "new_data", "shuffle", "validation_split",
    "fingerprint",
)  # fmt: skip
#: Arguments in a call's request only where given (a request saved before them matches).
OPTIONAL_REQUEST_KEYS = ("past_horizon", "cooldown")


class TrainingState:
    """The parts of a run's state besides the backend's, and the backend they go with.

    ``counters``, ``streams``, ``history``, ``ledger``, ``schedule`` (and ``base_lr``,
    the optimizer's own rate where no schedule sets one), ``epoch_partial`` (the loss
    sum and sample count of the epoch in progress), ``data`` (the data record of the
    last fit call: fingerprint, shape, validation split), ``val_rows`` (its fixed
    validation rows), ``call`` (the fit call in progress or interrupted) and the
    callbacks, whose state is theirs.
    """

    def __init__(
        self,
        backend: Backend,
        callbacks: list[Callback],
        schedule: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.backend = backend
        self.callbacks = callbacks
        self.schedule = schedule
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.ledger = Ledger()
        self.call: dict[str, Any] | None = None
        #: Where the schedule's horizon ends and where fit calls moved it (horizons.py).
        self.plan = Plan()
        #: Settings that differ from the last loaded state's (a 'continue' refuses those
        #: that break exactness; the next fit call records them in the ledger).
        self.pending_diffs: list[str] = []
        self.streams = Streams.seeded(backend, seed, rank)
        self._planned: Planned | None = None
        self.start_run(0, reseed=False)

    def start_run(self, run: int, *, reseed: bool = True) -> None:
        """Everything a run starts with besides the weights and the optimizer (which the
        backend has just built): counters at 0, the seeded streams, an empty history,
        reset callbacks. The ledger is kept."""
        self.base_lr = self.backend.learning_rate()
        self.counters = Counters(run=run)
        self.plan = Plan()
        if reseed:
            self.streams.replace(Streams.seeded(self.backend, self.seed, self.rank).state)
        self.history = History()
        self.epoch_partial: tuple[float | None, int] = (0.0, 0)
        self.data: dict[str, Any] | None = None
        self.val_rows: np.ndarray | None = None
        self.reset_callbacks()

    def reset_callbacks(self) -> None:
        for cb in self.callbacks:
            cb.reset()

    # -- the learning rate of a step ------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of global step ``step``: the schedule's (counted from the
        schedule's origin) or the optimizer's own, through every callback's
        :meth:`~warmfit.callbacks.Callback.adjust_lr`."""
        if isinstance(self.schedule, Schedule):
            planned = self._planned
            if planned is None or planned.schedule is not self.schedule or (
                planned.plan is not self.plan
            ):
                planned = self._planned = Planned(self.schedule, self.plan)
            base = lr_at(planned, step - self.counters.schedule_origin)
        elif self.schedule:
            base = lr_at(self.schedule, step - self.counters.schedule_origin)
        else:
            base = self.base_lr
        for cb in self.callbacks:
            base = cb.adjust_lr(base)
        return base

    def sets_lr(self, schedule: Any = None) -> bool:
        """Whether warmfit sets the learning rate at each step under ``schedule`` (the
        current one if None): a warmfit schedule or a callback that adjusts the rate
        (``ReduceLROnPlateau``) does; a torch ``LRScheduler`` sets it itself."""
        schedule = self.schedule if schedule is None else schedule
        if isinstance(schedule, TorchScheduler):
            return False
        return schedule is not None or any(cb.adjusts_lr for cb in self.callbacks)

    def apply_lr(self) -> None:
        """Set the learning rate for the next step (schedule x callbacks' adjustments)."""
        if self.sets_lr():
            self.backend.set_learning_rate(self.lr_at(self.counters.global_step))

    # -- state_dict ------------------------------------------------------------------------
    def state_dict(
        self, settings: Mapping[str, Any], *, snapshot: SnapshotBuffers | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The state's arrays and its JSON part. The arrays are views of the live state;
        with ``snapshot``, private copies in reused buffers instead, for the background
        writer (the backend's ``snapshot_tensors``, and ``snapshot`` for the rest).
        Under DDP a collective (every rank's streams are gathered)."""
        rng = self.streams.current()
        backend = self.backend
        backend_tensors = backend.snapshot_tensors() if snapshot else backend.state_tensors()
        tensors: dict[str, np.ndarray] = {}  # everything but the backend's arrays
        for name, arr in rng["framework"].items():
            tensors[f"rng/{name}"] = arr
        host_ranks = {}
        if self.world_size > 1:  # every rank's own streams; rank 0's are the ones above
            for r, (host, framework) in enumerate(self._gather_rank_streams(rng)):
                if r:
                    host_ranks[str(r)] = host
                    for name, arr in framework.items():
                        tensors[f"rng/rank{r}/{name}"] = arr
        if self.val_rows is not None:
            tensors["data/val_rows"] = self.val_rows
        for i, cb in enumerate(self.callbacks):
            for name, arr in cb.state_arrays().items():
                tensors[f"callbacks/{i}/{name}"] = arr
        if snapshot is None:
            tensors = {**backend_tensors, **tensors}
        else:  # the backend's arrays are its own copies already
            tensors = {**backend_tensors, **snapshot.copy(tensors)}
        loss_sum, count = self.epoch_partial
        state = {
            "version": {"warmfit": __version__, "framework": backend.framework},
            "settings": {**settings, "model": backend.describe()},
            "counters": self.counters.to_dict(),
            "epoch_partial": {"loss_sum": loss_sum, "samples": count},
            "rng": {"host": rng["host"], **({"host_ranks": host_ranks} if host_ranks else {})},
            "schedule": {
                "config": self.schedule.config() if isinstance(self.schedule, Schedule) else None,
                "described": describe(self.schedule),
                "base_lr": self.base_lr,
                "plan": self.plan.to_list(),
            },
            "backend": backend.state_meta(),
            "data": self.data,
            "call": self.call,
            "callbacks": [
                {"class": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks
            ],
            "history": self.history.state_dict(),
            "ledger": self.ledger.state_dict(),
        }
        return tensors, state

    # -- load_state_dict -------------------------------------------------------------------
    def load_state_dict(self, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """Restore a state: every entry is read and checked first, then applied, so a
        malformed or mismatched state raises :class:`StateMismatchError` (naming the entry)
        and leaves everything as it was."""
        try:
            staged = self._stage(tensors, state)
        except StateMismatchError:
            raise
        except Exception as err:  # malformed data of any kind: never a raw traceback
            raise StateMismatchError(
                f"the state is incomplete or malformed: {type(err).__name__}: {err}"
            ) from None
        # Apply. The backend checks everything before it changes anything.
        try:
            self.backend.load_state(tensors, state["backend"])
        except StateMismatchError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            raise StateMismatchError(
                f"the backend state is incomplete or malformed: {type(err).__name__}: {err}"
            ) from None
        self.counters = staged["counters"]
        self.streams.replace(staged["rng"])
        self.epoch_partial = staged["partial"]
        if staged["schedule"] is not None:
            self.schedule = staged["schedule"]
        self.base_lr = staged["base_lr"]
        self.plan = staged["plan"]
        self.data = staged["data"]
        self.val_rows = staged["val_rows"]
        for cb, cb_state, cb_arrays in zip(
            self.callbacks, staged["callbacks"], staged["callback_arrays"], strict=True
        ):
            cb.load_state_dict(cb_state)
            cb.load_state_arrays(cb_arrays)
        self.history = staged["history"]
        self.ledger = staged["ledger"]
        self.call = staged["call"]

    def _stage(self, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> dict:
        """Read and check every entry of a state without changing anything."""
        counters = Counters.from_dict(dict(state["counters"]))
        for key, needs in (("history", ("epoch", "segment")), ("ledger", ()), ("callbacks", ())):
            rows = state[key]
            if not isinstance(rows, list) or not all(
                isinstance(r, dict) and all(isinstance(r.get(k), int) for k in needs) for r in rows
            ):
                need = f" with int {' and '.join(needs)}" if needs else ""
                raise StateMismatchError(
                    f"{key} is malformed: it must be a list of records (dicts{need}); got "
                    f"{str(rows)[:80]}."
                )
        saved_cbs = state["callbacks"]
        cb_arrays = self._stage_callbacks(saved_cbs, tensors)
        rng = self._rank_streams(tensors, state["rng"], counters.global_step)
        self.backend.check_rng(rng["framework"])
        try:
            HostStreams.check(rng["host"])
        except Exception as err:
            raise StateMismatchError(
                f"rng.host is malformed ({type(err).__name__}: {err}); it must hold the "
                "Python and NumPy generator states written by warmfit."
            ) from None
        p = state["epoch_partial"]
        loss_sum, samples = p["loss_sum"], p["samples"]
        if not (loss_sum is None or isinstance(loss_sum, (int, float))) or not isinstance(
            samples, int
        ):
            raise StateMismatchError(f"epoch_partial is malformed: {p!r}")
        sched = state["schedule"]
        schedule = None
        if sched.get("config") is not None:
            saved = from_config(sched["config"])
            if not isinstance(self.schedule, Schedule) or saved.config() != self.schedule.config():
                schedule = saved
        base_lr = sched.get("base_lr", self.base_lr)
        try:
            plan = Plan.from_list(sched.get("plan"))  # none in older checkpoints
        except ValueError as err:
            raise StateMismatchError(f"schedule.plan is malformed: {err}") from None
        data = state["data"]
        if data is not None and not (
            isinstance(data, dict) and isinstance(data.get("shape"), list) and "fingerprint" in data
        ):
            raise StateMismatchError(f"data is malformed: {data!r}")
        return {
            "counters": counters,
            "rng": rng,
            "partial": (loss_sum, samples),
            "schedule": schedule,
            "base_lr": float(base_lr),
            "plan": plan,
            "data": data,
            "val_rows": _staged_val_rows(tensors, data),
            "callbacks": [saved["state"] for saved in saved_cbs],
            "callback_arrays": cb_arrays,
            "history": History([dict(r) for r in state["history"]]),
            "ledger": Ledger([dict(r) for r in state["ledger"]]),
            "call": check_open_call(state.get("call")),  # None in older checkpoints
        }

    def _stage_callbacks(
        self, saved_cbs: list[dict[str, Any]], tensors: Mapping[str, np.ndarray]
    ) -> list[dict[str, np.ndarray]]:
        """Check the callbacks' saved state (on copies of them); return their arrays."""
        if [c["class"] for c in saved_cbs] != [type(cb).__name__ for cb in self.callbacks]:
            raise StateMismatchError(
                "the checkpoint's callbacks are "
                f"{[c['class'] for c in saved_cbs]}, this Trainer's are "
                f"{[type(cb).__name__ for cb in self.callbacks]}. Pass the same callbacks "
                "in the same order."
            )
        cb_arrays: list[dict[str, np.ndarray]] = [{} for _ in self.callbacks]
        for name, arr in tensors.items():
            if name.startswith("callbacks/"):
                index, _, key = name[len("callbacks/") :].partition("/")
                if not index.isdigit() or int(index) >= len(self.callbacks) or not key:
                    raise StateMismatchError(
                        f"{name} names no callback of this Trainer "
                        f"({len(self.callbacks)} callbacks)."
                    )
                cb_arrays[int(index)][key] = arr
        for cb, saved, arrays in zip(self.callbacks, saved_cbs, cb_arrays, strict=True):
            trial = copy.deepcopy(cb)  # a trial on a copy (its warnings come with the load)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial.load_state_dict(saved["state"])
                trial.load_state_arrays(arrays)
        return cb_arrays

    # -- every rank's random streams ---------------------------------------------------------
    def _gather_rank_streams(
        self, rng: Mapping[str, Any]
    ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every rank's random streams, gathered as JSON bytes (no pickle)."""
        payload = json.dumps(
            {
                "host": rng["host"],
                "framework": {k: v.tobytes().hex() for k, v in rng["framework"].items()},
            }
        ).encode()
        out = []
        for blob in self.backend.gather_bytes(payload):
            doc = json.loads(blob)
            fw = {
                k: np.frombuffer(bytes.fromhex(v), dtype=np.uint8).copy()
                for k, v in doc["framework"].items()
            }
            out.append((doc["host"], fw))
        return out

    def _rank_streams(
        self, tensors: Mapping[str, np.ndarray], saved: Mapping[str, Any], step: int
    ) -> dict[str, Any]:
        """This rank's streams from a checkpoint saved at global step ``step``. A rank
        the checkpoint has no streams for (resuming at a larger world size) starts fresh
        streams derived from the seed, its rank and the step: the data order stays exact,
        in-model randomness cannot."""
        if self.rank == 0:
            fw = {
                k[len("rng/") :]: v
                for k, v in tensors.items()
                if k.startswith("rng/") and not k.startswith("rng/rank")
            }
            return {"host": saved["host"], "framework": fw}
        prefix = f"rng/rank{self.rank}/"
        fw = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        host = saved.get("host_ranks", {}).get(str(self.rank))
        if fw and host is not None:
            return {"host": host, "framework": fw}
        seed = self.seed + 1_000_003 * self.rank + step
        return {"host": HostStreams.seeded(seed), "framework": self.backend.seeded_rng(seed)}


def _staged_val_rows(tensors: Mapping[str, np.ndarray], data: Any) -> np.ndarray | None:
    """A checkpoint's fixed validation rows, checked against its data record."""
    if "data/val_rows" not in tensors:
        return None
    val_rows = np.asarray(tensors["data/val_rows"])
    if val_rows.dtype.kind not in "iu" or val_rows.ndim != 1:
        raise StateMismatchError("data/val_rows must be a 1-D integer array.")
    n = data["shape"][0] if data is not None and data["shape"] else None
    if not (
        len(val_rows)
        and (np.diff(val_rows) > 0).all()
        and val_rows[0] >= 0
        and (n is None or (val_rows[-1] < n and len(val_rows) < n))
    ):
        raise StateMismatchError(
            "data/val_rows must be the rows a validation split gives: increasing, "
            f"at least one, within the {n} rows of the data and not all of them; got "
            f"{val_rows[:8].tolist()}{' ...' if len(val_rows) > 8 else ''}."
        )
    return val_rows


def check_open_call(call: Any) -> dict[str, Any] | None:
    """A checkpoint's open fit call (``state["call"]``), checked."""
    if call is None:
        return None
    ok = (
        isinstance(call, dict)
        and all(isinstance(call.get(k), int) for k in ("call", "segment"))
        and isinstance(call.get("request"), dict)
        and set(REQUEST_KEYS) <= set(call["request"]) <= {*REQUEST_KEYS, *OPTIONAL_REQUEST_KEYS}
        and all(isinstance(call.get(k), (int, type(None))) for k in ("target", "step_target"))
        and (call.get("target") is None) != (call.get("step_target") is None)
    )
    if not ok:
        raise StateMismatchError(f"call is malformed: {call!r}")
    return dict(call)


def final_metrics(history: History, segment: int) -> dict[str, float]:
    """The last epoch's losses and metrics of fit call ``segment`` (for the ledger)."""
    rows = history.segment(segment)
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if isinstance(v, float) and k != "lr"}


# -- settings compared with a checkpoint's ---------------------------------------------------
def setting_diffs(
    state: Mapping[str, Any],
    settings: Mapping[str, Any],
    model: Mapping[str, Any],
    override: Iterable[str],
) -> list[str]:
    """Differences between ``settings`` (and the backend's description of the model)
    and a checkpoint's, one line each; those named in ``override`` are left out."""
    override = set(override)
    saved = state.get("settings", {})
    if not isinstance(saved, dict) or not isinstance(saved.get("model") or {}, dict):
        raise StateMismatchError(
            f"the checkpoint's settings are malformed: {saved!r}. Expected a dict with "
            "batch_size, seed and the model's description."
        )
    diffs = []
    for key, now in settings.items():
        if key in saved and saved[key] != now and key not in override:
            diffs.append(f"{key}: checkpoint {saved[key]!r}, now {now!r}")
    for key, value in (saved.get("model") or {}).items():
        if key != "model" and model.get(key) != value and key not in override:
            diffs += _leaf_diffs(key, value, model.get(key))
    return diffs


def setting_of(diff: str) -> str:
    """The top-level setting a line of :func:`setting_diffs` is about."""
    return diff.split(":")[0].split(".")[0].split("[")[0]


def _leaf_diffs(where: str, saved: Any, now: Any) -> list[str]:
    """``where.key: checkpoint A, now B`` for each differing leaf of two JSON values (the
    whole values where their structure differs)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [  # a key the checkpoint lacks was not recorded then (an older warmfit)
            d
            for k in sorted(set(saved) | set(now), key=str)
            if k in saved and saved.get(k) != now.get(k)
            for d in _leaf_diffs(f"{where}.{k}", saved.get(k), now.get(k))
        ]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [
            d
            for i, (a, b) in enumerate(zip(saved, now, strict=True))
            if a != b
            for d in _leaf_diffs(f"{where}[{i}]", a, b)
        ]
    return [f"{where}: checkpoint {saved!r}, now {now!r}"]


def settings_warning(diffs: list[str]) -> str:
    """The warning a load with differing settings gives: what differs, what is kept and
    what a 'continue' will refuse."""
    text = "resuming with different settings: " + "; ".join(diffs) + "."
    if any(d.startswith("optimizer") for d in diffs):
        text += (
            " On 'continue' the optimizer keeps the checkpoint's hyper-parameters (its "
            "state is restored, as torch's load_state_dict does); fit with mode='warm' to "
            "build a fresh optimizer from the factory's."
        )
    if any(d.startswith("params.") for d in diffs):
        text += (
            " The estimator is restored whole from the checkpoint, its parameters "
            "included, so the checkpoint's values are kept; to train with a new value, "
            "call trainer.model.set_params(...) before fit (mode='warm' to record it as a "
            "change of course)."
        )
    breaking = sorted({setting_of(d) for d in diffs} & set(EXACTNESS_SETTINGS))
    if breaking:
        text += (
            f" A 'continue' call will refuse {'/'.join(breaking)} changes unless they are "
            "named in override=(...) or the call uses mode='warm'."
        )
    if any(setting_of(d) == "threads" for d in diffs):
        text += (
            " On the CPU torch's results can depend on the number of threads (the split of "
            "a large matrix product): set torch.set_num_threads (or OMP_NUM_THREADS) as the "
            "run that wrote the checkpoint had it for a bit-exact resume."
        )
    return text
