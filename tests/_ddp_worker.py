"""A training process for the distributed tests, started by torchrun (or plainly, as a
world of one): ``_ddp_worker.py RUN_DIR UNTIL_EPOCH [--dropout P] [--slow S] [--out PATH]
[--seen DIR] [--rows N] [--arrays] [--nan-row I] [--checkpoint-every K] [--half]
[--writes FILE]``.

Trains the conftest MLP on a map-style dataset that records which samples this rank
read (written to ``--seen/rank<r>.json``), or with ``--arrays`` on the arrays
themselves, resuming from RUN_DIR if it holds a checkpoint; rank 0 writes the final
state to ``--out``; a ``{rank}`` in RUN_DIR gives each rank its own. ``--nan-row I``
makes row I's features NaN. ``--half`` trains :class:`HalfMLP` (float16) on float16
rows with SGD. ``--writes FILE`` records every file-system write this rank makes
(Python's audit events: opening for writing, mkdir, rename, remove...) in
``FILE.format(rank=rank)``, as JSON. A NonFiniteLossError (CheckpointError) is printed as
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


class DictItems(Recording):
    """Items ``({"x": row}, label)``: the model is called as ``model(x=...)``."""

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        x, y = super().__getitem__(i)
        return {"x": x}, y


class HalfMLP(torch.nn.Module):
    """The MLP in float16, with a parameter whose float16 sum overflows (512 x 256 =
    131072 > 65504): a rank's zero-row step that summed the parameters before
    multiplying by 0 would make inf x 0 = NaN. The forward multiplies by
    ``big[0] / 256`` (1 at the start), so that DDP sees the parameter used."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(p=0.0)
        self.big = torch.nn.Parameter(torch.full((512,), 256.0))
        self.half()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x) * (self.big[0] / 256)


def half_settings() -> dict:
    """The Trainer arguments (besides conftest's) of a HalfMLP run."""
    return dict(
        model=HalfMLP,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        schedule=warmfit.schedules.constant(0.1),
    )


WRITE_EVENTS = {
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link",
    "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.move",
    "shutil.copyfile", "shutil.copytree",
}  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def record_writes(into: list[list[str]]) -> None:
    """Append ``[event, path]`` to ``into`` for every file-system write of this process
    that Python's audit hooks see (opens for writing or creating, and WRITE_EVENTS)."""

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writes and isinstance(path, (str, bytes, os.PathLike)):
                into.append([event, os.fsdecode(path)])
        elif event in WRITE_EVENTS:
            into.extend(
                [event, os.fsdecode(a)]
                for a in args[:2]
                if isinstance(a, (str, bytes, os.PathLike))
            )

    sys.addaudithook(hook)


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
    p.add_argument("--half", action="store_true")
    p.add_argument("--writes", default=None)
    p.add_argument("--accumulate", type=int, default=1)  # the torch step's micro-batches
    p.add_argument("--dict-items", action="store_true")  # items ({"x": row}, label)
    p.add_argument("--plan", action="store_true")  # a cosine to the end of each call's plan
    args = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    writes: list[list[str]] = []
    if args.writes:
        record_writes(writes)
    x, y = make_data(args.rows)
    if args.half:
        x = x.astype("float16")
    if args.nan_row is not None:
        x[args.nan_row] = float("nan")
    data = (DictItems if args.dict_items else Recording)(x, y, args.slow)
    model = (lambda: FlatView()) if args.flat_view else (lambda: MLP(p=args.dropout))
    settings = half_settings() if args.half else {"model": model}
    if args.accumulate > 1:
        settings["accumulate"] = args.accumulate
    if args.plan:
        settings["schedule"] = warmfit.schedules.cosine(1e-2, "plan", min_lr=1e-3)
    try:
        trainer = make_trainer(
            run_dir=args.run_dir.format(rank=rank),  # "{rank}": a run dir per rank
            checkpoint_every=args.checkpoint_every,
            keep_last=None,
            **settings,
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
    if args.writes:
        Path(args.writes.format(rank=rank)).write_text(json.dumps(writes))
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main()
    # Everything is written and the group destroyed: leave without the interpreter's
    # teardown. Once in CI a rank died of SIGABRT ("terminate called without an active
    # exception", a C++ thread destroyed while running) where torch's distributed
    # threads are torn down (pytorch/pytorch#179291 describes the teardown race). An
    # abort before this line still fails the test; this one is torch's, not warmfit's.
    sys.stderr.flush()
    os._exit(0)
