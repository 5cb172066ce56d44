"""A process for the re-plan resume test: ``python tests/_horizon_worker.py RUN_DIR
PHASE... [--signal-at N] [--out PATH]``.

Builds the Trainer of ``test_horizons.plan_trainer`` on ``RUN_DIR`` (resuming from it
if it holds a checkpoint) and runs the fit calls named by PHASE in order: ``first`` is
``fit(epochs=3)``, ``second`` is ``fit(epochs=2)``. ``--signal-at N`` sends this process
SIGTERM in the N-th training forward pass of the model (as a preemption would).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_data
from test_horizons import CALLS, plan_trainer
from test_requeue import SignalAt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("phases", nargs="+", choices=sorted(CALLS))
    p.add_argument("--signal-at", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    x, y = make_data(200)
    trainer = plan_trainer(model=lambda: SignalAt(args.signal_at), run_dir=args.run_dir)
    for phase in args.phases:
        trainer.fit(x, y, **CALLS[phase])
    if args.out:
        trainer.save(args.out)
    trainer.close()


if __name__ == "__main__":
    main()
