"""A fit call: what it asks for, where it ends, and the data it may go on with.

Owns: :class:`PlannedCall` (a fit call checked and planned, before anything changes),
the same-call rule of E8 (a requeued call finishes the interrupted one:
:func:`same_call`), the checks of the data a ``continue`` goes on with
(:func:`check_data`), the fixed validation split, the words the ledger and the messages
use for a call (:func:`describe_request`, :func:`call_end`).

Does not own: the arguments' declared constraints (:mod:`warmfit.plan`), the modes
table (:mod:`warmfit.modes`), the loop (:mod:`warmfit.loop`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from . import modes
from .control import ModeOperations, check_plateau
from .data import check_offset, validation_split
from .errors import StateMismatchError, TrainingInterrupted, invalid_param
from .horizons import Move, Plan, check_call, moves_for_call
from .loop import FitCall
from .schedules import Schedule, as_schedule, describe
from .training_state import EXACTNESS_SETTINGS, setting_of

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class PlannedCall:
    """A fit call after every check: the request (what makes it "the same call"), where
    it ends, the mode applied, the data, and what the ledger records of its start."""

    request: dict[str, Any]
    mode: str  # as asked
    mode_applied: str  # "continue" for a call that finishes an interrupted one
    resumes: dict[str, Any] | None  # the interrupted call this one finishes
    abandoned: dict[str, Any] | None  # the interrupted call this one leaves unfinished
    target: int | None
    step_target: int | None
    data: Any
    val_data: Any
    val_rows: np.ndarray | None
    data_record: dict[str, Any]
    data_changed: str | None  # the warning a changed (same-shape) data gives
    schedule: Any  # the new schedule, or None
    verbose: int
    asked: dict[str, Any] = field(default_factory=dict)  # epochs, until_epoch, steps
    moves: list[Move] = field(default_factory=list)  # what the call does to the schedule's plan
    policy: str | None = None  # the call's past_horizon


def request_of(
    mode: str,
    epochs: int | None,
    until_epoch: int | None,
    steps: int | None,
    *,
    new_data: bool,
    shuffle: bool,
    validation_split: float | None,
    fingerprint: str,
    past_horizon: str | None = None,
    cooldown: bool = False,
) -> dict[str, Any]:
    """What makes a fit call "the same call" (E8): its arguments and its data
    (``past_horizon`` and ``cooldown`` only where given)."""
    optional: dict[str, Any] = {"past_horizon": past_horizon} if past_horizon else {}
    optional.update({"cooldown": True} if cooldown else {})
    return {
        **optional,
        "mode": mode,
        "epochs": epochs,
        "until_epoch": until_epoch,
        "steps": steps,
        "new_data": new_data,
        "shuffle": shuffle,
        "validation_split": validation_split,
        "fingerprint": fingerprint,
    }


def ends(
    mode: str, epochs: int | None, until_epoch: int | None, steps: int | None, counters: Any
) -> tuple[int | None, int | None]:
    """Where a new call ends: (global epoch target, global step target), one of them
    None. Refuses an ``until_epoch`` that would train nothing."""
    start_epoch = 0 if mode == "restart" else counters.epoch
    step_start = 0 if mode == "restart" else counters.global_step
    if steps is not None:
        return None, step_start + steps
    target = start_epoch + epochs if epochs is not None else until_epoch
    assert target is not None
    if target <= start_epoch:
        raise ValueError(
            f"until_epoch={until_epoch} is at or below the current epoch {start_epoch}: "
            "no training would occur. Pass a larger until_epoch, epochs=N for N more "
            "epochs, or mode='restart' to train from scratch."
        )
    return target, None


def plan_call(
    trainer: Trainer, p: Mapping[str, Any], x: Any, y: Any, validation_data: Any, schedule: Any
) -> PlannedCall:
    """Check everything a fit call needs (``p``: its validated arguments) and plan it;
    nothing changes. Raises ``ValueError``, ``TypeError`` or
    :class:`~warmfit.errors.StateMismatchError`."""
    mode = p["mode"]
    epochs, until_epoch, steps = p["epochs"], p["until_epoch"], p["steps"]
    if p["rounds"] is not None:
        if epochs is not None:
            raise ValueError("Pass either 'rounds' or 'epochs' (they mean the same), not both.")
        epochs = p["rounds"]
    if (epochs is None) + (until_epoch is None) + (steps is None) != 2:
        raise ValueError(
            "Trainer.fit needs exactly one of 'epochs' (additional epochs), 'until_epoch' "
            f"(the absolute target) and 'steps' (optimizer steps). Got epochs={epochs!r}, "
            f"until_epoch={until_epoch!r}, steps={steps!r}."
        )
    split = p["validation_split"]
    if validation_data is not None and split is not None:
        raise ValueError("Pass either validation_data or validation_split, not both.")
    verbose = trainer.verbose if p["verbose"] is None else p["verbose"]
    new_schedule = as_schedule(schedule) if schedule is not None else None
    if new_schedule is not None:
        trainer.backend.check_schedule(new_schedule)  # before the data: a cheap refusal
        check_plateau(trainer.callbacks, new_schedule, trainer.backend)
    state, c = trainer.state, trainer.state.counters
    data = trainer.backend.prepare(x, y)
    if split is not None:
        trainer.backend.check_validation_split(data)
    fp, shape = trainer.backend.fingerprint(data)
    request = request_of(
        mode, epochs, until_epoch, steps, new_data=p["new_data"], shuffle=p["shuffle"],
        validation_split=split, fingerprint=fp, past_horizon=p["past_horizon"],
        cooldown=p["cooldown"],
    )  # fmt: skip
    # The same call again after an interruption (a requeued script or command) finishes
    # the interrupted call: it ends where that call would have ended (E8).
    open_call = state.call
    resumes = open_call if open_call is not None and open_call["request"] == request else None
    if resumes is not None:
        target, step_target = resumes["target"], resumes["step_target"]
        mode_applied = "continue"  # the call's mode was applied when it started
    else:
        target, step_target = ends(mode, epochs, until_epoch, steps, c)
        mode_applied = mode
    n_total, val_rows = len(data), None
    same = same_rows(state.data, shape, split)
    if split is not None:
        kept = state.val_rows if mode_applied != "restart" and same else None
        train_rows, val_rows = split_rows(n_total, split, trainer.seed, kept)
    if p["new_data"] and c.offset:
        raise ValueError(
            "new_data=True needs the cursor on an epoch boundary; finish the epoch first "
            "(fit the previous data with until_epoch=trainer.epoch + 1) or use mode='warm'."
        )
    data_changed = None if p["new_data"] else check_data(state.data, mode_applied, fp, shape, split)
    if state.pending_diffs and mode == "continue":
        breaking = [d for d in state.pending_diffs if setting_of(d) in EXACTNESS_SETTINGS]
        if breaking:
            raise StateMismatchError(
                "this Trainer's settings differ from the checkpoint it resumed: "
                + "; ".join(breaking)
                + ". A 'continue' would not be exact. Use the checkpoint's settings, fit "
                "with mode='warm', or pass override=(...) naming the settings you changed."
            )
    if val_rows is not None:
        val_data = trainer.backend.subset(data, val_rows)
        data = trainer.backend.subset(data, train_rows)
    elif validation_data is not None:
        val_data = trainer.backend.prepare(*pair(validation_data))
    else:
        val_data = None
    if c.offset and mode_applied == "continue":
        check_offset(c.offset, trainer.batch_size, len(data))
    # Every refusal that needs the data (the model and the loss take it; a schedule
    # or learning rate the backend can drive): warm and restart rebuild the optimizer.
    trainer.backend.preflight(
        mode_applied,
        data,
        val_data,
        batch_size=trainer.batch_size,
        schedule=new_schedule,
        sets_lr=state.sets_lr(new_schedule),
    )
    moves: list[Move] = []
    if resumes is None:  # a call that finishes an interrupted one moves nothing (E8)
        moves = plan_moves(trainer, p, mode_applied, new_schedule, (target, step_target), data,
                           same)  # fmt: skip
    return PlannedCall(
        moves=moves,
        policy=p["past_horizon"],
        request=request,
        mode=mode,
        mode_applied=mode_applied,
        resumes=resumes,
        abandoned=open_call if open_call is not None and resumes is None else None,
        target=target,
        step_target=step_target,
        data=data,
        val_data=val_data,
        val_rows=val_rows,
        data_record={"fingerprint": fp, "shape": shape, "validation_split": split},
        data_changed=data_changed,
        schedule=new_schedule,
        verbose=verbose,
        asked={"epochs": epochs, "until_epoch": until_epoch, "steps": steps},
    )


def start_call(trainer: Trainer, planned: PlannedCall) -> tuple[dict[str, Any], FitCall]:
    """Start a planned call: the modes table (:func:`warmfit.modes.apply`) and the
    changes the call makes; returns the ledger row of its start and what the loop runs."""
    state = trainer.state
    trainer.fit_verbose = planned.verbose  # what callbacks print by (the call's)
    trainer.checkpointer.restored_metric = None  # scores weights restored in an earlier call
    if planned.data_changed:  # warned only now, so a call refused above does not warn first
        warnings.warn(planned.data_changed, stacklevel=3)
    changes: dict[str, Any] = {}
    if planned.abandoned is not None:
        changes["abandoned_call"] = planned.abandoned["call"]
        warnings.warn(
            abandoned_warning(planned.abandoned, planned.request, trainer.global_step),
            stacklevel=3,
        )
    modes.apply(planned.mode_applied, ModeOperations(trainer))
    c = state.counters
    if planned.mode_applied == "warm":
        state.epoch_partial = (0.0, 0)  # the epoch's loss: of the new regime only
        same = same_rows(state.data, planned.data_record["shape"],
                               planned.data_record["validation_split"])  # fmt: skip
        if warm_restarts_epoch(c.offset, trainer.batch_size, same, len(planned.data)):
            changes["cursor"] = {"epoch": c.epoch, "offset": c.offset, "now": 0}
            c.offset = 0
    if planned.schedule is not None:
        changes["schedule"] = {"from": describe(state.schedule), "to": describe(planned.schedule)}
        state.schedule = planned.schedule
        state.plan = Plan()
        trainer.backend.set_schedule(planned.schedule)
    if planned.moves:
        state.plan = state.plan.added(planned.moves)
        origin = c.schedule_origin
        changes.setdefault("schedule", {})["replan"] = [
            {"kind": m.kind, "at_step": m.at + origin, "end_step": m.end + origin,
             **({"policy": planned.policy} if planned.policy else {})}
            for m in planned.moves
        ]  # fmt: skip
    if state.pending_diffs:
        changes["settings"] = list(state.pending_diffs)
        state.pending_diffs = []
    state.data = planned.data_record
    state.val_rows = planned.val_rows
    resumes = planned.resumes
    if resumes is not None:  # the same segment: its epochs are the interrupted call's
        segment = resumes["segment"]
    else:
        segment = c.fit_calls
        c.fit_calls += 1
    state.call = {
        "call": resumes["call"] if resumes is not None else len(trainer.ledger),
        "segment": segment,
        "request": planned.request,
        "target": planned.target,
        "step_target": planned.step_target,
    }
    record = {
        "call": len(trainer.ledger),
        **({"resumes_call": resumes["call"]} if resumes is not None else {}),
        "run": c.run,
        "segment": segment,
        "mode": planned.mode,
        "epochs_asked": planned.asked["epochs"],
        "until_epoch": planned.asked["until_epoch"],
        "steps_asked": planned.asked["steps"],
        "epoch_start": c.epoch,
        "step_start": c.global_step,
        "fingerprint": planned.data_record["fingerprint"],
        "data_shape": planned.data_record["shape"],
        "batch_size": trainer.batch_size,
        "seed": trainer.seed,
        "schedule": describe(state.schedule),
        "deterministic": trainer.deterministic,
        "world_size": trainer.world_size,
        "changes": changes,
    }
    shuffle = planned.request["shuffle"]
    return record, FitCall(
        planned.target, planned.step_target, segment, planned.mode, shuffle, planned.verbose
    )


def plan_moves(
    trainer: Trainer,
    p: Mapping[str, Any],
    mode: str,
    new_schedule: Any,
    targets: tuple[int | None, int | None],
    data: Any,
    same: bool,
) -> list[Move]:
    """What a new fit call does to its schedule's plan (:mod:`warmfit.horizons`), worked
    out before anything changes: where the call starts and ends in the schedule's steps,
    after the modes table (a ``warm`` or ``restart`` call, or a new schedule, starts a
    new plan). ``data``: the rows the call trains on; ``same``: whether they are the
    previous call's rows (a warm call may then finish the epoch in progress). Refuses
    ``past_horizon=``/``cooldown=True`` where they mean nothing."""
    state, c = trainer.state, trainer.state.counters
    schedule = new_schedule if new_schedule is not None else state.schedule
    policy, cooldown = p["past_horizon"], p["cooldown"]
    check_call(schedule, policy=policy, cooldown=cooldown)
    if not isinstance(schedule, Schedule) or not (schedule.needs_plan() or schedule.decays()):
        return []
    if mode == "restart":
        step, epoch, offset, origin = 0, 0, 0, 0
    else:
        step, epoch, offset = c.global_step, c.epoch, c.offset
        origin = step if mode == "warm" else c.schedule_origin
        if mode == "warm" and warm_restarts_epoch(offset, trainer.batch_size, same, len(data)):
            offset = 0
    plan = state.plan if mode == "continue" and new_schedule is None else Plan()
    end = call_end_step(*targets, step=step, epoch=epoch, offset=offset,
                        n=len(data), batch_size=trainer.batch_size)  # fmt: skip
    return moves_for_call(
        schedule, plan, step=step - origin, end=end - origin, policy=policy, cooldown=cooldown
    )


def call_end_step(
    target: int | None,
    step_target: int | None,
    *,
    step: int,
    epoch: int,
    offset: int,
    n: int,
    batch_size: int,
) -> int:
    """The global step where a call ends: its step target, or the step the loop reaches
    at epoch ``target`` from the cursor (``epoch``, ``offset``) at global ``step``, with
    ``n`` rows a epoch in batches of ``batch_size`` (the last one short)."""
    if step_target is not None:
        return step_target
    assert target is not None
    per_epoch = -(-n // batch_size)
    if offset:  # the rest of the epoch in progress, then whole epochs
        return step + -(-(n - offset) // batch_size) + (target - epoch - 1) * per_epoch
    return step + (target - epoch) * per_epoch


def same_rows(prev: Mapping[str, Any] | None, shape: list[int], split: float | None) -> bool:
    """Whether the previous fit call (its data record ``prev``) had data of this shape
    and this ``validation_split``: its cursor and validation rows then refer to these
    rows."""
    return prev is not None and (list(prev["shape"]), prev.get("validation_split")) == (
        list(shape),
        split,
    )


def check_data(
    prev: Mapping[str, Any] | None, mode: str, fp: str, shape: list[int], split: float | None
) -> str | None:
    """Refuse data a 'continue' cannot continue on; return the warning to give if the
    data changed but keeps its shape (None if it did not)."""
    if mode != "continue" or prev is None:
        return None
    if list(prev["shape"]) != list(shape):
        raise ValueError(
            f"The data of this 'continue' call has shape {tuple(shape)}, the previous "
            f"call's had shape {tuple(prev['shape'])}. The cursor and the data order refer "
            "to the previous data. Fit the same data, or use mode='warm' (keep the weights, "
            "fresh optimizer) or mode='restart'."
        )
    if prev.get("validation_split") != split:
        raise ValueError(
            f"validation_split={split} differs from the previous call's "
            f"{prev.get('validation_split')}; the fixed validation split would change. "
            "Pass the same validation_split, or use mode='warm'."
        )
    if prev["fingerprint"] == fp:
        return None
    return (
        f"The training data changed since the previous fit call (fingerprint {fp}, "
        f"was {prev['fingerprint']}) but has the same shape; continuing with the new "
        "data. The ledger records both fingerprints."
    )


def split_rows(
    n: int,
    fraction: float,
    seed: int,
    kept: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a ``validation_split``. The split is fixed
    for the run: ``kept``, the previous call's validation rows where this call keeps
    them, win over a split the seed would now give (``override=("seed",)``, a warm
    call), so rows that validated never become training rows."""
    if isinstance(fraction, bool) or not isinstance(fraction, float):
        raise invalid_param("validation_split", "Trainer.fit", "a float in (0, 1)", fraction)
    train_rows, val_rows = validation_split(n, fraction, seed)
    if kept is not None and not np.array_equal(kept, val_rows):
        val_rows = kept
        train_rows = np.setdiff1d(np.arange(n, dtype=np.int64), kept)
    return train_rows, val_rows


