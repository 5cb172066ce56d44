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
from _ddp_worker import Recording
from conftest import IN_CI, MLP, assert_same_state, make_data, make_trainer, state_of
from warmfit.checkpoint import read_checkpoint

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
N, BS, SEED = 192, 16, 7
STEPS_PER_EPOCH = N // BS
#: Cross-world-size tolerance on every parameter, optimizer slot and loss after 2 epochs
#: of Adam: the largest difference measured over these tests is 5.6e-8 (the loss of the
#: 17-row runs; weights 4.5e-8), so the bound is 1e-7.
ATOL = 1e-7
#: The same for the float16 model of the zero-row test (4 steps of SGD): measured 4.9e-4,
#: 2**-11, one float16 step between 0.5 and 1; the bound is one step between 1 and 2.
HALF_ATOL = 2**-10

if not torch.distributed.is_available():
    if IN_CI:
        pytest.fail("torch.distributed is not available; CI needs it", pytrace=False)
    pytest.skip("torch.distributed is not available", allow_module_level=True)


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
    t.fit(Recording(x, y, 0.0), until_epoch=until, verbose=0)
    return t.state_dict()


def weights(tensors: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def expected_reads(rank: int, world: int, start_step: int, until_epoch: int) -> list[int]:
    """What rank ``rank`` must read: its shard of every global batch from ``start_step``,
    by the documented rules, written here with NumPy (not warmfit's own functions): an
    epoch's order is a permutation drawn by PCG64 seeded with SeedSequence([seed, epoch,
    0x0DA7A]) (warmfit.data.epoch_permutation); global batches are consecutive slices of
    BS; rank r of w takes rows [n r // w, n (r + 1) // w) of a batch of n."""
    reads: list[int] = []
    epoch, step = divmod(start_step, STEPS_PER_EPOCH)
    for e in range(epoch, until_epoch):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, e, 0x0DA7A])))
        order = rng.permutation(N)
        for start in range(step * BS if e == epoch else 0, N, BS):
            batch = order[start : start + BS]
            n = len(batch)
            reads += batch[n * rank // world : n * (rank + 1) // world].tolist()
    return reads


def assert_close_across_world_sizes(got: object, ref: object, atol: float = ATOL) -> float:
    """A run at another world size against one process (checkpoint folders, state_dicts
    or Trainers). The same global batches: every counter, the schedule and learning
    rate, the data record, the call, the callbacks and every history value but the loss,
    exactly (:func:`conftest.assert_same_state`), and rank 0's random streams too. The
    weights, optimizer slots and losses within ``atol`` (a global batch's gradient is
    summed in another order); only the other ranks' streams are left out, each world
    size's own. Returns the largest difference."""
    g, r = state_of(got), state_of(ref)
    gt, rt = dict(g["tensors"]), dict(r["tensors"])
    for sd in (gt, rt):
        for name in [k for k in sd if k.startswith("rng/rank")]:
            del sd[name]
    worst = 0.0
    for name, a in gt.items():
        b = rt.get(name)
        inexact = name.startswith(("model/", "optim/")) and not name.endswith("/step")
        if b is not None and inexact and a.dtype.kind == "f" and a.dtype == b.dtype:
            assert a.shape == b.shape, name
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(np.max(diff, initial=0.0)))
            gt[name] = b  # compared: set aside for the exact comparison
    gs, rs = dict(g["state"]), dict(r["state"])
    for s in (gs, rs):
        s["rng"] = {k: v for k, v in s["rng"].items() if k != "host_ranks"}
    history = []
    assert len(gs["history"]) == len(rs["history"])
    for a, b in zip(gs["history"], rs["history"], strict=True):
        worst = max(worst, abs(a["loss"] - b["loss"]))
        history.append({**a, "loss": b["loss"]})
    gs["history"] = history
    assert_same_state({"tensors": gt, "state": gs}, {"tensors": rt, "state": rs})
    print(f"largest difference across world sizes: {worst:.3g}")
    assert worst <= atol
    return worst


def reads_of(seen: Path, rank: int) -> tuple[int, list[int]]:
    doc = json.loads((seen / f"rank{rank}.json").read_text())
    return doc["start_step"], doc["reads"]


