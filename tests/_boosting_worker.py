"""A boosting training process for the kill -9 tests (``test_boosting.py``):
``python tests/_boosting_worker.py LIBRARY RUN_DIR ROUNDS [--slow SECONDS] [--out PATH]``.

Trains an XGBClassifier or LGBMClassifier (subsampling and bagging on, a schedule, a
checkpoint every round) on ``RUN_DIR`` until round ``ROUNDS``, resuming from the run dir
if it holds a checkpoint, and writes the final state to ``--out``. ``--slow`` sleeps
after every round (a callback) so that a test can kill it mid-run; it changes no number.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import warmfit


class Slow(warmfit.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_epoch_end(self, trainer, logs):  # type: ignore[no-untyped-def]
        if self.seconds:
            time.sleep(self.seconds)


def model(library: str):  # type: ignore[no-untyped-def]
    if library == "xgboost":
        import xgboost as xgb

        return xgb.XGBClassifier(subsample=0.7, colsample_bytree=0.7, max_depth=3, n_jobs=1)
    import lightgbm as lgb

    return lgb.LGBMClassifier(subsample=0.7, subsample_freq=1, colsample_bytree=0.7,
                              num_leaves=7, n_jobs=1)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("library")
    p.add_argument("run_dir")
    p.add_argument("rounds", type=int)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(size=600) > 0).astype(np.int64)
    trainer = warmfit.Trainer(
        model(args.library),
        schedule=warmfit.schedules.cosine(0.3, horizon=12, min_lr=0.02),
        seed=11,
        verbose=0,
        run_dir=args.run_dir,
        checkpoint_every=1,
        callbacks=[Slow(args.slow)],  # the same callbacks in every process (0 s: no wait)
    )
    print(f"started at round {trainer.global_step}", flush=True)
    if trainer.epoch < args.rounds:
        trainer.fit(x, y, until_epoch=args.rounds, validation_data=(x[:150], y[:150]))
    if args.out:
        trainer.save(args.out)
    trainer.close()


if __name__ == "__main__":
    main()
