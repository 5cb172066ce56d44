"""The main job: an MLP on scikit-learn's bundled digits, trained in several fit calls.

Shows what each mode does: ``continue`` twice (epochs and the schedule go on), ``warm``
(weights kept, fresh optimizer and schedule), ``restart`` (a new run from the seed),
then prints the ledger and the per-epoch history.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import schedules
from .history import epoch_table
from .trainer import Trainer


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


def run(run_dir: str | None = None, verbose: int = 1) -> Trainer:
    x, y, x_test, y_test = load_digits_split()
    steps_per_epoch = -(-int(len(x) * 0.8) // 64)
    trainer = Trainer(
        digits_mlp,
        optimizer=adam,
        loss="cross_entropy",
        schedule=schedules.warmup(
            steps_per_epoch, schedules.cosine(3e-3, horizon=12 * steps_per_epoch)
        ),
        batch_size=64,
        seed=0,
        metrics=["accuracy"],
        run_dir=run_dir,
        verbose=verbose,
    )
    start = trainer.epoch  # > 0 when run_dir held a checkpoint: the demo resumed it
    first = "a first call" if start == 0 else f"going on from the run dir's epoch {start}"
    print(f"\n== fit(epochs=3): mode='continue' (the default) — {first}")
    trainer.fit(x, y, epochs=3, validation_split=0.2)
    reference = _from_the_seed(trainer.history.records)
    e = trainer.epoch
    print(
        f"\n== fit(epochs=3) again: epochs {e + 1}-{e + 3}; optimizer, schedule and data "
        "order go on"
    )
    trainer.fit(x, y, epochs=3, validation_split=0.2)
    print("\n== fit(epochs=2, mode='warm'): weights kept; fresh Adam; the schedule starts again")
    trainer.fit(x, y, epochs=2, validation_split=0.2, mode="warm")
    print(
        "\n== fit(epochs=3, mode='restart'): a new run from the seed; "
        "the old one stays in the ledger"
    )
    trainer.fit(x, y, epochs=3, validation_split=0.2, mode="restart")
    same = _curves(trainer.history.records) == _curves(reference)
    what = "the first call's 3 epochs" if start == 0 else "epochs 1-3 of the resumed run"
    print(f"restart reproduced {what} bit for bit: {same}")
    test = trainer.evaluate(x_test, y_test)
    print("\n== The ledger: one row per fit call")
    print(trainer.ledger.table())
    print(f"\n== History of the current run (run {trainer.counters.run})")
    print(epoch_table(trainer.history.records))
    print(f"\nheld-out digits: loss={test['loss']:.4f} accuracy={test['accuracy']:.4f}")
    return trainer


def _from_the_seed(records: list[dict]) -> list[dict]:
    """Epochs 1-3 of the current run, which began from the seed (the demo's first call,
    or the restart of an earlier demo on the same run dir): what a restart must
    reproduce. When the demo resumed a run dir, its first call trained later epochs."""
    return [dict(r) for r in records if r["epoch"] <= 3]


def _curves(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("epoch", "loss", "val_loss", "lr")} for r in records]


def main(run_dir: str | None = None) -> None:
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="warmfit-demo-") as tmp:
            run(str(Path(tmp) / "run"))
    else:
        run(run_dir)
