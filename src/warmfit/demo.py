"""The main job: an MLP on scikit-learn's bundled digits, trained in several fit calls.

Part 1, one Trainer and four fit calls: ``continue`` twice (epochs and the schedule go
on), ``warm`` (weights kept, fresh optimizer and schedule), ``restart`` (a new run from
the seed); the learning curves with the fit-call boundaries go to a PNG. Part 2, the
promise of resuming: a child process training on a run dir is killed with SIGKILL in
the middle of an epoch, and a new process runs the same fit call again.

Each "bit for bit" line compares the whole state (every tensor by its bytes, the JSON
state) with :func:`warmfit.check.compare_states` against an uninterrupted
``fit(epochs=3)`` from the seed, and says what it compared. A check that fails makes
the demo fail (``warmfit demo`` exits 1).

With ``--run-dir D`` part 1 trains in D (a D an earlier demo wrote is gone on from),
part 2 in a new folder ``D/kill-and-resume`` (``-2``, ``-3``, ... if taken), and the
PNG is ``D/curves.png``. Without it, D is a new temporary folder, kept for a look.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import schedules
from .history import epoch_table
from .trainer import Trainer

STEPS_PER_EPOCH = 18  # ceil(1437 * 0.8 / 64): the training rows after validation_split=0.2
CHECKPOINT_EVERY = 10  # part 2's child saves every 10 steps
KILL_AT = 44  # part 2's child dies in the forward pass of step 44: epoch 3, batch 8 of 18
SAVED_BEFORE_KILL = (KILL_AT - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY  # step 40
TENSOR_KINDS = {
    "model": "weights",
    "optim": "optimizer slots",
    "rng": "torch RNG",
    "data": "validation rows",
    "initial": "initial weights",
    "callbacks": "callback arrays",
}


class DemoCheckFailed(ValueError):
    """A bit-for-bit check of the demo found a difference (``warmfit demo`` exits 1)."""


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits (ships with the package: no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def adam(params: object) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=3e-3)  # type: ignore[arg-type]


def make_trainer(
    run_dir: str | Path | None = None, *, verbose: int = 1, model: Any = digits_mlp, **kwargs: Any
) -> Trainer:
    """The demo's Trainer: the digits MLP, Adam, one warm-up epoch then a cosine decay."""
    return Trainer(
        model,
        optimizer=adam,
        loss="cross_entropy",
        schedule=schedules.warmup(
            STEPS_PER_EPOCH, schedules.cosine(3e-3, horizon=12 * STEPS_PER_EPOCH)
        ),
        batch_size=64,
        seed=0,
        metrics=["accuracy"],
        run_dir=run_dir,
        verbose=verbose,
        **kwargs,
    )


def uninterrupted() -> dict[str, Any]:
    """The reference of every check: ``fit(epochs=3)`` from the seed, in one call, in
    this process, without a run dir: its ``state_dict()``."""
    x, y, _, _ = load_digits_split()
    trainer = make_trainer(verbose=0)
    trainer.fit(x, y, epochs=3, validation_split=0.2)
    return trainer.state_dict()


def fit_calls(trainer: Trainer, reference: Mapping[str, Any], plot: str | Path) -> bool:
    """Part 1: four fit calls on ``trainer`` (:func:`make_trainer`); the curves of its run
    to ``plot`` before the restart. Returns whether the restart equals ``reference`` bit
    for bit, all but the run number."""
    x, y, x_test, y_test = load_digits_split()
    e = trainer.epoch  # > 0 when run_dir held a checkpoint: the demo goes on from it
    first = "a first call" if e == 0 else f"going on from the run dir's epoch {e}"
    print(f"\n-- fit(epochs=3): mode='continue' (the default) — {first}: epochs {e + 1}-{e + 3}")
    trainer.fit(x, y, epochs=3, validation_split=0.2)
    e = trainer.epoch
    print(f"\n-- fit(epochs=3) again: 3 more epochs, {e + 1}-{e + 3}")
    print("   Adam's moments, the schedule and the data order go on")
    trainer.fit(x, y, epochs=3, validation_split=0.2)
    e = trainer.epoch
    print(f"\n-- fit(epochs=2, mode='warm'): 2 more epochs, {e + 1}-{e + 2}")
    print("   weights kept; a fresh Adam; the schedule starts again at 0")
    trainer.fit(x, y, epochs=2, validation_split=0.2, mode="warm")
    print(f"\nlearning curves, fit calls marked: {trainer.plot_history(plot)}")
    run = trainer.counters.run
    print(f"\n-- fit(epochs=3, mode='restart'): run {run + 1}, from the seed: epochs 1-3")
    print(f"   run {run} stays in the ledger and on disk")
    trainer.fit(x, y, epochs=3, validation_split=0.2, mode="restart")
    state = trainer.state_dict()
    counters = state["state"]["counters"]
    base = reference["state"]["counters"]["run"]
    # a restart begins a new run: the run number is the one thing that must differ
    same_run = {**state, "state": {**state["state"], "counters": {**counters, "run": base}}}
    note = f"(all but the run number, which a restart counts: {counters['run']} here, {base} there)"
    ok = report("the restart == the reference, bit for bit", reference, same_run, note)
    test = trainer.evaluate(x_test, y_test)
    print("\n-- The ledger: one row per fit call")
    print(trainer.ledger.table())
    print(f"\n-- History of the current run (run {trainer.counters.run})")
    print(epoch_table(trainer.history.records))
    print(f"\nheld-out digits: loss={test['loss']:.4f} accuracy={test['accuracy']:.4f}")
    return ok


