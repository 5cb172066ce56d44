"""E7 with real torchrun, gloo and 2 processes on the CPU.

- Same world size: a resumed run equals an uninterrupted one bit for bit.
- Another world size: the same global sample order and batch composition; the weights
  agree within a float tolerance, because the gradient of a global batch is summed in
  another order (per-rank partial sums, then an all-reduce). See docs/design.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, make_data, make_trainer
from warmfit.checkpoint import read_checkpoint
from warmfit.data import epoch_batches, epoch_permutation, shard

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
N, BS, SEED = 192, 16, 7
STEPS_PER_EPOCH = N // BS
#: Cross-world-size tolerance on every parameter after 2 epochs of Adam (measured
#: differences are ~1e-6; see docs/design.md, "Distributed").
ATOL = 1e-4

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def launch(world: int, run_dir: Path, until: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if world == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world}", str(WORKER),
        ]  # fmt: skip
    return subprocess.Popen(
        [*cmd, str(run_dir), str(until), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run(world: int, run_dir: Path, until: int, *extra: str) -> str:
    proc = launch(world, run_dir, until, *extra)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def straight_single(until: int, dropout: float = 0.0) -> dict:
    x, y = make_data(N)
    t = make_trainer(model=lambda: MLP(p=dropout))
    from _ddp_worker import Recording

    t.fit(Recording(x, y, 0.0), until_epoch=until, verbose=0)
    return t.state_dict()


def weights(tensors: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def expected_reads(rank: int, world: int, start_step: int, until_epoch: int) -> list[int]:
    """What rank ``rank`` must read: its shard of every global batch from ``start_step``."""
    reads: list[int] = []
    epoch, offset = divmod(start_step, STEPS_PER_EPOCH)
    for e in range(epoch, until_epoch):
        order = epoch_permutation(SEED, e, N)
        for batch in epoch_batches(order, BS, offset * BS if e == epoch else 0):
            reads += shard(batch, rank, world).tolist()
    return reads


def reads_of(seen: Path, rank: int) -> tuple[int, list[int]]:
    doc = json.loads((seen / f"rank{rank}.json").read_text())
    return doc["start_step"], doc["reads"]


def test_two_processes_match_one_on_the_same_global_batches(tmp_path):
    run(2, tmp_path / "run", 2, "--out", str(tmp_path / "final"), "--seen", str(tmp_path / "seen"))
    for rank in (0, 1):
        start, reads = reads_of(tmp_path / "seen", rank)
        assert start == 0 and reads == expected_reads(rank, 2, 0, 2)
    tensors, state = read_checkpoint(tmp_path / "final")
    ref = straight_single(2)
    assert state["counters"]["global_step"] == 2 * STEPS_PER_EPOCH
    for k, v in weights(ref["tensors"]).items():
        assert np.allclose(tensors[k], v, rtol=0, atol=ATOL), k
    assert state["ledger"][-1]["world_size"] == 2


def test_same_world_size_resume_is_bit_exact_with_dropout(tmp_path):
    run(2, tmp_path / "straight", 2, "--dropout", "0.2", "--out", str(tmp_path / "a"))
    run(2, tmp_path / "split", 1, "--dropout", "0.2")
    out = run(2, tmp_path / "split", 2, "--dropout", "0.2", "--out", str(tmp_path / "b"))
    assert f"started at step {STEPS_PER_EPOCH}" in out
    a, sa = read_checkpoint(tmp_path / "a")
    b, sb = read_checkpoint(tmp_path / "b")
    assert sorted(a) == sorted(b) and "rng/rank1/torch_cpu" in a
    for k in a:
        assert torch.equal(torch.from_numpy(a[k]), torch.from_numpy(b[k])), k
    assert sa["rng"] == sb["rng"]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_at_another_world_size_keeps_the_global_order(tmp_path, before, after):
    run(before, tmp_path / "run", 1)
    seen = tmp_path / "seen"
    run(after, tmp_path / "run", 2, "--out", str(tmp_path / "final"), "--seen", str(seen))
    for rank in range(after):
        start, reads = reads_of(seen, rank)
        assert start == STEPS_PER_EPOCH
        assert reads == expected_reads(rank, after, STEPS_PER_EPOCH, 2)
    tensors, state = read_checkpoint(tmp_path / "final")
    assert [r["world_size"] for r in state["ledger"]] == [before, after]
    ref = straight_single(2)
    for k, v in weights(ref["tensors"]).items():
        assert np.allclose(tensors[k], v, rtol=0, atol=ATOL), k


def test_sigterm_on_one_rank_stops_all_at_one_step_then_resumes_exactly(tmp_path):
    run(2, tmp_path / "straight", 3, "--out", str(tmp_path / "a"))
    seen = tmp_path / "seen"
    proc = launch(2, tmp_path / "run", 3, "--slow", "0.01", "--seen", str(seen))
    deadline = time.time() + 120
    # 24 reads on rank 1: its third step, of 36 that take >= 80 ms each (10 ms a read)
    while not (seen / "training1").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(int((seen / "pid1").read_text()), signal.SIGTERM)  # one rank only
    _out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    for rank in (0, 1):  # the rank without the signal names it too (the CLI's exit code)
        assert re.search(rf"\[rank{rank}\]: .*training stopped by SIGTERM at global step", err)
    _, state = read_checkpoint(warmfit.rundir.RunDir(tmp_path / "run").latest())
    stopped = state["counters"]["global_step"]
    assert 0 < stopped < 3 * STEPS_PER_EPOCH
    # both ranks stopped after the same step: each read exactly its shards up to it
    for rank in (0, 1):
        _, reads = reads_of(seen, rank)
        expected = expected_reads(rank, 2, 0, 3)
        per_step = len(expected) // (3 * STEPS_PER_EPOCH)
        assert reads == expected[: stopped * per_step]
    run(2, tmp_path / "run", 3, "--out", str(tmp_path / "b"))
    a, _ = read_checkpoint(tmp_path / "a")
    b, _ = read_checkpoint(tmp_path / "b")
    for k in a:
        assert torch.equal(torch.from_numpy(a[k]), torch.from_numpy(b[k])), k


def test_torchrun_cli_train_then_continue_in_one_process(tmp_path):
    spec = Path(__file__).resolve().parent.parent / "examples" / "digits.toml"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    common = [str(spec), "--epochs", "1", "--run-dir", str(tmp_path / "run")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    first = subprocess.run(
        [*torchrun, "-m", "warmfit", "train", *common], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("fit call 0 (continue)") == 1  # printed by rank 0 only
    second = subprocess.run(
        [sys.executable, "-m", "warmfit", "train", *common], capture_output=True, text=True,
        env=env, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    _, state = read_checkpoint(warmfit.rundir.RunDir(tmp_path / "run").latest())
    assert [r["world_size"] for r in state["ledger"]] == [2, 1]
    assert state["counters"]["epoch"] == 2


@pytest.mark.parametrize("source", ["arrays", "dataset"])
def test_a_global_batch_that_leaves_a_rank_no_rows_trains_like_one_process(tmp_path, source):
    """17 rows, global batch 16, 2 ranks: each epoch's second batch has one row, which
    rank 1 gets; rank 0 still takes the step (DDP's collectives), on zero rows."""
    extra = ["--rows", "17", "--out", str(tmp_path / "final")]
    run(2, tmp_path / "run", 2, *extra, *(["--arrays"] if source == "arrays" else []))
    tensors, state = read_checkpoint(tmp_path / "final")
    assert state["counters"]["global_step"] == 4
    x, y = make_data(17)
    t = make_trainer(model=lambda: MLP(p=0.0))
    t.fit(x, y, until_epoch=2, verbose=0)
    for k, v in weights(t.state_dict()["tensors"]).items():
        assert np.allclose(tensors[k], v, rtol=0, atol=ATOL), k
    losses = [r["loss"] for r in state["history"]]
    assert np.allclose(losses, [r["loss"] for r in t.history], rtol=0, atol=ATOL)


def test_a_model_that_cannot_take_zero_rows_is_refused_before_training(tmp_path):
    """Such a rank's step runs the model on zero rows: a model that cannot is refused on
    every rank before anything trains (it aborted gloo mid-epoch, with no message)."""
    proc = launch(2, tmp_path / "run", 1, "--rows", "17", "--arrays", "--flat-view")
    _out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (
            f"[rank{rank}]: ValueError: Under DDP, 17 rows in global batches of 16 over 2 "
            "ranks leave some ranks no rows in a batch (the last batch has 1); such a rank "
            "still takes the step, on a batch of zero rows, and the model cannot run on zero "
            "rows (RuntimeError: cannot reshape tensor of 0 elements"
        ) in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").glob("ckpt-*")
    )


