"""A training process for the distributed tests, started by torchrun (or plainly, as a
world of one): ``_ddp_worker.py RUN_DIR UNTIL_EPOCH [--dropout P] [--slow S] [--out PATH]
[--seen DIR] [--rows N] [--arrays] [--nan-row I] [--checkpoint-every K]``.

Trains the conftest MLP on a map-style dataset that records which samples this rank
read (written to ``--seen/rank<r>.json``), or with ``--arrays`` on the arrays
themselves, resuming from RUN_DIR if it holds a checkpoint; rank 0 writes the final
state to ``--out``; a ``{rank}`` in RUN_DIR gives each rank its own. ``--nan-row I``
makes row I's features NaN. A NonFiniteLossError (CheckpointError) is printed as
``rank R: NonFiniteLossError: <message>`` and exits 3 (4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import warmfit
from conftest import MLP, make_data, make_trainer


class Recording(torch.utils.data.Dataset):
    def __init__(self, x, y, delay: float) -> None:  # type: ignore[no-untyped-def]
        self.x, self.y, self.delay = torch.from_numpy(x), torch.from_numpy(y), delay
        self.seen: list[int] = []
        self.mark: tuple[int, Path] | None = None  # (reads, file): touch file at that count

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        self.seen.append(int(i))
        if self.mark is not None and len(self.seen) == self.mark[0]:
            self.mark[1].touch()  # training is under way: a signal now lands mid-run
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.y[i]


class FlatView(torch.nn.Module):
    """An MLP that flattens with ``view(size(0), -1)``: it cannot run on zero rows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(p=0.0)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x.view(x.size(0), -1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("until_epoch", type=int)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--out", default=None)
    p.add_argument("--seen", default=None)
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--arrays", action="store_true")
    p.add_argument("--nan-row", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--flat-view", action="store_true")  # a model that needs rows
    args = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    x, y = make_data(args.rows)
    if args.nan_row is not None:
        x[args.nan_row] = float("nan")
    data = Recording(x, y, args.slow)
    try:
        trainer = make_trainer(
            model=(lambda: FlatView()) if args.flat_view else (lambda: MLP(p=args.dropout)),
            run_dir=args.run_dir.format(rank=rank),  # "{rank}": a run dir per rank
            checkpoint_every=args.checkpoint_every,
            keep_last=None,
        )
    except warmfit.CheckpointError as err:
        print(f"rank {rank}: CheckpointError: {err}", flush=True)
        sys.exit(4)
    if args.seen:
        Path(args.seen).mkdir(parents=True, exist_ok=True)
        (Path(args.seen) / f"pid{rank}").write_text(str(os.getpid()))
        data.mark = (24, Path(args.seen) / f"training{rank}")
    data.seen.clear()  # the fingerprint probes of a resume are not training reads
    start = trainer.global_step
    print(f"rank {rank} of {trainer.world_size} started at step {start}", flush=True)
    try:
        inputs = (x, y) if args.arrays else (data,)
        trainer.fit(*inputs, until_epoch=args.until_epoch, verbose=0)
    except warmfit.NonFiniteLossError as err:
        print(f"rank {rank}: NonFiniteLossError: {err}", flush=True)
        sys.exit(3)
    finally:
        if args.seen:
            probes = {0, len(data) // 2, len(data) - 1}
            reads = data.seen
            # fit() fingerprints the dataset first: its three probe reads come first
            if len(reads) >= 3 and set(reads[:3]) == probes:
                reads = reads[3:]
            (Path(args.seen) / f"rank{rank}.json").write_text(
                json.dumps({"start_step": start, "reads": reads})
            )
    if args.out:
        trainer.save(args.out)  # every rank calls it; rank 0 writes
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