def warm_restarts_epoch(offset: int, batch_size: int, same: bool, n: int) -> bool:
    """Whether a warm call starts the epoch in progress over: the cursor's ``offset``
    refers to the previous call's rows (not ``same``: another shape or split), or is
    neither a batch boundary nor the end of these ``n`` rows. Finishing the epoch would
    then train nothing, or batches cut at other places."""
    if not offset:
        return False
    return not same or offset > n or (offset % batch_size != 0 and offset != n)


def pair(validation_data: Any) -> tuple[Any, Any]:
    """``validation_data`` as (x, y); a dict is x alone (its target among its keys)."""
    if isinstance(validation_data, Mapping):
        return validation_data, None
    if isinstance(validation_data, (tuple, list)) and len(validation_data) == 2:
        return validation_data[0], validation_data[1]
    if isinstance(validation_data, (tuple, list)) and len(validation_data) == 1:
        return validation_data[0], None
    length = str(len(validation_data)) if hasattr(validation_data, "__len__") else "?"
    raise ValueError(
        "validation_data must be a pair (x_val, y_val). Got "
        f"{type(validation_data).__name__} of length {length}."
    )


def describe_request(request: Mapping[str, Any]) -> str:
    """A fit call's arguments as the user wrote them: ``mode='continue', epochs=4``."""
    shown = {k: request[k] for k in ("mode", "epochs", "until_epoch", "steps")}
    shown.update({k: request[k] for k in ("new_data", "validation_split") if request[k]})
    if not request["shuffle"]:
        shown["shuffle"] = False
    return ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None)


