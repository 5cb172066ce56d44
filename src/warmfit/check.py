"""Check that a training setup resumes exactly: ``warmfit check-resume SPEC --steps N``.

Owns: :func:`check_resume` (train N steps straight, and the same N steps split by a
save and a load into a fresh Trainer; compare the states bit for bit; on a difference,
find the first step where the two runs diverge and the state entries that differ),
:func:`compare_states` and the :class:`Report`.

Does not own: training or checkpoints — it uses the public ``Trainer.fit(steps=)``,
``Trainer.save`` and ``Trainer.load_state_dict`` with
:func:`warmfit.checkpoint.read_checkpoint`, exactly as a user's resume would.

What is compared (what a resume must reproduce): every tensor of the state (weights,
optimizer slots, framework RNG streams, validation rows, callback arrays) by dtype,
shape and bytes, and every JSON part of it type for type and float by float bit for bit
(NaN equals NaN, -0.0 differs from 0.0): the counters (except ``fit_calls``, which
differs by design), the host RNG streams (every rank's), the partial epoch, the
backend's state (optimizer param groups, scheduler), the schedule, the data record, the
fit call in progress, the callbacks' states, the version and the history values (not
the segment, mode and times of a record, which say which call wrote it and when). Not
compared: the ledger and the settings (see :data:`NOT_COMPARED`).

A straight run that a callback stops early (EarlyStopping at step S < N) is compared
over the S steps it trained, with every cut before S, and the report says so: a run
split at or after S would train on in its next fit call (an early stop ends one fit
call, not the run), which says nothing about resuming.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calls import validation_split_rows
from .checkpoint import read_checkpoint
from .spec import Spec

#: History keys that say which call wrote a record, or when: not training results.
HISTORY_META = ("segment", "mode", "time", "wall_s")
#: The parts of ``state_dict()["state"]`` compared, in this order; a part not listed here
#: nor in :data:`NOT_COMPARED` (one a later version adds) is compared too, after these.
STATE_KEYS = (
    "version",
    "counters",
    "rng",
    "epoch_partial",
    "backend",
    "schedule",
    "data",
    "call",
    "callbacks",
    "history",
)
#: The parts of the state that say how a run was driven, not what it trained: not compared.
NOT_COMPARED = {
    "ledger": "the record of the fit calls, their arguments and wall times: a run split "
    "into calls has more rows than the straight one by design, and what the calls did is "
    "in the compared parts (counters, history, data, the call in progress)",
    "settings": "the Trainer's construction arguments (batch size, seed, the model's and "
    "optimizer's description, device, threads): not results of training; a load compares "
    "them with its own and warns or refuses, and a difference that changes training shows "
    "in the compared parts",
}


@dataclass
class Report:
    """The result of :func:`check_resume`.

    ``exact``: the split runs ended bit-identical to the straight one. Otherwise
    ``first_step`` is the first global step after which the runs differ (None if a
    step-by-step rerun did not reproduce the difference), ``cut`` the step where that
    split run was saved and loaded, and ``entries`` the state entries that differ there.
    ``steps`` is the number of steps compared: fewer than ``asked`` when the straight
    run was stopped early, by ``stopped_by`` (a callback's name), at step ``steps``.
    """

    exact: bool
    steps: int
    cuts: list[int]
    first_step: int | None = None
    cut: int | None = None
    entries: list[str] = field(default_factory=list)
    note: str = ""
    asked: int | None = None
    stopped_by: str | None = None

    def __str__(self) -> str:
        cuts = ", ".join(str(k) for k in self.cuts)
        stop = self._stop_line()
        if self.exact:
            return (
                "exact\n"
                f"{self.steps} steps straight == k steps, save, load into a fresh Trainer, "
                f"{self.steps} - k steps (k = {cuts}): weights, optimizer state, counters, "
                "RNG streams, schedule, callbacks and history are bit-identical." + stop
            )
        where = (
            f"first divergence after step {self.first_step}"
            if self.first_step is not None
            else "the runs differ after the last step"
        )
        shown = self.entries[:8]
        lines = [
            f"not exact: {self.steps} steps straight differ from the run saved and loaded "
            f"at step {self.cut}",
            f"{where}; the state entries that differ:",
            *[f"  {e}" for e in shown],
        ]
        if len(self.entries) > len(shown):
            lines.append(f"  ... and {len(self.entries) - len(shown)} more")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines) + stop

    def _stop_line(self) -> str:
        if self.stopped_by is None:
            return ""
        return (
            f"\nThe straight run was stopped by {self.stopped_by} at step {self.steps}, "
            f"before the {self.asked} steps asked: the {self.steps} steps it trained were "
            "compared."
        )


def check_resume(spec: Spec, steps: int, *, cuts: list[int] | None = None) -> Report:
    """Train ``steps`` steps straight and split (save, load into a fresh Trainer, go on)
    at each cut (default: ``steps // 2``, plus a cut in the middle of an epoch), and
    compare the final states. Training output and warnings are silenced.

    If a callback stops the straight run at step S before ``steps`` (EarlyStopping),
    the S steps it trained are compared instead, and the report names the callback:
    the default cuts are then chosen below S, and a cut given at or after S is a
    ValueError saying to pass cuts below S or ``steps`` S or fewer (so is S < 2)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(
            f"check_resume needs steps >= 2 (to cut the run in two). Got {steps!r} instead."
        )
    for k in cuts or ():
        if not 0 < k < steps:
            raise ValueError(f"a cut must be in [1, {steps - 1}]. Got {k!r} instead.")
    with _quiet():
        data = spec.load_data()
        fit_kwargs = data.fit_kwargs()

        def fresh() -> Any:
            return spec.build_trainer(run_dir=None, verbose=0)

        def fit(trainer: Any, n: int) -> None:
            trainer.fit(data.x, data.y, steps=n, **fit_kwargs)

        straight = fresh()
        fit(straight, steps)
        asked, stopped_by = steps, None
        if straight.global_step < steps:  # a callback ended the call early
            stopped_by = straight.ledger[-1].get("stopped_by") or "a callback"
            steps = straight.global_step
            _check_early_stop(stopped_by, steps, asked, cuts)
        if cuts is None:
            cuts = default_cuts(steps, _steps_per_epoch(spec, data))
        report = _compare_splits(straight.state_dict(), fresh, fit, steps, cuts)
    if stopped_by is not None:
        report.asked, report.stopped_by = asked, stopped_by
    return report


def _check_early_stop(stopped_by: str, stopped_at: int, asked: int, cuts: list[int] | None) -> None:
    """Refuse what cannot be compared after the straight run stopped at ``stopped_at``."""
    stop = (
        f"the straight run was stopped by {stopped_by} at step {stopped_at}, before the "
        f"{asked} steps asked"
    )
    if stopped_at < 2:
        raise ValueError(
            f"{stop}: too early to cut it in two. Let it train longer (relax {stopped_by} "
            "in the spec) to check resuming."
        )
    late = [k for k in cuts or () if k >= stopped_at]
    if late:
        raise ValueError(
            f"{stop}, so a run cut at step {late[0]} would go on training after it in its "
            f"next fit call and cannot be compared. Pass --cut below {stopped_at}, or "
            f"--steps {stopped_at} or fewer."
        )


def _compare_splits(
    reference: Mapping[str, Any], fresh: Any, fit: Any, steps: int, cuts: list[int]
) -> Report:
    """Train ``steps`` steps split at each cut by a save and a load, and compare the
    final state with ``reference`` (the straight run's ``state_dict()``)."""
    with tempfile.TemporaryDirectory(prefix="warmfit-check-") as tmp:
        for i, k in enumerate(cuts):
            split = fresh()
            fit(split, k)
            split = _save_and_load(split, fresh, Path(tmp) / f"cut{i}")
            fit(split, steps - k)
            entries = compare_states(reference, split.state_dict(), split)
            if entries:
                report = _first_divergence(fresh, fit, steps, k, Path(tmp) / f"bisect{i}")
                if report is None:
                    return Report(
                        False, steps, cuts, None, k, entries,
                        "A step-by-step rerun did not diverge: the difference depends on "
                        "how the steps are grouped into fit calls.",
                    )  # fmt: skip
                report.cuts = cuts
                return report
    return Report(True, steps, cuts)


def default_cuts(steps: int, steps_per_epoch: int) -> list[int]:
    """``steps // 2``, and a cut in the middle of an epoch if that one is on a boundary."""
    k = steps // 2
    cuts = [k]
    if steps_per_epoch > 1 and k % steps_per_epoch == 0:
        mid = k - steps_per_epoch // 2
        if mid < 1:
            mid = k + steps_per_epoch // 2
        if 0 < mid < steps:
            cuts.append(mid)
    return cuts


def compare_states(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    trainer: Any = None,
    *,
    labels: tuple[str, str] = ("straight", "split"),
) -> list[str]:
    """The state entries that differ between two ``Trainer.state_dict()`` results (or a
    checkpoint's ``{"tensors": ..., "state": ...}``), each named for a person: the
    parameter, the optimizer slot (and its parameter, when ``trainer`` is given), the RNG
    stream, the counter. An empty list: the two states are the same, bit for bit.

    Tensors are compared by dtype, shape and bytes. The JSON parts are compared type for
    type, floats by their bits (NaN equals NaN; -0.0 differs from 0.0): every part of
    the state but the ledger and the settings, which describe how the run was driven,
    not what it trained (:data:`NOT_COMPARED` says why for each); ``fit_calls`` among the
    counters (a split run makes more calls by design); and the segment, mode and times
    of a history record (which call wrote it, and when). ``labels`` name ``a`` and ``b``
    in the entries."""
    first, second = labels
    names = _optimizer_param_names(trainer)
    out: list[str] = []
    ta, tb = a["tensors"], b["tensors"]
    for name in [*ta, *(k for k in tb if k not in ta)]:
        if name not in ta or name not in tb:
            side = first if name not in ta else second
            out.append(f"{_describe_tensor(name, names)}: missing in the {side} run")
            continue
        x, y = np.asarray(ta[name]), np.asarray(tb[name])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(_describe_tensor(name, names) + _tensor_difference(x, y, labels))
    sa, sb = a["state"], b["state"]
    present = set(sa) | set(sb)
    extra = sorted(k for k in present if k not in STATE_KEYS and k not in NOT_COMPARED)
    for key in [*(k for k in STATE_KEYS if k in present), *extra]:
        if key not in sa or key not in sb:
            side = first if key not in sa else second
            out.append(f"state entry {key}: missing in the {side} run")
            continue
        va, vb = sa[key], sb[key]
        if key == "counters":
            va = {k: v for k, v in (va or {}).items() if k != "fit_calls"}
            vb = {k: v for k, v in (vb or {}).items() if k != "fit_calls"}
            for c in sorted(set(va) | set(vb)):
                if c not in va or c not in vb or not same_value(va[c], vb[c]):
                    out.append(f"counter {c}: {va.get(c)} {first}, {vb.get(c)} {second}")
        elif key == "rng" and isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _rng_differences(va, vb)
        elif key == "history":
            ha, hb = _history_values(va or []), _history_values(vb or [])
            if len(ha) != len(hb):
                out.append(f"history: {len(ha)} epochs {first}, {len(hb)} {second}")
            for ra, rb in zip(ha, hb, strict=False):
                for k in sorted(set(ra) | set(rb)):
                    if k not in ra or k not in rb or not same_value(ra[k], rb[k]):
                        out.append(f"history epoch {ra.get('epoch')} {k}: {ra.get(k)!r} "
                                   f"{first}, {rb.get(k)!r} {second}")  # fmt: skip
        else:
            for path in _diff_paths(va, vb, key):
                out.append(f"{_describe_state(path)} ({path})")
    return out


# -- internals ------------------------------------------------------------------------------


def _rng_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The host RNG streams that differ, rank 0's (``rng.host``) and every other rank's
    (``rng.host_ranks``), and any other entry of ``rng``."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if key == "host" and isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += [f"RNG stream {s} (rng.host.{s})" for s in _streams_differing(va, vb)]
        elif key == "host_ranks" and isinstance(va, Mapping) and isinstance(vb, Mapping):
            for rank in sorted(set(va) | set(vb), key=str):
                streams = _streams_differing(va.get(rank, {}), vb.get(rank, {}))
                out += [
                    f"RNG stream {s} of rank {rank} (rng.host_ranks.{rank}.{s})" for s in streams
                ]
        elif key not in a or key not in b:
            out.append(f"RNG state (rng.{key})")
        else:
            out += [f"RNG state ({p})" for p in _diff_paths(va, vb, f"rng.{key}")]
    return out


def _streams_differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    names = sorted(set(a) | set(b))
    return [s for s in names if s not in a or s not in b or not same_value(a[s], b[s])]


def _save_and_load(trainer: Any, fresh: Any, path: Path) -> Any:
    trainer.save(path)
    tensors, state = read_checkpoint(path)
    restored = fresh()
    restored.load_state_dict({"tensors": tensors, "state": state})
    return restored


def _first_divergence(fresh: Any, fit: Any, steps: int, cut: int, tmp: Path) -> Report | None:
    """Step both runs one step at a time; the first step whose states differ."""
    straight, split = fresh(), fresh()
    for step in range(1, steps + 1):
        fit(straight, 1)
        fit(split, 1)
        entries = compare_states(straight.state_dict(), split.state_dict(), split)
        if entries:
            return Report(False, steps, [cut], step, cut, entries, _hint(entries, step, cut))
        if step == cut:
            split = _save_and_load(split, fresh, tmp)
            entries = compare_states(straight.state_dict(), split.state_dict(), split)
            if entries:
                note = (
                    f"The state differs right after the save and load at step {cut}: these "
                    "entries do not survive a checkpoint round trip."
                )
                return Report(False, steps, [cut], cut, cut, entries, note)
    return None


def _hint(entries: list[str], step: int, cut: int) -> str:
    owned = ("RNG stream", "counter")
    if not any(e.startswith(owned) for e in entries):
        when = "before the save and load" if step <= cut else "after the save and load"
        return (
            f"The runs diverge {when} while every random stream warmfit owns and every "
            "counter agree: the model, the loss or the data draws randomness warmfit does "
            "not own (an unseeded or private generator such as a module-level "
            "random.Random()), or uses a nondeterministic operation. Draw from the global "
            "random / numpy / torch generators (warmfit saves and restores them)."
        )
    return ""


def _steps_per_epoch(spec: Spec, data: Any) -> int:
    n = len(data.x)
    if data.validation_split is not None:
        n = len(validation_split_rows(n, data.validation_split, spec.seed)[0])
    return max(1, -(-n // spec.batch_size))


def _optimizer_param_names(trainer: Any) -> dict[str, str]:
    """optimizer state index -> parameter name, for a torch model and optimizer."""
    try:
        model, optimizer = trainer.model, trainer.optimizer
        by_id = {id(p): name for name, p in model.named_parameters()}
        out, index = {}, 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                out[str(index)] = by_id.get(id(p), f"#{index}")
                index += 1
        return out
    except Exception:  # another framework, or no trainer: the raw names are still exact
        return {}


def _describe_tensor(name: str, param_names: Mapping[str, str]) -> str:
    kind, _, rest = name.partition("/")
    if kind == "model":
        return f"parameter {rest} ({name})"
    if kind == "optim":
        index, _, slot = rest.partition("/")
        param = param_names.get(index)
        of = f" of parameter {param}" if param else f" of parameter #{index}"
        return f"optimizer slot {slot}{of} ({name})"
    if kind == "rng":
        return f"RNG stream {rest} ({name})"
    if kind == "initial":
        return f"initial weights {rest} ({name})"
    return name


def _tensor_difference(
    x: np.ndarray, y: np.ndarray, labels: tuple[str, str] = ("straight", "split")
) -> str:
    if x.shape != y.shape or x.dtype != y.dtype:
        return f": {x.dtype}{list(x.shape)} {labels[0]}, {y.dtype}{list(y.shape)} {labels[1]}"
    if x.dtype.kind != "f" or x.size == 0:
        return ""
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return f": max |difference| {float(np.nanmax(diff)):.3g}"


#: (prefix of a state path, what it is, for a person), first match wins
_STATE_NAMES = (
    ("backend.optimizer", "optimizer state"),
    ("backend.scheduler", "LR scheduler state"),
    ("schedule", "schedule"),
    ("epoch_partial", "the partial epoch's loss sum"),
    ("callbacks", "callback state"),
    ("data", "the record of the training data"),
    ("call", "the fit call in progress"),
    ("version", "the warmfit version or framework"),
)


def _describe_state(path: str) -> str:
    return next((name for prefix, name in _STATE_NAMES if path.startswith(prefix)), "state")


def _diff_paths(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                yield f"{path}.{k}"
            else:
                yield from _diff_paths(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff_paths(x, y, f"{path}[{i}]")
    elif not same_value(a, b):
        yield path


def same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same value of the same type; floats by their bits (NaN
    equals NaN whatever its payload: JSON keeps none; -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (float, np.floating)):
        if math.isnan(a) and math.isnan(b):
            return True
        if isinstance(a, float):
            return struct.pack("<d", a) == struct.pack("<d", b)
        return bool(np.asarray(a).tobytes() == np.asarray(b).tobytes())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping):
        return set(a) == set(b) and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)


def _history_values(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in HISTORY_META} for r in records]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
