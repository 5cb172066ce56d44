"""Crash injection and concurrency with real processes (issue 9).

``kill -9`` at random moments of a run whose saves take a good share of the time, and
inside exact windows of a save (``_crash_worker.py``'s pauses: tensor file written but
not ``state.json``; folder complete but not renamed; folder in place but ``LATEST`` not
replaced; an old checkpoint half-deleted by retention). After every kill: every
checkpoint folder present is intact (``verify_run_dir``), the next process resumes
without skipping a damaged checkpoint, and the final state equals an uninterrupted run
bit for bit.

Every kill is checked to be one: the process died of SIGKILL (return code -9) while the
run was mid-way (the newest checkpoint is before the last step), and the next process
started from that checkpoint's step. Every process's stderr is checked, the killed ones
included.

Default: 1 run with up to 2 random kills + 4 window kills + 1 race. ``WARMFIT_LONG=1``:
45 runs x up to 5 random kills + 10 runs x 4 window kills + 5 races. ``-s`` prints each
run's kills and the steps they hit (``CRASH ...`` lines) and the totals
(``CRASH total ...``) at the end of the module.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LONG, assert_same_state
from warmfit.checkpoint import read_checkpoint
from warmfit.rundir import RunDir, verify_run_dir

WORKER = Path(__file__).resolve().parent / "_crash_worker.py"
EPOCHS = 4
EVERY = 3  # 12 steps per epoch: 15 periodic saves + 1 at the end of the run
TOTAL_STEPS = EPOCHS * 12
DAMAGED = "skipping damaged checkpoint"

#: Every kill of the module, for the totals printed at its end.
KILLS: dict[str, list[int]] = {"random": [], "window": []}  # the steps they left runs at
COUNTS: dict[str, int] = {"random runs": 0, "window runs": 0, "random kills during a save": 0}


@pytest.fixture(scope="module", autouse=True)
def _print_the_kill_count():
    yield
    print(
        f"\nCRASH total: {len(KILLS['random'])} random kills in {COUNTS['random runs']} runs "
        f"({COUNTS['random kills during a save']} with a save in flight), "
        f"{len(KILLS['window'])} window kills in {COUNTS['window runs']} runs; "
        f"random kills at steps {sorted(KILLS['random'])}"
    )


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


def kill9(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGKILL the process unless it has already exited; its return code and stderr,
    which must not report a damaged checkpoint."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert DAMAGED not in stderr, stderr
    return proc.returncode, stderr


def started_at(proc: subprocess.Popen) -> int | None:
    """The step the process started from (its ``started at step N`` line); None if it
    exited before printing it."""
    line = read_until(proc, "started at step")
    return None if line is None else int(line.split()[-1])


def newest_step(run_dir: Path) -> int:
    """The global step of the checkpoint a process would resume from (0: none yet)."""
    path = RunDir(run_dir).latest() if (run_dir / "checkpoints").is_dir() else None
    return 0 if path is None else read_checkpoint(path)[1]["counters"]["global_step"]


def assert_killed_mid_way(rc: int, run_dir: Path) -> int:
    """The process died of SIGKILL with the run unfinished; the step it can resume from."""
    assert rc == -signal.SIGKILL, rc
    step = newest_step(run_dir)
    assert 0 <= step < TOTAL_STEPS, step
    return step


def finish(run_dir: Path, out: Path) -> tuple[str, str]:
    proc = start(run_dir, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert DAMAGED not in stderr, stderr
    return stdout, stderr


def assert_all_intact(run_dir: Path) -> None:
    """No half-written checkpoint is ever visible as a checkpoint."""
    if not (run_dir / "checkpoints").exists():
        return
    damaged = [(p.name, why) for p, why in verify_run_dir(run_dir) if why is not None]
    assert not damaged, damaged


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
    kills: list[int] = []  # the step each kill left the run at (its newest checkpoint)
    during_save = 0  # kills that left a .tmp-/.trash- folder: a save was in flight
    first_delay = 0.5  # the first process's life before its kill, at most
    for _ in range(KILLS_PER_RUN + 4):  # room to start over when the first one finished
        if len(kills) == KILLS_PER_RUN:
            break
        expected = newest_step(run)
        proc = start(run)
        step = started_at(proc)
        if step is None or proc.poll() is not None:  # the run had already finished
            _, err = proc.communicate()
            assert proc.returncode == 0 and DAMAGED not in err, err
            break
        assert step == expected, (step, expected)  # resumed from the newest checkpoint
        # A run is ~2-5 s of training: most lives end in a kill, the first always.
        time.sleep(rng.uniform(0.0, 1.5 if kills else first_delay))
        rc, _ = kill9(proc)
        if rc == 0 or newest_step(run) == TOTAL_STEPS:  # it had finished: not a kill
            assert rc in (0, -signal.SIGKILL), rc
            if kills:
                break
            # On quiet cores the whole run can end before the first kill (the long run
            # saw it once in 45): start the run over from nothing, with a shorter life.
            shutil.rmtree(run)
            first_delay /= 4
            continue
        kills.append(assert_killed_mid_way(rc, run))
        during_save += in_save(run)
        assert_all_intact(run)
    # The first process starts at step 0 and lives at most 0.5 s of its 2-5: always killed.
    assert kills, "no process was killed"
    _, err = finish(run, tmp_path / "final")
    assert_all_intact(run)
    assert_same_state(tmp_path / "final", reference)
    COUNTS["random runs"] += 1
    COUNTS["random kills during a save"] += during_save
    KILLS["random"] += kills
    print(
        f"\nCRASH random trial={trial} kills={len(kills)} during_save={during_save} "
        f"resumed_from_steps={kills}"
    )


WINDOWS = ("tensors", "rename", "latest", "trash")
WINDOW_RUNS = 10 if LONG else 1


@pytest.mark.parametrize("trial", range(WINDOW_RUNS))
def test_kill9_inside_each_window_of_a_save(tmp_path, reference, trial):
    """Kill exactly between write and rename, between rename and LATEST, and in the
    middle of retention's deletion; each time resume and go on."""
    rng = random.Random(7000 + trial)
    run = tmp_path / "run"
    kills: list[int] = []
    for point in WINDOWS:
        k = rng.randint(1, 4)
        expected = newest_step(run)
        proc = start(run, pause=f"{point}:{k}")
        assert started_at(proc) == expected  # resumed from the newest checkpoint
        line = read_until(proc, f"PAUSE {point}")
        assert line is not None, proc.communicate()[1]
        rc, _ = kill9(proc)
        kills.append(assert_killed_mid_way(rc, run))
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
    assert len(kills) == len(WINDOWS)
    finish(run, tmp_path / "final")
    assert not [
        e for e in (run / "checkpoints").iterdir() if e.name.startswith((".tmp-", ".trash-"))
    ]
    assert_same_state(tmp_path / "final", reference)
    COUNTS["window runs"] += 1
    KILLS["window"] += kills
    print(f"\nCRASH window trial={trial} kills={len(kills)} resumed_from_steps={kills}")


