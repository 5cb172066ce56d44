"""Data-parallel training without torchrun: ``_spawn_worker.py RUN_DIR OUT`` starts two
processes with ``torch.multiprocessing.spawn``, each of which starts its own gloo
process group (no ``WORLD_SIZE`` in the environment) and trains the conftest MLP on the
distributed tests' data for 2 epochs; rank 0 writes the final state to OUT."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import MLP, make_data, make_trainer


def train(rank: int, run_dir: str, out: str, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x, y = make_data(192)
    with make_trainer(model=lambda: MLP(p=0.0), run_dir=run_dir) as trainer:
        assert (trainer.world_size, trainer.rank) == (2, rank)
        trainer.fit(x, y, epochs=2, verbose=0)
        trainer.save(out)  # every rank calls it; rank 0 writes
    dist.destroy_process_group()


if __name__ == "__main__":
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(key, None)
    run_dir, out = sys.argv[1], sys.argv[2]
    init = f"file://{Path(out).parent.resolve() / 'rendezvous'}"
    mp.spawn(train, args=(run_dir, out, init), nprocs=2, join=True)