def test_a_nan_loss_under_ddp_stops_every_rank_before_a_save(tmp_path):
    """Under DDP the loss is read at saves and epoch ends: a NaN raises there, on every
    rank, and no checkpoint with NaN weights is written."""
    run_dir = tmp_path / "run"
    proc = launch(2, run_dir, 3, "--arrays", "--nan-row", "150", "--checkpoint-every", "4")
    out, _err = proc.communicate(timeout=240)
    assert proc.returncode != 0, out
    for rank in (0, 1):
        assert f"rank {rank}: NonFiniteLossError: the loss became nan at global step" in out
    assert "It was read at step" in out
    saved = warmfit.rundir.RunDir(run_dir).checkpoints()
    assert saved  # the saves before the NaN
    for path in saved:
        tensors, _ = read_checkpoint(path)
        assert all(np.isfinite(v).all() for v in weights(tensors).values()), path.name


def test_ranks_that_find_different_checkpoints_refuse_to_start(tmp_path):
    """A run dir on each node's own disk: rank 0 finds a checkpoint, rank 1 none. Both
    stop with a CheckpointError that says so, instead of training from two states."""
    run(1, tmp_path / "rank0", 1)  # rank 0's disk holds epoch 1
    proc = launch(2, tmp_path / "rank{rank}", 2)
    out, _err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (
            f"rank {rank}: CheckpointError: {tmp_path / f'rank{rank}'}/checkpoints: the ranks "
            "found different newest checkpoints (rank 0: ckpt-00000001-run000-step-"
            "000000000012, rank 1: none). Every rank must see the same run directory: put "
            "run_dir on storage that all nodes share (not a node's own disk), then start the "
            "job again."
        ) in out


def test_a_process_group_started_without_torchrun_is_joined(tmp_path):
    """mp.spawn + init_process_group(world_size=2), no WORLD_SIZE in the environment: the
    Trainer trains data-parallel in that group, the same global batches as one process
    (before, each process trained alone and the second found the run dir locked)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    spawn = Path(__file__).resolve().parent / "_spawn_worker.py"
    done = subprocess.run(
        [sys.executable, str(spawn), str(tmp_path / "run"), str(tmp_path / "spawned")],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    spawned, state = read_checkpoint(tmp_path / "spawned")
    assert state["ledger"][-1]["world_size"] == 2 and "rng/rank1/torch_cpu" in spawned
    x, y = make_data(N)
    one = make_trainer(model=lambda: MLP(p=0.0))
    one.fit(x, y, epochs=2, verbose=0)
    for k, v in weights(one.state_dict()["tensors"]).items():
        assert np.allclose(spawned[k], v, rtol=0, atol=ATOL), k
