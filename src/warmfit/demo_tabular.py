"""The tabular demo (``warmfit demo --tabular``): XGBoost on scikit-learn's bundled
breast-cancer data, fitted in several calls.

Part 1, one Trainer: ``fit(rounds=10)``, ``fit(rounds=10)``, ``fit(rounds=20)`` with a
cosine schedule over the global round and ``warmfit.EarlyStopping`` watching a held-out
set; the result is compared, bit for bit, with one uninterrupted ``fit(rounds=40)``.
Part 2: a child process runs ``fit(rounds=40)`` on a run dir with a checkpoint every
round and is killed with SIGKILL once round 20's checkpoint is on disk; a new process
runs the same call again, which finishes the interrupted call; the result is compared
with the same reference. Subsampling and column sampling are on: the libraries' own
continuation is not exact there (``docs/boosting.md``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import schedules
from .callbacks import EarlyStopping
from .demo import DemoCheckFailed, check_killed, report, resumed_state
from .trainer import Trainer

ROUNDS = 40
KILL_AFTER = 20  # part 2's child dies once the checkpoint of this round is on disk


def load_breast_cancer_split(seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's breast-cancer data (569 rows, 30 features; ships with the package),
    split into training rows and 120 held-out rows."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    perm = np.random.default_rng(seed).permutation(len(data.target))
    held, train = perm[:120], perm[120:]
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    return x[train], y[train], x[held], y[held]


def make_trainer(run_dir: str | Path | None = None, **kwargs: Any) -> Trainer:
    """The demo's Trainer: an XGBClassifier with row and column subsampling, a cosine
    learning rate over 40 global rounds, early stopping with patience 8."""
    import xgboost as xgb

    return Trainer(
        xgb.XGBClassifier(max_depth=3, subsample=0.7, colsample_bytree=0.7, n_jobs=1),
        schedule=schedules.cosine(0.3, horizon=ROUNDS, min_lr=0.02),
        callbacks=[EarlyStopping(patience=8)],
        seed=0,
        verbose=0,
        run_dir=run_dir,
        **kwargs,
    )


def fit(trainer: Trainer, rounds: int | None = None, until: int | None = None) -> None:
    x, y, x_val, y_val = load_breast_cancer_split()
    if until is not None:
        trainer.fit(x, y, until_epoch=until, validation_data=(x_val, y_val))
    else:
        trainer.fit(x, y, rounds=rounds, validation_data=(x_val, y_val))


def child(folder: str) -> None:
    """Part 2's child: ``fit(until round 40)`` on ``folder``, a checkpoint every round.
    With ``WARMFIT_DEMO_KILL`` set, a watcher thread kills the process with SIGKILL once
    the run dir's newest checkpoint is round :data:`KILL_AFTER`'s or later."""
    latest = Path(folder) / "checkpoints" / "LATEST"
    if os.environ.get("WARMFIT_DEMO_KILL"):

        def watch() -> None:
            while True:
                name = latest.read_text().strip() if latest.exists() else ""
                step = name.rpartition("-step-")[2]
                if step.isdigit() and int(step) >= KILL_AFTER:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.001)

        threading.Thread(target=watch, daemon=True).start()
    with make_trainer(folder, checkpoint_every=1) as trainer:
        print(f"started at round {trainer.global_step}", flush=True)
        fit(trainer, until=ROUNDS)
        print(f"finished at round {trainer.global_step}", flush=True)


def _child(folder: Path, kill: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"WARMFIT_DEMO_KILL": "1"} if kill else {}))
    if not kill:
        env.pop("WARMFIT_DEMO_KILL", None)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = "import sys; from warmfit.demo_tabular import child; child(sys.argv[1])"
    done = subprocess.run([sys.executable, "-u", "-c", code, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    for line in done.stdout.splitlines():
        print(f"  | {line}")
    return done


def main(run_dir: str | None = None) -> None:
    """Both parts; raises :class:`~warmfit.demo.DemoCheckFailed` if a check fails."""
    from .rundir import RunDir

    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="warmfit-tab-"))
    print("warmfit demo --tabular: XGBoost on scikit-learn's breast-cancer data, with row and")
    print(f"column subsampling; everything is kept in {root}")
    reference_trainer = make_trainer()
    fit(reference_trainer, rounds=ROUNDS)
    reference = reference_trainer.state_dict()
    stopped = reference_trainer.ledger[-1].get("stopped_by")
    print(f"The reference, fit(rounds={ROUNDS}) in one call: {reference_trainer.global_step} "
          f"rounds{f', stopped by {stopped}' if stopped else ''}.")  # fmt: skip

    print("\n== Part 1: fit(rounds=10), fit(rounds=10), fit(rounds=20) on one Trainer")
    trainer = make_trainer(root / "calls")
    for rounds in (10, 10, 20):
        if trainer.ledger and trainer.ledger[-1].get("stopped_by"):
            break
        fit(trainer, rounds=rounds)
        h = trainer.history[-1]
        print(f"   after round {trainer.global_step}: lr {h['lr']:.4f}, val_loss "
              f"{h['val_loss']:.4f}, val_accuracy {h['val_accuracy']:.3f}")  # fmt: skip
    print("\n-- The ledger: one row per fit call")
    print(trainer.ledger.table())
    calls_ok = report("three calls == one call, bit for bit", reference, trainer.state_dict())
    trainer.close()

    print(f"\n== Part 2: kill -9 after round {KILL_AFTER}'s checkpoint; then the same call")
    folder = root / "kill-and-resume"
    check_killed(_child(folder, kill=True))
    newest = RunDir(folder).latest()
    print(f"child 1: killed by SIGKILL; the newest checkpoint: {newest.name if newest else None}")
    resumed = resumed_state(_child(folder, kill=False), folder)
    resume_ok = report("killed and resumed == the reference, bit for bit", reference, resumed)
    failed = [what for what, ok in (("calls", calls_ok), ("resume", resume_ok)) if not ok]
    if failed:
        raise DemoCheckFailed(
            f"the {' and the '.join(failed)} did not give the reference's bits; the "
            "differences are listed above"
        )
    print(f"\nDone. `warmfit history {root / 'calls'}` shows part 1's ledger and curves again.")
