"""The state manifest: the one list of everything a resume needs.

Owns: the counters (:class:`Counters`), the host random streams (Python's ``random``
and NumPy's global generator, :class:`HostStreams`), seed derivation for every stream,
and :data:`MANIFEST`, the documented list of state entries and where each lives in a
checkpoint. Framework streams (torch CPU/CUDA, Keras seed generators) are captured by
the backends and stored beside these.

Rule (DESIGN §2): the trainer owns its random streams. They are seeded from ``seed``
at construction and on ``restart``, swapped in when a fit call starts and swapped out
when it ends, so code running between calls cannot perturb training and training does
not perturb the caller's global generators.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import numpy as np

#: Stream identifiers mixed into the seed; changing one changes results, so never do.
STREAM_IDS = {
    "python": 1, "numpy": 2, "torch": 3, "cuda": 4, "init": 5, "keras": 6, "loader": 7,
    "sample": 8, "boost": 9,
}  # fmt: skip

#: What a checkpoint holds, by entry: (where, what). Kept in sync with the tests.
MANIFEST: dict[str, tuple[str, str]] = {
    "model": ("tensors model/*", "parameters and buffers"),
    "initial": ("tensors initial/*", "initial weights when the model was passed as an instance"),
    "optimizer": ("tensors optim/* + state.backend.optimizer", "slots and param groups"),
    "schedule": (
        "state.schedule",
        "the schedule in effect, its origin and plan, torch scheduler state",
    ),
    "counters": ("state.counters", "epoch, offset, global step, samples seen, fit calls, run"),
    "rng.host": ("state.rng", "Python random and NumPy global streams"),
    "rng.framework": (
        "tensors rng/*",
        "torch CPU/CUDA generator states, Keras' global seed generator (keras_global)",
    ),
    "data": ("state.data + tensors data/*", "fingerprint, shape, fixed validation split"),
    "callbacks": ("state.callbacks", "each callback's state_dict()"),
    "history": ("state.history", "per-epoch records of the current run"),
    "ledger": ("state.ledger", "one record per fit call, all runs"),
    "call": ("state.call", "the fit call in progress or interrupted: its arguments and end"),
    "step": (
        "state.backend.step + tensors ema/*",
        "torch step options: fp16 scaler, EMA shadow and count, epoch gradient-norm sums",
    ),
    "version": ("state.version", "warmfit version and schema"),
}


def derive_seed(seed: int, stream: str, *extra: int) -> int:
    """A 63-bit seed for ``stream``, independent of every other stream's."""
    ss = np.random.SeedSequence([int(seed), STREAM_IDS[stream], *map(int, extra)])
    return int(
        ss.generate_state(2, dtype=np.uint32).astype(np.uint64)
        @ np.array([1 << 31, 1], dtype=np.uint64)
    )


@dataclass
class Counters:
    """Where training stands. ``epoch`` and ``offset`` are the data cursor."""

    epoch: int = 0  # epochs completed in this run
    offset: int = 0  # samples of epoch ``epoch`` already trained on
    global_step: int = 0  # optimizer steps in this run
    samples_seen: int = 0
    fit_calls: int = 0  # fit calls in this run (the next segment's index)
    run: int = 0  # how many times the trainer was restarted
    schedule_origin: int = 0  # global step at which the schedule's step 0 lies

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, names - set(d)
        if unknown or missing:
            raise ValueError(
                f"counters: unexpected keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        bad = {k: v for k, v in d.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0}
        if bad:
            raise ValueError(f"counters must be non-negative integers; got {bad}")
        return cls(**d)


class HostStreams:
    """Python's ``random`` and NumPy's legacy global generator, as plain JSON data."""

    @staticmethod
    def seeded(seed: int, rank: int = 0) -> dict[str, Any]:
        """The streams right after seeding; rank 0's are those of a single process."""
        py_state, np_state = _seeded(int(seed), int(rank))
        return {"python": _py_to_json(py_state), "numpy": _np_to_json(np_state)}

    @staticmethod
    def capture() -> dict[str, Any]:
        return {
            "python": _py_to_json(random.getstate()),
            "numpy": _np_to_json(_legacy_tuple(np.random.get_state(legacy=True))),
        }

    @staticmethod
    def check(state: dict[str, Any]) -> None:
        """Raise if Python or NumPy would refuse ``state`` (tried on private generators)."""
        random.Random().setstate(_py_from_json(state["python"]))
        np.random.RandomState().set_state(_np_from_json(state["numpy"]))

    @staticmethod
    def install(state: dict[str, Any]) -> None:
        random.setstate(_py_from_json(state["python"]))
        np.random.set_state(_np_from_json(state["numpy"]))


@functools.lru_cache(maxsize=16)
def _seeded(seed: int, rank: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Python's and NumPy's states right after seeding (building a RandomState costs
    ~0.2 ms, and every Trainer and restart needs one); callers only read them."""
    extra = (rank,) if rank else ()
    py = random.Random(derive_seed(seed, "python", *extra))
    gen = np.random.RandomState(derive_seed(seed, "numpy", *extra) % (1 << 32))
    np_state = _legacy_tuple(gen.get_state(legacy=True))
    np_state[1].flags.writeable = False
    return py.getstate(), np_state


def _legacy_tuple(state: tuple[Any, ...] | dict[str, Any]) -> tuple[Any, ...]:
    """A ``RandomState.get_state(legacy=True)`` result as the tuple it is: NumPy's stubs
    allow a dict, which only a non-MT19937 bit generator gives, and a ``RandomState``
    here (the global one or our own seeded one) is always MT19937."""
    return cast("tuple[Any, ...]", state)


def _py_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_from_json(obj: list) -> tuple:
    version, internal, gauss = obj
    return (int(version), tuple(map(int, internal)), gauss)


def _np_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _np_from_json(obj: list) -> tuple:
    name, keys, pos, has_gauss, cached = obj
    return (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
