"""The run directory's lock and forked children (issue 15, item 4).

The lock is an ``fcntl.flock``, which belongs to the open file: a child forked while it
is held (a DataLoader worker) shares it. Children must not keep it: after a ``kill -9``
of the trainer its orphaned workers lived on for seconds holding the lock, and an
immediate restart (an automatic requeue) was refused, naming a process that no longer
existed. Real processes, real ``SIGKILL``, no mocks.

Run as a script (``python tests/test_lock_fork.py RUN_DIR``) this file is the training
process of :func:`test_kill9_with_dataloader_workers_then_immediate_restart_resumes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
import warmfit.rundir as rundir_module
from conftest import MLP, make_data, make_trainer
from warmfit.errors import RunDirLockedError
from warmfit.rundir import RunDir

N, BATCH, WORKERS = 400, 16, 2  # 25 steps an epoch, ~60 ms a step
SRC = str(Path(warmfit.__file__).resolve().parents[1])


class SlowMLP(MLP):
    """Slower than the loading: the workers are ahead, idle in their queue's get, which
    times out every 5 s (torch's MP_STATUS_CHECK_INTERVAL) to see whether the parent
    died. Such idle workers outlive a killed trainer by up to 5 s; busy ones by their
    current batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return super().forward(x)


class SlowDataset(torch.utils.data.Dataset):
    """Map-style, read by the DataLoader's worker processes."""

    def __init__(self, n: int = N) -> None:
        x, y = make_data(n)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        time.sleep(0.001)
        return self.x[i], self.y[i]


def make(run_dir: Path | str) -> warmfit.Trainer:
    return make_trainer(
        model=SlowMLP, run_dir=run_dir, checkpoint_every=1, num_workers=WORKERS, batch_size=BATCH
    )


def opens(pid: int | str, path: Path) -> list[str]:
    """The descriptors of process ``pid`` (``"self"``: this one) open on ``path``."""
    target = os.stat(path)
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(fd)
    return found


def children(pid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent
                pids.append(int(name))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "LATEST"
    try:
        name = latest.read_text().strip()
    except FileNotFoundError:
        return -1
    return int(name.rsplit("-", 1)[1]) if name else -1


# --------------------------------------------------------------------------- fork


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_forked_child_has_no_descriptor_of_the_lock(tmp_path: Path) -> None:
    """After os.fork() in a process holding the lock, the child has no descriptor open
    on the lock file, and its copy of the RunDir does not think it holds the lock (so
    it neither unlocks nor clears the record); the parent's lock is untouched."""
    run = RunDir(tmp_path)
    run.lock()
    try:
        assert len(opens("self", run.lock_file)) == 1
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                os.close(read_end)
                report = {"fds": opens("self", run.lock_file), "locked": run.locked}
                run.unlock()  # a no-op for the child's copy
                del run
                import gc

                gc.collect()
                os.write(write_end, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            report = json.loads(pipe.read() or "null")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert report == {"fds": [], "locked": False}
        # The parent still holds it: the record names it and the kernel lock is held.
        assert run.locked
        assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLockedError, match="locked by this process"):
            RunDir(tmp_path).lock()
        run.save({"w": np.zeros(2, np.float32)}, {}, step=1)  # and can still write
    finally:
        run.unlock()
    with RunDir(tmp_path):
        pass


# --------------------------------------------------------------------------- kill -9


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_kill9_with_dataloader_workers_then_immediate_restart_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Trainer with a map-style Dataset and num_workers=2 is killed with SIGKILL in the
    middle of an epoch; a new Trainer on the same run_dir, built at once (no sleep, and
    with the wait for a dead holder's orphans turned off), takes the lock and resumes."""
    monkeypatch.setattr(rundir_module, "ORPHAN_WAIT_S", 0.0, raising=False)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        # Output to files: the orphans would hold a pipe open after the kill.
        proc = subprocess.Popen(
            [sys.executable, __file__, str(run)], stdout=out, stderr=err, env=env
        )
    workers: list[int] = []
    trainer = None
    try:
        deadline = time.monotonic() + 60
        while latest_step(run) < 3:  # a few steps into epoch 0: the workers are up
            assert proc.poll() is None, (tmp_path / "err").read_text()
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.02)
        workers = children(proc.pid)
        assert len(workers) >= WORKERS, workers  # the DataLoader's worker processes
        held = {worker: opens(worker, run / "lock") for worker in workers}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        trainer = make(run)  # at once: the orphaned workers hold no lock
        assert held == {worker: [] for worker in workers}  # they never had it open
        assert trainer.run_dir is not None and trainer.run_dir.locked
        assert json.loads((run / "lock").read_text())["pid"] == os.getpid()
        assert trainer.global_step >= 3 and trainer.global_step == latest_step(run)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_quietly(workers)
        if trainer is not None:
            trainer.close()


# --------------------------------------------------------------------------- orphans

HOLD_THEN_SPAWN = """
import subprocess, sys, time
from warmfit.rundir import RunDir
run = RunDir(sys.argv[1])
run.lock()
# A child that inherits the locked descriptor without the fork hook (exec, pass_fds):
# like a child forked by a C library or by an older warmfit.
orphan = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(float(%s))" % sys.argv[2]],
    pass_fds=(run._lock_fd,),
)
print("ready", orphan.pid, flush=True)
time.sleep(60)
"""


def test_lock_left_to_orphans_of_a_dead_holder_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second line of defence: the lock is held but the process its file names is dead
    on this host. lock() waits (bounded) for its orphans to let go; if they outlast the
    wait, the error says the holder is gone and names the processes still holding it."""
    env = dict(os.environ, PYTHONPATH=SRC)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THEN_SPAWN, str(tmp_path), "3"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    orphan = 0
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        assert line[0] == "ready", line
        orphan = int(line[1])
        holder.kill()
        holder.wait()
        holder.stdout.close()
        assert alive(orphan)
        monkeypatch.setattr(rundir_module, "ORPHAN_WAIT_S", 0.2)
        run = RunDir(tmp_path)
        with pytest.raises(RunDirLockedError) as info:
            run.lock()
        message = str(info.value)
        assert info.value.pid == holder.pid
        assert f"locked by process {holder.pid}" in message
        assert "no longer running" in message and "within 0.2 s" in message
        if Path("/proc/self/fd").is_dir():
            assert f"(pids {orphan})" in message
        assert not run.locked
        monkeypatch.setattr(rundir_module, "ORPHAN_WAIT_S", 30.0)
        started = time.monotonic()
        run.lock()  # waits until the orphan exits (3 s after it started)
        try:
            assert time.monotonic() - started < 30
            assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
        finally:
            run.unlock()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if orphan:
            kill_quietly([orphan])


def _train(run_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = make(run_dir)
    print(f"pid {os.getpid()} started at step {trainer.global_step}", flush=True)
    trainer.fit(SlowDataset(), epochs=4)
    trainer.close()


if __name__ == "__main__":
    _train(sys.argv[1])