# --------------------------------------------------------------------------- concurrency

RACES = 5 if LONG else 1


@pytest.mark.parametrize("trial", range(RACES))
def test_two_processes_resuming_the_same_run_dir(tmp_path, reference, trial):
    """Both start at once on a run dir holding a checkpoint: one proceeds, the other is
    refused with RunDirLockedError naming the holder's pid; nothing is corrupted."""
    run = tmp_path / "run"
    first = start(run, pause="rename:3")  # alive and holding the lock, mid-save
    assert read_until(first, "PAUSE rename") is not None
    rc, _ = kill9(first)  # leaves checkpoints and a stale lock file naming a dead pid
    assert assert_killed_mid_way(rc, run) == 2 * EVERY  # the third save was in its window
    assert json.loads((run / "lock").read_text())["pid"] == first.pid
    # Whichever takes the lock pauses 5 s at its first rename, holding it: the other,
    # however slow to start, meets the lock (without the pause the first could finish
    # before the second starts, and both would exit 0).
    a = start(run, "--out", str(tmp_path / "a"), pause="rename:1:5")
    b = start(run, "--out", str(tmp_path / "b"), pause="rename:1:5")
    results = {p.pid: (p, *p.communicate(timeout=300)) for p in (a, b)}
    codes = sorted(p.returncode for p, _, _ in results.values())
    assert codes == [0, 1], {pid: r[2][-500:] for pid, r in results.items()}
    winner = next(p for p, _, _ in results.values() if p.returncode == 0)
    _, out, err = next(r for r in results.values() if r[0].returncode == 0)
    assert f"started at step {2 * EVERY}" in out and DAMAGED not in err, err
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
    rc, _ = kill9(proc)
    assert rc == -signal.SIGKILL
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
    """Killed after the step-6 checkpoint's folder is in place, before LATEST names it:
    LATEST still names the step-3 one, which loads intact, and a Trainer resumes from it
    exactly (its tensors, step 3) without a warning."""
    import warnings

    import _crash_worker

    run = tmp_path / "run"
    proc = start(run, pause="latest:2")  # the second LATEST replace: the step-6 save's
    assert read_until(proc, "PAUSE latest") is not None, proc.communicate()[1]
    rc, _ = kill9(proc)
    assert assert_killed_mid_way(rc, run) == EVERY
    rd = RunDir(run)
    path = rd.latest()
    assert [p.name for p in rd.checkpoints()] == [
        "ckpt-00000001-run000-step-000000000003",
        "ckpt-00000002-run000-step-000000000006",
    ]
    assert path == rd.checkpoints()[0]
    assert [p for p, why in verify_run_dir(run) if why] == []
    tensors, state = read_checkpoint(path)
    assert state["counters"]["global_step"] == EVERY
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping damaged checkpoint", no other
        trainer = _crash_worker.make(str(run), EVERY)
    try:
        assert trainer.global_step == EVERY
        now = trainer.state_dict()["tensors"]
        assert sorted(now) == sorted(tensors)
        for k, a in tensors.items():
            assert now[k].dtype == a.dtype and now[k].tobytes() == a.tobytes(), k
    finally:
        trainer.close()


def test_resume_at_the_end_of_an_epoch_logs_the_same_lr(tmp_path):
    import warmfit
    from conftest import MLP, make_data, make_trainer, trainer_settings

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
    assert_same_state(resumed, straight)
    resumed.fit(x, y, epochs=1)
    straight.fit(x, y, epochs=1)
    assert_same_state(resumed, straight)
