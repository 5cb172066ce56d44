"""A training process for the resume tests: ``python tests/_worker.py RUN_DIR UNTIL_EPOCH
[--checkpoint-every N] [--slow SECONDS] [--out PATH]``.

Builds the same Trainer as ``conftest.make_trainer`` on ``RUN_DIR`` (resuming from it if
it holds a checkpoint), trains until ``UNTIL_EPOCH``, and writes the final state to
``--out`` with ``Trainer.save``. ``--slow`` sleeps in every forward pass so that a test
can send a signal in the middle of an epoch; it changes no number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import MLP, make_data, make_trainer


class SlowMLP(MLP):
    delay = 0.0

    def forward(self, x):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        return super().forward(x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("until_epoch", type=int)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    SlowMLP.delay = args.slow
    x, y = make_data(400)
    xv, yv = make_data(60, seed=9)
    trainer = make_trainer(
        model=SlowMLP, run_dir=args.run_dir, checkpoint_every=args.checkpoint_every
    )
    print(f"started at step {trainer.global_step}", flush=True)
    if trainer.epoch < args.until_epoch:  # a killed predecessor may have finished the run
        trainer.fit(x, y, until_epoch=args.until_epoch, validation_data=(xv, yv))
    if args.out:
        trainer.save(args.out)
    trainer.close()


if __name__ == "__main__":
    main()