def test_two_processes_match_one_on_the_same_global_batches(tmp_path):
    run(2, tmp_path / "run", 2, "--out", str(tmp_path / "final"), "--seen", str(tmp_path / "seen"))
    for rank in (0, 1):
        start, reads = reads_of(tmp_path / "seen", rank)
        assert start == 0 and reads == expected_reads(rank, 2, 0, 2)
    _, state = read_checkpoint(tmp_path / "final")
    assert state["counters"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert_close_across_world_sizes(tmp_path / "final", straight_single(2))
    assert state["ledger"][-1]["world_size"] == 2


def test_same_world_size_resume_is_bit_exact_with_dropout(tmp_path):
    run(2, tmp_path / "straight", 2, "--dropout", "0.2", "--out", str(tmp_path / "a"))
    run(2, tmp_path / "split", 1, "--dropout", "0.2")
    out = run(2, tmp_path / "split", 2, "--dropout", "0.2", "--out", str(tmp_path / "b"))
    assert f"started at step {STEPS_PER_EPOCH}" in out
    a, _ = read_checkpoint(tmp_path / "a")
    assert "rng/rank1/torch_cpu" in a
    assert_same_state(tmp_path / "a", tmp_path / "b")  # the whole state, every rank's streams


def test_accumulation_and_dict_items_resume_bit_exact_at_the_same_world_size(tmp_path):
    """accumulate=2 under DDP (gradients all-reduced once per optimizer step, no_sync on
    the first micro-batch) from a Dataset of dict items: a resumed run == straight."""
    args = ("--dropout", "0.2", "--accumulate", "2", "--dict-items")
    run(2, tmp_path / "straight", 2, *args, "--out", str(tmp_path / "a"))
    run(2, tmp_path / "split", 1, *args)
    out = run(2, tmp_path / "split", 2, *args, "--out", str(tmp_path / "b"))
    assert f"started at step {STEPS_PER_EPOCH}" in out
    _, state = read_checkpoint(tmp_path / "a")
    assert state["backend"]["step"]["options"]["accumulate"] == 2
    assert_same_state(tmp_path / "a", tmp_path / "b")


def test_a_plan_under_ddp_ends_where_the_global_batches_end(tmp_path):
    """cosine(horizon='plan'), one call per process launch (the second resumes from the
    first's checkpoint): each call plans to the step its global batches end at, the
    second re-plans, exactly as one process plans them; one call of 2 epochs plans once."""
    run(2, tmp_path / "straight", 2, "--plan", "--out", str(tmp_path / "a"))
    run(2, tmp_path / "split", 1, "--plan")
    run(2, tmp_path / "split", 2, "--plan", "--out", str(tmp_path / "b"))
    run(1, tmp_path / "one", 1, "--plan")
    run(1, tmp_path / "one", 2, "--plan", "--out", str(tmp_path / "c"))
    _, split = read_checkpoint(tmp_path / "b")
    _, one = read_checkpoint(tmp_path / "c")
    s = STEPS_PER_EPOCH
    assert split["schedule"]["plan"] == one["schedule"]["plan"] == [
        {"at": 0, "end": s, "kind": "plan"},
        {"at": s, "end": 2 * s, "kind": "extend"},
    ]
    assert [r["lr"] for r in split["history"]] == [r["lr"] for r in one["history"]]
    _, straight = read_checkpoint(tmp_path / "a")
    assert straight["schedule"]["plan"] == [{"at": 0, "end": 2 * s, "kind": "plan"}]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_at_another_world_size_keeps_the_global_order(tmp_path, before, after):
    run(before, tmp_path / "run", 1)
    seen = tmp_path / "seen"
    run(after, tmp_path / "run", 2, "--out", str(tmp_path / "final"), "--seen", str(seen))
    for rank in range(after):
        start, reads = reads_of(seen, rank)
        assert start == STEPS_PER_EPOCH
        assert reads == expected_reads(rank, after, STEPS_PER_EPOCH, 2)
    _, state = read_checkpoint(tmp_path / "final")
    assert [r["world_size"] for r in state["ledger"]] == [before, after]
    assert_close_across_world_sizes(tmp_path / "final", straight_single(2))


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
    assert_same_state(tmp_path / "a", tmp_path / "b")


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
    _, state = read_checkpoint(tmp_path / "final")
    assert state["counters"]["global_step"] == 4
    x, y = make_data(17)
    t = make_trainer(model=lambda: MLP(p=0.0))
    t.fit(*((x, y) if source == "arrays" else (Recording(x, y, 0.0),)), until_epoch=2, verbose=0)
    assert_close_across_world_sizes(tmp_path / "final", t)


def test_a_float16_model_on_a_batch_that_leaves_a_rank_no_rows(tmp_path):
    """The zero-row step in float16 (docs/design.md, "Distributed"): each parameter is
    multiplied by 0 before the sum, so a parameter whose float16 sum overflows
    (HalfMLP.big) still joins the all-reduce with zeros, not inf x 0 = NaN. 17 rows,
    global batches of 16 on 2 ranks: rank 0 has no row in each epoch's second batch."""
    from _ddp_worker import HalfMLP, half_settings

    assert torch.isinf(HalfMLP().big.sum())  # the overflow this test is about
    extra = ["--rows", "17", "--arrays", "--half", "--out", str(tmp_path / "final")]
    run(2, tmp_path / "run", 2, *extra)
    tensors, state = read_checkpoint(tmp_path / "final")
    assert state["counters"]["global_step"] == 4
    assert tensors["model/big"].dtype == np.float16
    assert all(np.isfinite(v).all() for v in weights(tensors).values())
    assert all(np.isfinite(r["loss"]) for r in state["history"])
    x, y = make_data(17)
    one = make_trainer(**half_settings())
    one.fit(x.astype(np.float16), y, until_epoch=2, verbose=0)
    assert_close_across_world_sizes(tmp_path / "final", one, atol=HALF_ATOL)


def test_rank_0_alone_writes_under_the_run_dir(tmp_path):
    """Rank 0 holds the lock and writes every checkpoint; rank 1 writes nothing under the
    run dir nor at save()'s path (every write Python's audit hooks see: opening for
    writing, mkdir, rename, remove). Rank 0's own record is the control."""
    run_dir, out = tmp_path / "run", tmp_path / "final"
    writes = str(tmp_path / "writes{rank}.json")
    run(2, run_dir, 2, "--checkpoint-every", "5", "--out", str(out), "--writes", writes)

    def under(rank: int, root: Path) -> list[list[str]]:
        seen = json.loads((tmp_path / f"writes{rank}.json").read_text())
        return [w for w in seen if Path(w[1]).resolve().is_relative_to(root.resolve())]

    assert under(1, run_dir) == [] and under(1, out) == []
    ours = under(0, run_dir)
    assert any(e == "os.rename" and "/checkpoints/ckpt-" in p for e, p in ours), ours
    assert under(0, out) != []
    saved = warmfit.rundir.RunDir(run_dir).checkpoints()
    assert [read_checkpoint(c)[1]["counters"]["global_step"] for c in saved][-1] == 24


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
    assert_close_across_world_sizes(tmp_path / "spawned", one)
