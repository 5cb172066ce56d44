"""Crash injection and concurrency with real processes (issue 9).

``kill -9`` at random moments of a run whose saves take a good share of the time, and
inside exact windows of a save (``_crash_worker.py``'s pauses: tensor file written but
not ``state.json``; folder complete but not renamed; folder in place but ``LATEST`` not
replaced; an old checkpoint half-deleted by retention). After every kill: every
checkpoint folder present is intact (``verify_run_dir``), the next process resumes
without skipping a damaged checkpoint, and the final state equals an uninterrupted run
bit for bit.

Default: 2 random kills + 4 window kills. ``WARMFIT_LONG=1``: 45 runs x up to 5 random
kills + 10 runs x 4 window kills (at least 200 kill points; the count is printed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LONG
from warmfit.checkpoint import read_checkpoint
from warmfit.rundir import RunDir, verify_run_dir

WORKER = Path(__file__).resolve().parent / "_crash_worker.py"
EPOCHS = 4
EVERY = 3  # 12 steps per epoch: 16 periodic saves + 1 at the end of the run


def start(run_dir: Path, *extra: str, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WARMFIT_CRASH_PAUSE", None)
    if pause:
        env["WARMFIT_CRASH_PAUSE"] = pause
    return subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            str(run_dir),
            str(EPOCHS),
            "--checkpoint-every",
            str(EVERY),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_until(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str | None:
    """Lines of stdout until one starts with ``prefix`` (returned); None at EOF."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith(prefix):
            return line
    raise TimeoutError(f"no line starting with {prefix!r}")


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def finish(run_dir: Path, out: Path) -> tuple[str, str]:
    proc = start(run_dir, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout, stderr


def assert_all_intact(run_dir: Path) -> None:
    """No half-written checkpoint is ever visible as a checkpoint."""
    if not (run_dir / "checkpoints").exists():
        return
    damaged = [(p.name, why) for p, why in verify_run_dir(run_dir) if why is not None]
    assert not damaged, damaged


#: The history's "lr" of an epoch whose last step was checkpointed (and resumed from)
#: before the epoch was logged was the next step's lr (fixed in 6d0ba51): see
#: test_resume_at_the_end_of_an_epoch_logs_the_same_lr. True compares without "lr".
LR_BUG = False


def assert_same_state(path: Path, ref: Path) -> None:
    t, s = read_checkpoint(path)
    rt, rs = read_checkpoint(ref)
    assert sorted(t) == sorted(rt)
    for k in rt:
        assert t[k].dtype == rt[k].dtype and torch.equal(
            torch.from_numpy(t[k]), torch.from_numpy(rt[k])
        ), f"tensor {k} differs"
    if LR_BUG:  # the same bug leaves the never-taken next step's lr in the param groups
        for doc in (s, rs):
            for group in doc["backend"]["optimizer"]["param_groups"]:
                group.pop("lr")
    c, rc = dict(s["counters"]), dict(rs["counters"])
    c.pop("fit_calls"), rc.pop("fit_calls")
    assert c == rc
    for key in ("rng", "epoch_partial", "backend", "schedule"):
        assert s[key] == rs[key], key
    strip = ("segment", "mode", "lr") if LR_BUG else ("segment", "mode")
    assert [{k: v for k, v in r.items() if k not in strip} for r in s["history"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in rs["history"]
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in a process of its own, with the same saves."""
    root = tmp_path_factory.mktemp("reference")
    finish(root / "run", root / "final")
    return root / "final"


def in_save(run_dir: Path) -> bool:
    cdir = run_dir / "checkpoints"
    return cdir.is_dir() and any(e.name.startswith((".tmp-", ".trash-")) for e in cdir.iterdir())


RANDOM_RUNS, KILLS_PER_RUN = (45, 5) if LONG else (1, 2)


@pytest.mark.parametrize("trial", range(RANDOM_RUNS))
def test_kill9_at_random_moments_resume_is_exact(tmp_path, reference, trial):
    rng = random.Random(9000 + trial)
    run = tmp_path / "run"
    kills = during_save = 0
    for _ in range(KILLS_PER_RUN):
        proc = start(run)
        line = read_until(proc, "started at step")
        if line is None or proc.poll() is not None:  # the run had already finished
            proc.communicate()
            break
        time.sleep(rng.uniform(0.0, 1.5))  # a run is ~5 s of training: most lives end in a kill
        if proc.poll() is None:
            kill9(proc)
            kills += 1
            during_save += in_save(run)
        else:
            _, err = proc.communicate()
            assert proc.returncode == 0, err
        assert_all_intact(run)
    _, err = finish(run, tmp_path / "final")
    assert "skipping damaged checkpoint" not in err
    assert_all_intact(run)
    assert_same_state(tmp_path / "final", reference)
    print(f"\nCRASH random trial={trial} kills={kills} during_save={during_save}")


WINDOWS = ("tensors", "rename", "latest", "trash")
WINDOW_RUNS = 10 if LONG else 1


@pytest.mark.parametrize("trial", range(WINDOW_RUNS))
def test_kill9_inside_each_window_of_a_save(tmp_path, reference, trial):
    """Kill exactly between write and rename, between rename and LATEST, and in the
    middle of retention's deletion; each time resume and go on."""
    rng = random.Random(7000 + trial)
    run = tmp_path / "run"
    kills = 0
    for point in WINDOWS:
        k = rng.randint(1, 4)
        proc = start(run, pause=f"{point}:{k}")
        line = read_until(proc, f"PAUSE {point}")
        assert line is not None, proc.communicate()[1]
        kill9(proc)
        kills += 1
        cdir = run / "checkpoints"
        leftovers = [e.name for e in cdir.iterdir() if e.name.startswith((".tmp-", ".trash-"))]
        if point in ("tensors", "rename"):
            assert any(n.startswith(".tmp-ckpt-") for n in leftovers), leftovers
        if point == "trash":
            assert any(n.startswith(".trash-ckpt-") for n in leftovers), leftovers
        if point == "latest":  # the new folder is complete, LATEST still names the old one
            newest = RunDir(run).checkpoints()[-1].name
            assert (cdir / "LATEST").read_text().strip() != newest
        assert_all_intact(run)
    _, err = finish(run, tmp_path / "final")
    assert "skipping damaged checkpoint" not in err
    assert not [
        e for e in (run / "checkpoints").iterdir() if e.name.startswith((".tmp-", ".trash-"))
    ]
    assert_same_state(tmp_path / "final", reference)
    print(f"\nCRASH window trial={trial} kills={kills}")


# --------------------------------------------------------------------------- concurrency

RACES = 5 if LONG else 1


@pytest.mark.parametrize("trial", range(RACES))
def test_two_processes_resuming_the_same_run_dir(tmp_path, reference, trial):
    """Both start at once on a run dir holding a checkpoint: one proceeds, the other is
    refused with RunDirLockedError naming the holder's pid; nothing is corrupted."""
    run = tmp_path / "run"
    first = start(run, pause="rename:3")  # alive and holding the lock, mid-save
    assert read_until(first, "PAUSE rename") is not None
    kill9(first)  # leaves checkpoints and a stale lock file naming a dead pid
    assert json.loads((run / "lock").read_text())["pid"] == first.pid
    a = start(run, "--out", str(tmp_path / "a"))
    b = start(run, "--out", str(tmp_path / "b"))
    results = {p.pid: (p, *p.communicate(timeout=300)) for p in (a, b)}
    codes = sorted(p.returncode for p, _, _ in results.values())
    assert codes[0] == 0 and codes[1] != 0, {pid: r[2][-500:] for pid, r in results.items()}
    winner = next(p for p, _, _ in results.values() if p.returncode == 0)
    _, _, err = next(r for r in results.values() if r[0].returncode != 0)
    assert f"RunDirLockedError: run directory {run} is locked by process {winner.pid}" in err
    assert "Wait for it to finish, stop it, or use another run_dir." in err
    assert_all_intact(run)
    out = tmp_path / ("a" if winner is a else "b")
    assert_same_state(out, reference)
    assert not (tmp_path / ("b" if winner is a else "a")).exists()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    """flock-based: the kernel drops the lock with the process; the file's stale pid is
    only information, and the next taker rewrites it."""
    import fcntl

    from warmfit.errors import RunDirLockedError

    run = tmp_path / "run"
    proc = start(run, pause="rename:1")
    assert read_until(proc, "PAUSE rename") is not None
    with pytest.raises(RunDirLockedError, match=f"locked by process {proc.pid}"):
        RunDir(run).lock()
    kill9(proc)
    assert json.loads((run / "lock").read_text())["pid"] == proc.pid  # stale content
    rd = RunDir(run)
    rd.lock()
    try:
        assert json.loads((run / "lock").read_text())["pid"] == os.getpid()
        fd = os.open(run / "lock", os.O_RDWR)  # the kernel lock is really held
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        rd.unlock()
    # A lock file naming a *live* process that does not hold the flock is not a lock.
    (run / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with RunDir(run):
        pass


def test_kill9_never_leaves_an_unloadable_latest(tmp_path, reference):
    """Whatever LATEST names after a kill loads, or LATEST is absent/behind and the
    newest intact folder is used: the Trainer's resume never errors."""
    run = tmp_path / "run"
    proc = start(run, pause="latest:2")
    read_until(proc, "PAUSE latest")
    kill9(proc)
    rd = RunDir(run)
    path = rd.latest()
    tensors, _ = read_checkpoint(path)
    assert all(isinstance(a, np.ndarray) for a in tensors.values())


def test_resume_at_the_end_of_an_epoch_logs_the_same_lr(tmp_path):
    import warmfit
    from conftest import MLP, assert_same_training_state, make_data, make_trainer, trainer_settings

    class SignalAtStep(MLP):
        """SIGTERM during the 25th training forward: the epoch's last step."""

        calls = 0

        def forward(self, x):
            if self.training:
                SignalAtStep.calls += 1
                if SignalAtStep.calls == 25:
                    os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(x)

    x, y = make_data(400)  # 25 steps per epoch
    t = make_trainer(run_dir=tmp_path / "run", model=SignalAtStep)
    with t, pytest.raises(warmfit.TrainingInterrupted):
        t.fit(x, y, epochs=2)
    interrupted = RunDir(tmp_path / "run").latest()  # step 25: offset 400, epoch 0
    _, state = read_checkpoint(interrupted)
    assert (state["counters"]["epoch"], state["counters"]["offset"]) == (0, 400)

    resumed = warmfit.Trainer.load(interrupted, model=MLP, **trainer_settings())
    resumed.fit(x, y, until_epoch=1)  # only logs epoch 1: the optimizer keeps its rate
    straight = make_trainer()
    straight.fit(x, y, epochs=1)
    assert resumed.learning_rate == straight.learning_rate
    assert_same_training_state(resumed, straight)
    resumed.fit(x, y, epochs=1)
    straight.fit(x, y, epochs=1)
    assert_same_training_state(resumed, straight)
