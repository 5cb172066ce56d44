"""Forked runs: a new run directory that starts from a checkpoint of another run.

A fork is a new run directory whose first checkpoint is the parent's state, bit for bit
(the same tensor file), with one more ledger row: ``{"mode": "fork", "parent": {...}}``.
Its history holds the parent's epochs up to the fork point and its ledger the parent's
fit calls (both are part of the state), so training the fork goes on exactly as the
parent would have (``docs/fork.md``).

Owns: finding the checkpoint a fork starts from (:func:`find_source`), writing the new
run directory all at once (:func:`write_fork`: it is assembled in a temporary sibling
folder and renamed into place, so a failure leaves nothing behind), the parent record
and the lineage (:func:`lineage`, ``lineage.json``), and the Trainers built on a fork
(:func:`fork_trainer` for ``Trainer.fork``, :func:`fork_from` for ``Trainer.fork_from``).

**The parent is only read**: no lock is taken on its run directory and nothing is
written there, so a Trainer may go on training in it (in this process or another) while
it is forked.

Does not own: the checkpoint format (:mod:`warmfit.checkpoint`), the run directory's
layout, ``LATEST`` and retention (:mod:`warmfit.rundir`), the state
(:class:`~warmfit.training_state.TrainingState`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import STATE_FILE, fsync_dir, read_checkpoint, replace_durably, snapshot_state
from .errors import StateMismatchError, WarmfitError
from .history import History
from .rundir import CHECKPOINTS_DIR, RunDir, file_in_the_way, run_dir_of
from .training_state import final_metrics

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "LINEAGE_FILE",
    "ForkError",
    "Source",
    "check_target",
    "describe",
    "find_source",
    "fork_from",
    "fork_trainer",
    "lineage",
    "lineage_lines",
    "source_root",
    "write_fork",
]

LINEAGE_FILE = "lineage.json"
LINEAGE_SCHEMA = 1


class ForkError(WarmfitError, ValueError):
    """A fork cannot be made (a run directory that is not new, a missing checkpoint, a
    Trainer argument that cannot be copied...). Raised before anything is written, or
    after the fork written was removed again."""


@dataclass
class Source:
    """The state a fork starts from: a checkpoint's ``tensors`` and ``state``, the
    ``parent`` record (see :func:`parent_record`) and the metric the parent's run
    directory ranked it by (None: unranked)."""

    tensors: dict[str, np.ndarray]
    state: dict[str, Any]
    parent: dict[str, Any]
    metric: float | None = None

    @property
    def root(self) -> Path | None:
        """The parent's run directory (None: a checkpoint or a Trainer without one)."""
        where = self.parent["run_dir"]
        return None if where is None else Path(where)


# -- the source ---------------------------------------------------------------------------


def find_source(source: str | os.PathLike[str], at: str | None = None) -> Source:
    """Read the checkpoint a fork starts from; write nothing.

    ``source`` is a run directory or a checkpoint folder. In a run directory, ``at``
    chooses the checkpoint as :meth:`Trainer.rewind` does: ``"latest"`` (the default: the
    newest intact one, skipping damaged ones with a warning), ``"best"`` (of the newest
    run), ``"epoch=K"`` (the checkpoint at the end of global epoch K), ``"step=S"``, a
    checkpoint's name (``ckpt-…``) or its path. Raises :class:`ForkError` saying what is
    missing, or :class:`~warmfit.errors.CheckpointError` naming a damaged file.
    """
    path = Path(source)
    if not path.exists():
        raise ForkError(
            f"{path}: no such run directory or checkpoint. Pass the run directory to fork "
            "(or one of its checkpoint folders)."
        )
    if (path / STATE_FILE).is_file():  # a checkpoint folder
        if at not in (None, "latest"):
            raise ForkError(
                f"{path} is a checkpoint folder, and at={at!r} chooses a checkpoint of a "
                "run directory: pass the run directory with at=..., or the checkpoint alone."
            )
        return _read_source(path)
    if not (path / CHECKPOINTS_DIR).is_dir():
        raise ForkError(
            f"{path} is not a run directory (no {CHECKPOINTS_DIR}/ folder in it) nor a "
            f"checkpoint folder (no {STATE_FILE} in it). Pass the run_dir a Trainer or "
            "`warmfit train` wrote, or one of its checkpoint folders."
        )
    run_dir = RunDir(path)
    kept = run_dir.checkpoints()
    if not kept:
        raise ForkError(
            f"{path} holds no checkpoint yet: there is nothing to fork. Train it first "
            "(a fit call ends with a checkpoint)."
        )
    at = "latest" if at is None else at
    if at == "latest":
        loaded = run_dir.load_latest()  # the newest intact one
        assert loaded is not None  # there are checkpoints
        newest, tensors, state = loaded
        return _read_source(newest, tensors, state)
    epoch, step = _number(at, "epoch"), _number(at, "step")
    names = [p.name for p in kept]
    why = "no such checkpoint"
    try:
        found: Path | None = run_dir.find(at, epoch=epoch, step=step)
    except ValueError:
        found = None
        if at == "best":
            why = "none of the newest run's checkpoints records a metric to rank them by"
    if found is not None and found.is_dir() and not _same_dir(run_dir_of(found), path):
        why = f"{found} is a checkpoint of another run directory"
    elif found is not None and found.is_dir():
        return _read_source(found)
    raise ForkError(
        f"cannot fork {path} at {at!r}: {why}. Its checkpoints: {names}; at= takes one of "
        "their names, 'latest', 'best', 'epoch=K' or 'step=S'."
    )