def kill_and_resume(folder: str | Path, reference: Mapping[str, Any]) -> bool:
    """Part 2: a child process runs ``fit(epochs=3)`` on ``folder`` and kills itself with
    SIGKILL in the forward pass of step :data:`KILL_AT`; a second one runs the same call
    again. Returns whether the result equals ``reference`` bit for bit."""
    from .rundir import RunDir

    folder = Path(folder)
    batch = KILL_AT - 2 * STEPS_PER_EPOCH
    print(f"\nA child process runs fit(epochs=3) on a run dir, {folder.name}, saving a")
    print(f"checkpoint every {CHECKPOINT_EVERY} steps. It kills itself (SIGKILL) in the "
          "forward pass of")  # fmt: skip
    print(f"step {KILL_AT} (epoch 3, batch {batch} of {STEPS_PER_EPOCH}), once the checkpoint "
          f"of step {SAVED_BEFORE_KILL} is on disk:")  # fmt: skip
    killed = check_killed(_child(folder, KILL_AT))
    latest = RunDir(folder).latest()
    print(f"child 1: killed by SIGKILL (exit status {killed.returncode}) in step {KILL_AT};")
    print(f"  the newest checkpoint: {latest.name if latest is not None else None}")
    print("\nA new process runs the same fit(epochs=3) again: warmfit finishes the")
    print("interrupted call where it would have ended (epoch 3), not 3 more epochs:")
    resumed = resumed_state(_child(folder, 0), folder)
    row = resumed["state"]["ledger"][-1]
    print(f"the resumed call's ledger row: steps {row['step_start']}-{row['step_end']}, "
          f"resumes_call {row.get('resumes_call')}")  # fmt: skip
    return report("killed and resumed == the reference, bit for bit", reference, resumed)


