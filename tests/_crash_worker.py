"""A training process for the crash-injection battery (``test_reliability_crash.py``).

``python tests/_crash_worker.py RUN_DIR UNTIL_EPOCH [--checkpoint-every N] [--out PATH]``

Unlike ``_worker.py`` its model is big enough (about 1.1M parameters with Adam, ~13 MB
per checkpoint) that a save takes a noticeable share of the run, so a random kill
often lands in the middle of one. ``WARMFIT_CRASH_PAUSE=POINT:K`` makes the K-th
occurrence of POINT in this process print ``PAUSE POINT <detail>`` on stdout and sleep,
so that the test can ``kill -9`` inside that exact window (``POINT:K:SECONDS`` sleeps
that long, then goes on: the process holds the run dir's lock meanwhile):

- ``tensors``: the tensor file of a new checkpoint is written, ``state.json`` is not;
- ``rename``: the temporary folder is complete and fsync'd, not yet renamed into place;
- ``latest``: the new checkpoint folder is in place, ``LATEST`` still names the old one;
- ``trash``: retention renamed an old checkpoint to ``.trash-*`` and has not deleted it.

The pauses wrap functions and change no number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from torch import nn

import warmfit
import warmfit.checkpoint as ckpt

torch.set_num_threads(1)

D, CLASSES, N = 32, 3, 192
BATCH = 16  # 12 steps per epoch


class BigMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(D, 1024),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D, CLASSES))).argmax(axis=1).astype(np.int64)
    return x, y


def make(run_dir: str | None, checkpoint_every: int | None) -> warmfit.Trainer:
    return warmfit.Trainer(
        BigMLP,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        loss="cross_entropy",
        schedule=warmfit.schedules.cosine(1e-3, horizon=200),
        batch_size=BATCH,
        seed=11,
        run_dir=run_dir,
        checkpoint_every=checkpoint_every,
        keep_last=2,
        verbose=0,
    )


def _install_pause(spec: str) -> None:
    point, _, rest = spec.partition(":")
    k, _, seconds = rest.partition(":")
    target = int(k or 1)
    seen = {"n": 0}

    def hit(detail: str) -> None:
        seen["n"] += 1
        if seen["n"] == target:
            print(f"PAUSE {point} {detail}", flush=True)
            time.sleep(float(seconds or 120))

    if point == "tensors":
        real_tf = ckpt._write_tensor_file

        def write_tensor_file(file, entries):  # type: ignore[no-untyped-def]
            out = real_tf(file, entries)
            hit(str(file))
            return out

        ckpt._write_tensor_file = write_tensor_file
    elif point == "rename":
        real_rename = os.rename

        def rename(src, dst, *a, **kw):  # type: ignore[no-untyped-def]
            if Path(src).name.startswith(".tmp-ckpt-"):
                hit(str(dst))
            return real_rename(src, dst, *a, **kw)

        os.rename = rename
    elif point == "latest":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):  # type: ignore[no-untyped-def]
            if Path(dst).name == warmfit.rundir.LATEST:
                hit(str(dst))
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    elif point == "trash":
        real_rmtree = ckpt.shutil.rmtree

        def rmtree(path, *a, **kw):  # type: ignore[no-untyped-def]
            if Path(path).name.startswith(".trash-ckpt-"):
                hit(str(path))
            return real_rmtree(path, *a, **kw)

        ckpt.shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown pause point {point!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("until_epoch", type=int)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if os.environ.get("WARMFIT_CRASH_PAUSE"):
        _install_pause(os.environ["WARMFIT_CRASH_PAUSE"])
    x, y = data()
    trainer = make(args.run_dir, args.checkpoint_every)
    print(f"started at step {trainer.global_step}", flush=True)
    if trainer.epoch < args.until_epoch:
        trainer.fit(x, y, until_epoch=args.until_epoch)
    if args.out:
        trainer.save(args.out)
    trainer.close()


if __name__ == "__main__":
    main()