def _same_dir(a: Path | None, b: Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def _number(at: str, key: str) -> int | None:
    """K of ``"key=K"`` (None for any other ``at``); a K that is no integer >= 0 is refused."""
    if not at.startswith(key + "="):
        return None
    text = at[len(key) + 1 :]
    if not text.isdigit():
        raise ForkError(f"at={at!r}: expected {key}=K with an integer K >= 0.")
    return int(text)


def _read_source(
    path: Path,
    tensors: dict[str, np.ndarray] | None = None,
    state: dict[str, Any] | None = None,
) -> Source:
    """A checkpoint folder read (every checksum checked) as a :class:`Source`."""
    checksum = _checksum(path)  # before the arrays: read_checkpoint then checks this one
    if tensors is None or state is None:
        tensors, state = read_checkpoint(path)
    root = run_dir_of(path)
    metric = None if root is None else RunDir(root).metric(path)
    return Source(tensors, state, parent_record(state, root, path, checksum), metric)


def _checksum(path: Path) -> str | None:
    """``"<algorithm>:<hex>"``: the checksum of the checkpoint's tensor file its
    ``state.json`` records (read_checkpoint verifies the file against it)."""
    try:
        doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        algorithm = doc.get("checksum", "sha256")  # schema 1: sha256, no field
        digest = doc.get("tensors_checksum", doc.get("tensors_sha256"))
    except (OSError, ValueError, AttributeError):
        return None  # read_checkpoint names what is wrong
    return f"{algorithm}:{digest}" if isinstance(digest, str) else None


def parent_record(
    state: Mapping[str, Any],
    root: Path | None,
    checkpoint: Path | None,
    checksum: str | None,
) -> dict[str, Any]:
    """What a fork records of its parent: ``run_dir`` (absolute; None for a Trainer
    without one, or a checkpoint folder outside a run directory), ``checkpoint`` (the
    folder's name in ``run_dir``, its absolute path outside one, None for a state that
    was not a checkpoint), where it stood (``run``, ``epoch``, ``offset``, ``step``) and
    ``checksum``, the checkpoint's tensor-file checksum as its ``state.json`` records it
    (the fork's first checkpoint has the same tensor file, byte for byte)."""
    c = state["counters"]
    name = None
    if checkpoint is not None:
        name = checkpoint.name if root is not None else str(checkpoint.resolve())
    return {
        "run_dir": None if root is None else str(root.resolve()),
        "checkpoint": name,
        "run": c["run"],
        "epoch": c["epoch"],
        "offset": c["offset"],
        "step": c["global_step"],
        "checksum": checksum,
    }


# -- writing the fork ---------------------------------------------------------------------


def check_target(target: str | os.PathLike[str], parent: Path | None) -> Path:
    """Refuse a fork's new run directory unless it is new or an empty directory, and
    outside the parent's; return it as a Path. Writes nothing."""
    target = Path(target)
    if parent is not None:
        mine, theirs = Path(os.path.realpath(target)), Path(os.path.realpath(parent))
        if mine == theirs or mine.is_relative_to(theirs):
            where = "is the parent's run directory" if mine == theirs else (
                f"lies inside the parent's run directory {parent}"
            )  # fmt: skip
            raise ForkError(
                f"cannot fork into {target}: it {where}, which a fork never changes. Pass "
                "a new directory outside it (e.g. a sibling of it)."
            )
    path = file_in_the_way(target)
    if path is not None:
        where = "is" if path == target else f"lies under {path}, which is"
        raise ForkError(
            f"cannot fork into {target}: it {where} not a directory. Pass a new "
            "directory (it is created) or an empty one."
        )
    if target.is_dir():
        held = RunDir(target).checkpoints() if (target / CHECKPOINTS_DIR).is_dir() else []
        if held:
            raise ForkError(
                f"cannot fork into {target}: it already holds checkpoints ({len(held)}, the "
                f"newest {held[-1].name}). A fork starts a new run directory: pass a new or "
                "empty one. To train that run on, build a Trainer on it (or `warmfit train "
                f"SPEC --run-dir {target}`)."
            )
        entries = sorted(os.listdir(target))
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ForkError(
                f"cannot fork into {target}: it is not empty (it holds {shown}). A fork "
                "starts a new run directory: pass a new or empty one."
            )
    return target


@dataclass
class Written:
    """A fork's run directory as :func:`write_fork` left it: what :meth:`discard` must
    undo if the Trainer built on it fails."""

    root: Path
    checkpoint: Path
    was_empty_dir: bool
    made_parents: list[Path]

    def discard(self) -> None:
        """Remove the fork again (an empty directory that was there before stays)."""
        trash = self.root.parent / f".trash-fork-{self.root.name}-{secrets.token_hex(4)}"
        with contextlib.suppress(OSError):
            os.rename(self.root, trash)
            shutil.rmtree(trash, ignore_errors=True)
            if self.was_empty_dir:
                self.root.mkdir()
        _remove_empty(self.made_parents)


def write_fork(target: str | os.PathLike[str], source: Source) -> Written:
    """Write the fork of ``source`` as the new run directory ``target`` (new or empty).

    The directory is assembled in a temporary sibling (``.tmp-fork-*``) and renamed into
    place, so it appears whole or not at all: its first checkpoint (the source's state,
    with a ledger row ``{"mode": "fork", "parent": ...}``; ranked by the source's metric),
    ``ledger.jsonl`` (the parent's fit calls up to the checkpoint, then that row), the
    run's ``history-run<N>.jsonl`` (the parent's epochs up to the checkpoint) and
    ``lineage.json`` (the parent and the ancestors before it, nearest first). Raises
    :class:`ForkError` if ``target`` is not new (see :func:`check_target`)."""
    target = check_target(target, source.root)
    state = copy.deepcopy(source.state)
    ledger, history = state["ledger"], state["history"]
    c = state["counters"]
    row = {
        "call": len(ledger),
        "run": c["run"],
        "mode": "fork",
        "parent": dict(source.parent),
        "epoch_start": c["epoch"],
        "step_start": c["global_step"],
        "step_end": c["global_step"],
        "epochs_done": 0,
        "wall_s": 0.0,
        "final": final_metrics(History(history), history[-1]["segment"]) if history else {},
    }
    ledger.append(row)
    where = Path(os.path.abspath(target))  # its folder holds the temporary sibling
    made = [p for p in reversed(where.parents) if not p.exists()]
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = where.parent / f".tmp-fork-{where.name}-{os.getpid()}-{secrets.token_hex(4)}"
    was_empty_dir = where.is_dir()
    try:
        staging.mkdir()
        run_dir = RunDir(staging, keep_last=None)
        with run_dir:  # RunDir.save writes under the lock (of the folder no one else sees)
            saved = run_dir.save(
                source.tensors, state, step=c["global_step"], metric=source.metric, run=c["run"]
            )
        _write_jsonl(staging / "ledger.jsonl", ledger)
        _write_jsonl(staging / f"history-run{c['run']}.jsonl", history)
        doc = {
            "schema_version": LINEAGE_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": saved.name,
            "parent": row["parent"],
            "ancestors": lineage(ledger)[1:],
        }
        replace_durably(staging / LINEAGE_FILE, (json.dumps(doc, indent=1) + "\n").encode())
        fsync_dir(staging)
        try:
            os.rename(staging, where)  # over an empty directory too; never over files
        except OSError as err:
            raise ForkError(
                f"cannot fork into {target}: it was created or filled while the fork was "
                f"written ({err.strerror}). Nothing was written; pass a new directory."
            ) from None
        fsync_dir(where.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        raise
    return Written(target, target / CHECKPOINTS_DIR / saved.name, was_empty_dir, made)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    replace_durably(path, text.encode("utf-8"))


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a fork created for its run directory, deepest first, if empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


# -- lineage ------------------------------------------------------------------------------


def lineage(ledger: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The parent records of a run's forks, nearest first: the parent, its parent, ...
    (each fork row of the ledger says where the run came from at that point)."""
    rows = [r["parent"] for r in ledger if r.get("mode") == "fork"]
    return [dict(p) for p in reversed(rows) if isinstance(p, Mapping)]


def lineage_lines(ledger: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lineage as ``warmfit history`` prints it: a heading, then one line per
    ancestor, nearest first (nothing for a run that is not a fork)::

        == lineage: forked from /runs/a (2 generations)
        parent: /runs/a, checkpoint ckpt-00000002-run000-step-000000000036 (run 0, epoch 2,
        step 36)
        grandparent: /runs/base, checkpoint ckpt-... (run 0, epoch 1 and 64 samples, step 20)

    (one line each; the first is wrapped here)
    """
    parents = lineage(ledger)
    if not parents:
        return []
    where = [p.get("run_dir") or "a Trainer without run_dir" for p in parents]
    more = f" ({len(parents)} generations)" if len(parents) > 1 else ""
    out = [f"== lineage: forked from {where[0]}{more}"]
    for i, p in enumerate(parents):
        who = "parent" if i == 0 else "great-" * (i - 1) + "grandparent"
        at = f"run {p.get('run')}, epoch {p.get('epoch')}"
        if p.get("offset"):
            at += f" and {p['offset']} samples"
        at += f", step {p.get('step')}"
        name = p.get("checkpoint") or "(unsaved state)"
        out.append(f"{who}: {where[i]}, checkpoint {name} ({at})")
    return out


# -- the Trainer on a fork ----------------------------------------------------------------


def fork_from(
    cls: type[Trainer],
    checkpoint: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    model: Any,
    **kwargs: Any,
) -> Trainer:
    """``Trainer.fork_from``: write the fork of ``checkpoint`` (a checkpoint folder, or a
    run directory: its newest intact checkpoint) as the new run directory ``run_dir``,
    then build ``cls(model, run_dir=run_dir, **kwargs)`` on it, which resumes from the
    fork's checkpoint and holds its lock. If that Trainer cannot be built (a model of
    another architecture), the fork is removed again and the error raised."""
    target = Path(run_dir)
    check_target(target, source_root(checkpoint))  # before reading the parent
    source = find_source(checkpoint)
    written = write_fork(target, source)
    trainer = _build(written, lambda: cls(model, run_dir=target, **kwargs))
    if trainer.verbose and trainer.rank == 0:
        print(f"warmfit: forked {describe(source.parent)} into {target}", flush=True)
    return trainer


def describe(parent: Mapping[str, Any]) -> str:
    """A parent record in a few words: ``/runs/a at ckpt-… (epoch 2, step 36)``."""
    where = parent.get("run_dir") or "a Trainer without run_dir"
    what = parent.get("checkpoint") or "its unsaved state"
    return f"{where} at {what} (epoch {parent.get('epoch')}, step {parent.get('step')})"


def source_root(source: str | os.PathLike[str]) -> Path | None:
    """The run directory of a fork's source (a run directory, or a checkpoint folder of
    one; None for a checkpoint folder elsewhere). Reads nothing but the folder names."""
    path = Path(source)
    return path if (path / CHECKPOINTS_DIR).is_dir() else run_dir_of(path)


def fork_trainer(
    trainer: Trainer,
    run_dir: str | os.PathLike[str],
    arguments: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> Trainer:
    """``Trainer.fork``: write ``trainer``'s current state as the first checkpoint of the
    new run directory ``run_dir`` and build a Trainer there with its constructor's
    ``arguments`` (deep copies: the model, the callbacks; functions stay themselves),
    the schedule in effect and ``overrides`` (which replace any argument, e.g. a
    ``model=`` where the model cannot be copied). ``trainer`` and its run directory are
    left as they are. Refused under torchrun (fork the run directory instead)."""
    if trainer.world_size > 1:
        raise ForkError(
            "Trainer.fork is not supported under torchrun (each rank would write a fork). "
            "Fork the run directory from one process: `warmfit fork RUN_DIR NEW_RUN_DIR`, "
            "then start the job on NEW_RUN_DIR."
        )
    parent_root = None if trainer.run_dir is None else Path(trainer.run_dir.root)
    target = check_target(run_dir, parent_root)
    given = {**arguments, "schedule": trainer.schedule, "callbacks": list(trainer.callbacks)}
    kept = {k: v for k, v in given.items() if k not in overrides and k != "run_dir"}
    copied = _copied(kept)
    trainer.checkpointer.wait()  # the trainer's own save in flight lands first
    source = _current_source(trainer)
    written = write_fork(target, source)
    try:
        new = _build(written, lambda: type(trainer)(run_dir=target, **copied, **overrides))
    except StateMismatchError as err:
        if "model" in overrides:
            raise
        # A copy that does not load its original's state (a Keras deepcopy names its
        # variables without the model's scope): the model must be given.
        raise ForkError(
            "Trainer.fork copied the model with copy.deepcopy, and the copy does not load "
            f"this trainer's state ({err}). Pass model=... to fork: a new model built the "
            "same way (its weights come from the fork's checkpoint), or build the Trainer "
            "with a model factory, which fork calls again. Nothing was written."
        ) from None
    if trainer.verbose:
        print(f"warmfit: forked {describe(source.parent)} into {target}", flush=True)
    return new


def _copied(arguments: dict[str, Any]) -> dict[str, Any]:
    """Deep copies of the arguments, in one ``deepcopy`` (objects they share stay shared);
    an argument that cannot be copied is named, with what to pass instead."""
    try:
        return copy.deepcopy(arguments)
    except Exception:  # find which one, for the message
        for name, value in arguments.items():
            try:
                copy.deepcopy(value)
            except Exception as err:
                hint = (
                    "a new model of the same architecture (its weights come from the fork's "
                    "checkpoint), or build the Trainer with a model factory, which fork calls "
                    "again"
                    if name == "model"
                    else f"a {name} of its own"
                )
                raise ForkError(
                    f"Trainer.fork cannot copy the Trainer's {name!r} argument "
                    f"({type(value).__name__}: {type(err).__name__}: {err}). Pass "
                    f"{name}=... to fork: {hint}."
                ) from None
        raise


def _current_source(trainer: Trainer) -> Source:
    """The trainer's current state as a fork's source; its parent record names the
    trainer's newest checkpoint if that checkpoint holds this very state (read once to
    tell), else no checkpoint."""
    sd = trainer.state_dict()
    tensors, state = sd["tensors"], snapshot_state(sd["state"])  # as a checkpoint reads
    run_dir = trainer.run_dir
    root = None if run_dir is None else Path(run_dir.root)
    latest = None if run_dir is None else _holding(run_dir, tensors, state)
    if root is not None and latest is not None:
        parent = parent_record(state, root, latest, _checksum(latest))
        return Source(tensors, state, parent, run_dir.metric(latest))
    parent = parent_record(state, root, None, None)
    return Source(tensors, state, parent, trainer.checkpointer.metric_of(trainer.state))


def _holding(run_dir: RunDir, tensors: Mapping[str, np.ndarray], state: Any) -> Path | None:
    """The run directory's newest checkpoint if it holds this state, bit for bit."""
    try:
        latest = run_dir.latest()
        if latest is None:
            return None
        saved_tensors, saved_state = read_checkpoint(latest)
    except (WarmfitError, OSError):  # damaged: not this state
        return None
    return latest if _same(tensors, state, saved_tensors, saved_state) else None


def _same(ta: Mapping[str, np.ndarray], sa: Any, tb: Mapping[str, np.ndarray], sb: Any) -> bool:
    """Whether two states are the same, bit for bit (arrays by dtype, shape and bytes;
    the JSON part as JSON text)."""
    if set(ta) != set(tb):
        return False
    for name, a in ta.items():
        b = tb[name]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return False
    return json.dumps(sa, sort_keys=True) == json.dumps(sb, sort_keys=True)


def _build(written: Written, build: Callable[[], Trainer]) -> Trainer:
    """The Trainer built on a fork just written; the fork is removed if that fails."""
    try:
        trainer = build()
    except BaseException:
        written.discard()
        raise
    return trainer
