"""examples/charlm.toml end to end through the command line: a character-level
transformer LM with dict batches, its own .loss, bf16, accumulate=4, clipping, an EMA,
AdamW groups by name and warm-up + cosine — split commands, a cut inside an epoch and a
kill -9 all end in the very same state as one uninterrupted command."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_same_state
from warmfit.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "charlm.toml"


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    [str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]))  # fmt: skip


def train(run: Path, *args: str, spec: Path = SPEC) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "warmfit", "train", str(spec), "--run-dir", str(run), *args],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final(run: Path) -> Path:
    latest = RunDir(run).latest()
    assert latest is not None
    return latest


def test_two_commands_equal_one_and_the_model_writes_text(tmp_path):
    out = train(tmp_path / "straight", "--epochs", "2").stdout
    assert "sample after epoch 2: 'The " in out and "grad_norm=" in out
    train(tmp_path / "split", "--epochs", "1")
    train(tmp_path / "split", "--epochs", "1")
    assert_same_state(final(tmp_path / "straight"), final(tmp_path / "split"), ledger=False)


def test_a_cut_inside_an_epoch_and_a_kill_9_resume_to_the_same_state(tmp_path):
    train(tmp_path / "straight", "--epochs", "2")
    # A cut inside epoch 1 (step 13 of 32), finished by a later command.
    train(tmp_path / "cut", "--steps", "13")
    train(tmp_path / "cut", "--until-epoch", "2")
    assert_same_state(final(tmp_path / "straight"), final(tmp_path / "cut"), ledger=False)
    # kill -9 at a random moment after the first checkpoint, with a checkpoint at every
    # step (the example's modules found on PYTHONPATH); the same command again (a
    # requeue) finishes the call where the uninterrupted one ended.
    every = tmp_path / "charlm_every_step.toml"
    every.write_text(SPEC.read_text().replace("checkpoint_every = 8", "checkpoint_every = 1"))
    assert "checkpoint_every = 1\n" in every.read_text()
    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "warmfit", "train", str(every), "--run-dir", str(run),
            "--epochs", "2"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "LATEST").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # the run takes seconds more
    assert proc.poll() is None, "the run ended before its kill: nothing would be tested"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    train(run, "--epochs", "2", spec=every)  # the same command: it finishes the call
    assert_same_state(final(tmp_path / "straight"), final(run), ledger=False)