def call_end(call: Mapping[str, Any]) -> str:
    """Where an open fit call ends: ``epoch 4`` or ``global step 120``."""
    if call["target"] is not None:
        return f"epoch {call['target']}"
    return f"global step {call['step_target']}"


def abandoned_warning(open_call: Mapping[str, Any], request: Mapping[str, Any], step: int) -> str:
    """The warning of a call that leaves an interrupted one unfinished."""
    return (
        f"fit call {open_call['call']} ({describe_request(open_call['request'])}) "
        f"stopped before its end ({call_end(open_call)}): this call "
        f"({describe_request(request)}) differs from it, so it starts anew from the "
        f"cursor (global step {step}) and the interrupted call stays unfinished. To finish "
        "that call where it would have ended, repeat it with the same arguments and data."
    )


def interrupt(trainer: Trainer, name: str, *, saved: Path | bool | None = False) -> NoReturn:
    """Save at the current step boundary (unless ``saved``: the path of the save just
    made, None on ranks other than 0) and raise :class:`TrainingInterrupted`, whose
    message says where the interrupted call ends."""
    trainer.signals.received = None
    path = trainer.save_checkpoint(wait=True) if saved is False else saved
    call, step = trainer.state.call, trainer.counters.global_step
    end = None if call is None else call_end(call)
    err = TrainingInterrupted(name, path if isinstance(path, Path) else None, step, end)
    if trainer.rank == 0:
        print(f"warmfit: {err}", file=sys.stderr, flush=True)
    raise err


def validation_split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of ``validation_split=fraction`` on ``n`` rows."""
    return split_rows(n, fraction, seed, None)