def check_killed(killed: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``killed``, a child that was to die by SIGKILL; :class:`DemoCheckFailed` if not."""
    if killed.returncode != -signal.SIGKILL:
        raise DemoCheckFailed(
            f"the child was to die by SIGKILL; it ended with status {killed.returncode}:\n"
            f"{killed.stderr}"
        )
    return killed


def resumed_state(resumed: subprocess.CompletedProcess, folder: Path) -> dict[str, Any]:
    """The newest checkpoint in ``folder`` (``{"tensors", "state"}``) after ``resumed``, the
    child that ran the interrupted call again; :class:`DemoCheckFailed` if it failed or
    left no checkpoint."""
    from .checkpoint import read_checkpoint
    from .rundir import RunDir

    if resumed.returncode != 0:
        raise DemoCheckFailed(f"the resumed child failed ({resumed.returncode}):\n{resumed.stderr}")
    latest = RunDir(folder).latest()
    if latest is None:
        raise DemoCheckFailed(f"the resumed child left no checkpoint in {folder}")
    tensors, state = read_checkpoint(latest)
    return {"tensors": tensors, "state": state}


def report(
    claim: str, reference: Mapping[str, Any], state: Mapping[str, Any], note: str = ""
) -> bool:
    """Compare ``state`` with ``reference`` (the whole state) and print the claim, its
    truth, what was compared, and the first differences if any."""
    from .check import NOT_COMPARED, STATE_KEYS, compare_states

    differences = compare_states(reference, state, labels=("reference", "this run"))
    ok = not differences
    print(f"\nCheck: {claim}: {ok}")
    if note:
        print(f"  {note}")
    print("  compared by warmfit.check.compare_states:")
    print(f"  {_tensors_compared(reference, state)}")
    present = set(reference["state"]) | set(state["state"])
    parts = [k for k in STATE_KEYS if k in present]
    parts += sorted(k for k in present if k not in STATE_KEYS and k not in NOT_COMPARED)
    epochs = len(reference["state"].get("history", []))
    json_parts = f"JSON, type for type: {', '.join(parts)} ({epochs} epochs)"
    print(textwrap.fill(json_parts, 88, initial_indent="  ", subsequent_indent="    "))
    skipped = ", ".join(k for k in NOT_COMPARED if k in present)
    print(f"  not compared: {skipped} (how the calls were driven, not what they trained)")
    for line in differences[:8]:
        print(f"  differs: {line}")
    return ok


def _tensors_compared(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    names = list(dict.fromkeys([*a["tensors"], *b["tensors"]]))
    counts: dict[str, int] = {}
    for name in names:
        kind = name.split("/", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{TENSOR_KINDS.get(kind, kind)} {n}" for kind, n in counts.items()]
    return f"{len(names)} tensors, byte for byte: {', '.join(parts)}"


def _child(folder: Path, kill_at: int) -> subprocess.CompletedProcess:
    """Run :func:`child` in a new Python process; print its output, indented."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = "import sys; from warmfit.demo import child; child(*sys.argv[1:])"
    args = [folder.name, str(kill_at), str(torch.get_num_threads())]
    argv = [sys.executable, "-u", "-c", code, *args]
    done = subprocess.run(
        argv, cwd=folder.parent, env=env, capture_output=True, text=True, timeout=300
    )
    for line in done.stdout.splitlines():
        print(f"  | {line}")
    return done


def child(folder: str, kill_at: str, threads: str) -> None:
    """Part 2's child process: ``fit(epochs=3)`` on ``folder`` with a checkpoint every
    :data:`CHECKPOINT_EVERY` steps. With ``kill_at`` > 0 it kills itself with SIGKILL in
    the forward pass of training step ``kill_at``, once the newest checkpoint on disk is
    the last periodic one before it (so that the demo prints the same lines each time)."""
    torch.set_num_threads(int(threads))  # the parent's: the same sums, the same bits
    x, y, _, _ = load_digits_split()
    step = int(kill_at)

    def model() -> nn.Module:
        net = digits_mlp()
        if step > 0:
            net.register_forward_pre_hook(_killer(Path(folder), step))
        return net

    with make_trainer(folder, model=model, checkpoint_every=CHECKPOINT_EVERY) as trainer:
        trainer.fit(x, y, epochs=3, validation_split=0.2)


def _killer(folder: Path, step: int) -> Any:
    saved = (step - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY  # the last periodic save before it
    latest = folder / "checkpoints" / "LATEST"  # names the newest checkpoint once it is written
    calls = 0

    def saved_yet() -> bool:
        step_of = (latest.read_text() if latest.exists() else "").strip().rpartition("-step-")[2]
        return step_of.isdigit() and int(step_of) >= saved

    def hook(module: nn.Module, args: object) -> None:
        nonlocal calls
        if not module.training:  # the data probe and validation run in eval mode
            return
        calls += 1
        if calls == step:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the periodic save is written in the background
                if saved_yet():
                    break
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _new_folder(root: Path, name: str) -> Path:
    path, n = root / name, 1
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return path


def main(run_dir: str | None = None, verbose: int = 1) -> None:
    """Both parts; raises :class:`DemoCheckFailed` if a bit-for-bit check fails."""
    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="warmfit-demo-"))
    print(f"warmfit demo: an MLP on scikit-learn's digits; everything is kept in {root}")
    print("Each check compares the whole state with the reference: fit(epochs=3) from the")
    print("seed in one call, in this process, without a run dir (trained first, quietly).")
    print("\n== Part 1: one Trainer, four fit calls. epochs= is always *more* epochs")
    with make_trainer(root, verbose=verbose) as trainer:  # a locked or foreign run dir fails here
        reference = uninterrupted()
        restart_ok = fit_calls(trainer, reference, root / "curves.png")
    print("\n== Part 2: kill -9 in the middle of an epoch; then the same call again")
    resume_ok = kill_and_resume(_new_folder(root, "kill-and-resume"), reference)
    failed = [what for what, ok in (("restart", restart_ok), ("resume", resume_ok)) if not ok]
    if failed:
        raise DemoCheckFailed(
            f"the {' and the '.join(failed)} did not give the reference's bits; the "
            "differences are listed above"
        )
    print(f"\nDone. `warmfit history {root}` shows part 1's ledger and curves again.")
