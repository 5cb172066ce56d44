"""Faults in the checkpoint writer, through the Trainer (issue 9).

A clean Trainer-level save is recorded once as a sequence of file-system calls
(``mkdir``, ``open`` for writing, ``write``, ``fsync``, ``rename``, ``replace``); then
the save is repeated with ENOSPC, EIO or a failing fsync injected at *each* of those
calls in turn. Every time: the previous checkpoint stays intact, ``LATEST`` still names
it, a new Trainer resumes from it bit for bit, and the error the user sees names the
cause (errno text). Both paths: the save at the end of ``fit`` (raised at the end of
the call) and a periodic background save (raised at the next save). Each test that
injects faults pins how many saves it failed; ``-s`` prints ``FAULTS ...`` lines and the
total.

``test_checkpoint.py`` already covers failing fsyncs and writes at the RunDir level;
this file drives the same code through the Trainer and its background writer.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
import warmfit.checkpoint as ckpt
from conftest import assert_same_state, make_data, make_trainer
from warmfit.background import SaveFailedError
from warmfit.checkpoint import read_checkpoint
from warmfit.rundir import RunDir, verify_run_dir

KINDS = ("mkdir", "open", "write", "fsync", "rename", "replace")


WRITER = "warmfit-checkpoint-writer"  # the name of AsyncWriter's thread


class Faults:
    """Counts file-system calls made by warmfit.checkpoint in the checkpoint writer's
    thread (every Trainer save runs there; calls of other threads are neither counted
    nor failed); raises ``OSError(code)`` at call number ``fail_at`` (0-based, over all
    kinds) when armed. ``failed`` counts the faults raised."""

    def __init__(self, thread: str | None = WRITER) -> None:
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.code = errno.ENOSPC
        self.thread = thread
        self.failed = 0

    def hit(self, kind: str) -> None:
        if self.thread is not None and threading.current_thread().name != self.thread:
            return
        i = len(self.calls)
        self.calls.append(kind)
        if self.fail_at == i:
            self.failed += 1
            raise OSError(self.code, os.strerror(self.code))

    @contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
        real_open, real_fsync = builtins.open, os.fsync
        real_mkdir, real_rename, real_replace = os.mkdir, os.rename, os.replace
        faults = self

        class File:
            def __init__(self, f):  # type: ignore[no-untyped-def]
                self._f = f

            def write(self, data):  # type: ignore[no-untyped-def]
                faults.hit("write")
                return self._f.write(data)

            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                return getattr(self._f, name)

            def __enter__(self):  # type: ignore[no-untyped-def]
                return self

            def __exit__(self, *exc):  # type: ignore[no-untyped-def]
                return self._f.__exit__(*exc)

        def fake_open(file, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
            if any(c in mode for c in "wxa"):
                self.hit("open")
                return File(real_open(file, mode, *a, **kw))
            return real_open(file, mode, *a, **kw)

        def wrap(kind, real):  # type: ignore[no-untyped-def]
            def f(*a, **kw):  # type: ignore[no-untyped-def]
                self.hit(kind)
                return real(*a, **kw)

            return f

        with monkeypatch.context() as m:
            m.setattr(ckpt, "open", fake_open, raising=False)
            m.setattr(ckpt.os, "fsync", wrap("fsync", real_fsync))
            m.setattr(ckpt.os, "mkdir", wrap("mkdir", real_mkdir))
            m.setattr(ckpt.os, "rename", wrap("rename", real_rename))
            m.setattr(ckpt.os, "replace", wrap("replace", real_replace))
            yield self


X, Y = make_data(96)  # 6 steps per epoch

#: Faulted saves per test (and kind of save), printed with -s at the end of the module.
FAULTED: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_the_faulted_saves():
    yield
    for name, n in FAULTED.items():
        print(f"\nFAULTS {name}: {n} faulted saves")
    print(f"\nFAULTS total: {sum(FAULTED.values())} faulted saves in {len(FAULTED)} tests")


def _fresh(run: Path, **kw) -> warmfit.Trainer:
    return make_trainer(run_dir=run, keep_last=100, **kw)  # no retention deletes


def _record_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], int]:
    """The file-system calls of one end-of-fit save, and the number of tensors it wrote."""
    run = tmp_path / "record"
    with _fresh(run) as t:
        t.fit(X, Y, epochs=1)
        with Faults().installed(monkeypatch) as faults:
            t.fit(X, Y, epochs=1)
        n_tensors = len(read_checkpoint(RunDir(run).latest())[0])
    return faults.calls, n_tensors


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], int]:
    mp = pytest.MonkeyPatch()
    try:
        return _record_calls(tmp_path_factory.mktemp("rec"), mp)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def save_calls(recorded: tuple[list[str], int]) -> list[str]:
    return recorded[0]


def test_a_save_makes_the_expected_calls(recorded):
    """The whole sequence, in the writer's thread: the parent's mkdir (it exists), the
    .tmp- folder; the tensor file (its header and each tensor one write, then fsync),
    state.json, the folder's fsync, its rename and the fsync of checkpoints/; then
    index.json and LATEST, each written to a temporary file, fsync'd, replaced and the
    folder fsync'd."""
    calls, n_tensors = recorded
    assert n_tensors == 17  # 4 weights, 4 x 3 Adam slots, the torch RNG state
    durable_replace = ["open", "write", "fsync", "replace", "fsync"]
    assert calls == [
        *["mkdir", "mkdir"],
        *["open", *["write"] * (1 + n_tensors), "fsync"],  # tensors.safetensors
        *["open", "write", "fsync"],  # state.json
        *["fsync", "rename", "fsync"],  # the folder, its rename, checkpoints/
        *durable_replace,  # index.json
        *durable_replace,  # LATEST
    ]
    assert len(calls) == 38
    print(f"\nFAULTS a save makes {len(calls)} file-system calls: {calls}")


def _undo(save_calls: list[str], i: int) -> list[str]:
    """The calls a save that failed at call ``i`` makes to undo itself: none until its
    folder is renamed into place; after that the folder is renamed aside (then deleted);
    if the last fsync failed, LATEST, already replaced, is first put back."""
    if i <= save_calls.index("rename"):
        return []
    if i == len(save_calls) - 1:
        return ["open", "write", "fsync", "replace", "fsync", "rename"]
    return ["rename"]


CODES = (errno.ENOSPC, errno.EIO)


def _cases(n: int) -> list[tuple[int, int]]:
    return [(i, code) for i in range(n) for code in CODES]


@pytest.mark.parametrize("code", CODES, ids=lambda c: errno.errorcode[c])
def test_fault_at_each_step_of_the_end_of_fit_save(tmp_path, monkeypatch, save_calls, code):
    """Each call of the save fails in turn: the error names the cause, the previous
    checkpoint stays intact and LATEST, a new Trainer resumes from it exactly."""
    faulted = 0
    for i, kind in enumerate(save_calls):
        if i == 0:  # parent.mkdir(exist_ok=True) on an existing folder: pathlib ignores it
            continue
        run = tmp_path / f"run{i}"
        t = _fresh(run)
        t.fit(X, Y, epochs=1)
        before = RunDir(run).latest()
        saved_tensors, _ = read_checkpoint(before)
        with Faults().installed(monkeypatch) as faults:
            faults.fail_at, faults.code = i, code
            with pytest.raises(SaveFailedError) as err:
                t.fit(X, Y, epochs=1)
        # failed at call i, undid itself, and nothing else was written
        assert faults.failed == 1 and faults.calls == save_calls[: i + 1] + _undo(save_calls, i)
        faulted += 1
        msg = str(err.value)
        assert msg.startswith("previous checkpoint save failed: "), msg
        assert f"[Errno {code}] {os.strerror(code)}" in msg, (i, kind, msg)
        assert "Nothing was changed; the previous checkpoint is intact." in msg
        assert isinstance(err.value.__cause__, ckpt.CheckpointWriteError)
        assert err.value.__cause__.errno == code
        rd = RunDir(run)
        assert rd.latest() == before, (i, kind)
        assert [p for p, why in verify_run_dir(run) if why] == []
        assert [p.name for p in rd.checkpoints()] == [before.name], (i, kind)
        t.close()
        with make_trainer(run_dir=run, keep_last=100) as again:  # resumes from `before`
            assert again.global_step == 6
            now = again.state_dict()["tensors"]
            for k, a in saved_tensors.items():
                assert torch.equal(torch.from_numpy(now[k]), torch.from_numpy(a)), k
        # the disk is fine again: the same run goes on and saves
        with make_trainer(run_dir=run, keep_last=100) as again:
            again.fit(X, Y, epochs=1)
            assert RunDir(run).latest() != before
    assert faulted == len(save_calls) - 1 == 37
    FAULTED[f"end of fit, each call, {errno.errorcode[code]}"] = faulted


def test_failing_fsync_of_the_new_latest_rolls_back(tmp_path, monkeypatch, save_calls):
    """The very last fsync (of the directory after LATEST was replaced) fails: the new
    LATEST may not be durable, so it is rolled back and the new folder removed."""
    last = max(i for i, k in enumerate(save_calls) if k == "fsync")
    run = tmp_path / "run"
    t = _fresh(run)
    t.fit(X, Y, epochs=1)
    before = RunDir(run).latest()
    with Faults().installed(monkeypatch) as faults:
        faults.fail_at, faults.code = last, errno.EIO
        with pytest.raises(SaveFailedError, match=r"\[Errno 5\] Input/output error"):
            t.fit(X, Y, epochs=1)
    assert faults.failed == 1 and last == len(save_calls) - 1
    assert faults.calls == save_calls + _undo(save_calls, last)
    FAULTED["the fsync after LATEST"] = faults.failed
    assert RunDir(run).latest() == before
    assert [p.name for p in RunDir(run).checkpoints()] == [before.name]
    t.close()


def _checkpoint_steps(run: Path) -> list[tuple[int, int]]:
    """(seq, step) of every checkpoint folder, in save order."""
    out = []
    for p in RunDir(run).checkpoints():
        _, seq, _, _, step = p.name.split("-")
        out.append((int(seq), int(step)))
    return out


def _reference(epochs: int) -> warmfit.Trainer:
    """The same training, one epoch per call, with no run dir: no save at all."""
    ref = make_trainer()
    for _ in range(epochs):
        ref.fit(X, Y, epochs=1)
    return ref


def test_background_save_failure_surfaces_at_the_next_save(tmp_path, monkeypatch):
    """A periodic save runs in the background: its failure is raised by fit at the next
    checkpoint (here the end of the call, 3 steps later), naming the cause; the in-memory
    state is intact and training goes on once the fault is gone."""
    run = tmp_path / "run"
    t = _fresh(run, checkpoint_every=3)
    t.fit(X, Y, epochs=1)  # step 3 + the end of fit (step 6's periodic save is skipped)
    before = RunDir(run).latest()
    with Faults().installed(monkeypatch) as faults:
        faults.fail_at, faults.code = 1, errno.ENOSPC  # the step-9 save's .tmp- mkdir
        with pytest.raises(SaveFailedError) as err:
            t.fit(X, Y, epochs=1)
    assert (faults.failed, faults.calls) == (1, ["mkdir", "mkdir"])  # nothing saved after
    FAULTED["background, raised at the end of fit"] = faults.failed
    assert str(err.value) == (
        f"previous checkpoint save failed: {run / 'checkpoints'}/"
        "ckpt-00000003-run000-step-000000000009: not written: [Errno 28] No space left on "
        "device. Nothing was changed; the previous checkpoint is intact."
    )
    # Raised at the end of the call (step 12 closes epoch 2, the call's last: its
    # periodic save is skipped, the closing save comes first to wait for step 9's).
    assert (t.epoch, t.global_step) == (2, 12)
    assert RunDir(run).latest() == before
    assert _checkpoint_steps(run) == [(1, 3), (2, 6)]
    assert [p for p, why in verify_run_dir(run) if why] == []
    assert_same_state(t, _reference(2))
    t.fit(X, Y, epochs=1)  # the fault is gone: training goes on and saves
    assert (t.epoch, t.global_step) == (3, 18)
    assert _checkpoint_steps(run) == [(1, 3), (2, 6), (3, 15), (4, 18)]
    assert_same_state(t, _reference(3))
    t.close()


@pytest.mark.parametrize("code", CODES, ids=lambda c: errno.errorcode[c])
def test_fault_at_each_step_of_a_background_periodic_save(tmp_path, monkeypatch, save_calls, code):
    """A ``checkpoint_every`` save inside an epoch (step 8 of 6..12: not the call's last
    step, so it is really made, in the writer's thread, while training goes on) fails at
    each of its file-system calls in turn. Each time, as RELIABILITY.md "Faults in the
    writer" and docs/design.md "Checkpoints" say: fit raises SaveFailedError at the next
    save (here the end of the call) naming the errno, with the CheckpointWriteError
    chained; the closing save is not attempted; training had gone on, so the trainer
    holds the state an uninterrupted run has at step 12; LATEST still names the previous
    checkpoint, which verifies and holds the same bytes; no new folder and no temporary
    one is left; and fit goes on and saves once the fault is gone."""
    faulted = 0
    for i, kind in enumerate(save_calls):
        if i == 0:  # parent.mkdir(exist_ok=True) on an existing folder: pathlib ignores it
            continue
        run = tmp_path / f"run{i}"
        t = _fresh(run, checkpoint_every=4)
        t.fit(X, Y, epochs=1)  # saves at step 4 (periodic) and 6 (the end of fit)
        before = RunDir(run).latest()
        saved_tensors, _ = read_checkpoint(before)
        with Faults().installed(monkeypatch) as faults:
            faults.fail_at, faults.code = i, code
            with pytest.raises(SaveFailedError) as err:
                t.fit(X, Y, epochs=1)  # periodic save at step 8, raised at step 12
        # The failing call was the step-8 save's, in the writer's thread; no save after it.
        assert faults.failed == 1
        assert faults.calls == save_calls[: i + 1] + _undo(save_calls, i), (i, kind)
        faulted += 1
        assert str(err.value) == (
            f"previous checkpoint save failed: {run / 'checkpoints'}/"
            f"ckpt-00000003-run000-step-000000000008: not written: [Errno {code}] "
            f"{os.strerror(code)}. Nothing was changed; the previous checkpoint is intact."
        ), (i, kind)
        assert isinstance(err.value.__cause__, ckpt.CheckpointWriteError)
        assert err.value.__cause__.errno == code
        assert (t.epoch, t.global_step) == (2, 12), (i, kind)
        assert RunDir(run).latest() == before, (i, kind)
        assert _checkpoint_steps(run) == [(1, 4), (2, 6)], (i, kind)
        assert [p for p, why in verify_run_dir(run) if why] == []
        assert [e.name for e in (run / "checkpoints").iterdir() if e.name.startswith(".")] == []
        tensors, _ = read_checkpoint(before)  # the previous checkpoint: the same bytes
        assert sorted(tensors) == sorted(saved_tensors)
        for k, a in saved_tensors.items():
            assert tensors[k].dtype == a.dtype and tensors[k].tobytes() == a.tobytes(), k
        if i == 1:  # the whole state (once: the same training ran before each fault)
            assert_same_state(t, _reference(2))
        t.fit(X, Y, epochs=1)  # the fault is gone: saves at step 16 and 18
        assert _checkpoint_steps(run) == [(1, 4), (2, 6), (3, 16), (4, 18)], (i, kind)
        t.close()
    assert faulted == len(save_calls) - 1 == 37
    FAULTED[f"background periodic, each call, {errno.errorcode[code]}"] = faulted


def test_background_failure_surfaces_at_the_next_periodic_save(tmp_path, monkeypatch):
    """The next save is a periodic one inside the same epoch: fit raises there (step
    10), holding that step's state; the same call run again ends where the
    uninterrupted one would (E8)."""
    run = tmp_path / "run"
    t = _fresh(run, checkpoint_every=2)
    t.fit(X, Y, epochs=1)  # steps 2, 4 (periodic), 6 (the end of fit)
    before = RunDir(run).latest()
    with Faults().installed(monkeypatch) as faults:
        faults.fail_at, faults.code = 1, errno.EIO  # the step-8 save's .tmp- mkdir
        with pytest.raises(SaveFailedError) as err:
            t.fit(X, Y, epochs=1)
    assert (faults.failed, faults.calls) == (1, ["mkdir", "mkdir"])
    FAULTED["background, raised at the next periodic save"] = faults.failed
    assert str(err.value).startswith(
        f"previous checkpoint save failed: {run / 'checkpoints'}/"
        "ckpt-00000004-run000-step-000000000008: not written: [Errno 5] Input/output error."
    )
    assert (t.epoch, t.global_step, t.counters.offset) == (1, 10, 64)  # stopped at step 10
    assert RunDir(run).latest() == before
    assert _checkpoint_steps(run) == [(1, 2), (2, 4), (3, 6)]
    t.fit(X, Y, epochs=1)  # the same call again: it finishes epoch 2, no more
    assert (t.epoch, t.global_step) == (2, 12)
    assert_same_state(t, _reference(2))
    # the failure took step 10's save's place; step 12's is the call's closing save
    assert _checkpoint_steps(run) == [(1, 2), (2, 4), (3, 6), (4, 12)]
    t.close()


def test_a_periodic_save_at_a_calls_last_epoch_is_skipped(tmp_path):
    """checkpoint_every=3 over two epochs of 6 steps: steps 3 and 9 inside the epochs,
    6 after epoch 1's validation; step 12 would fall on the call's last epoch's end,
    where the closing save follows at the same step, so it is skipped: 4 saves, not 5
    (docs/design.md "Checkpoints")."""
    run = tmp_path / "run"
    with _fresh(run, checkpoint_every=3) as t:
        t.fit(X, Y, epochs=2)
    assert _checkpoint_steps(run) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    index = json.loads((run / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert sorted(index) == [p.name for p in RunDir(run).checkpoints()]
    with _fresh(run, checkpoint_every=6) as t:  # only epoch ends: 18 is the call's last
        t.fit(X, Y, epochs=2)
    assert _checkpoint_steps(run)[4:] == [(5, 18), (6, 24)]


@pytest.mark.parametrize("every, steps", [(4, 4), (3, 9)])
def test_a_periodic_save_at_the_last_step_of_a_steps_call_is_skipped(tmp_path, every, steps):
    """A call that ends by ``steps=`` inside an epoch, on a checkpoint_every step, wrote
    that step twice (the periodic save, then the closing one), which halved what
    keep_last keeps (found by this battery; fixed: the periodic save is skipped)."""
    run = tmp_path / "run"
    with _fresh(run, checkpoint_every=every) as t:
        t.fit(X, Y, steps=steps)
    found = [step for _, step in _checkpoint_steps(run)]
    assert found == list(range(every, steps + 1, every)), found


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES])
def test_explicit_save_names_the_cause(tmp_path, monkeypatch, code):
    t = make_trainer()
    t.fit(X, Y, epochs=1)
    with Faults(thread=None).installed(monkeypatch) as faults:  # save() runs in this thread
        faults.fail_at, faults.code = 2, code
        with pytest.raises(ckpt.CheckpointWriteError) as err:
            t.save(tmp_path / "ck")
    assert (faults.failed, faults.calls) == (1, ["mkdir", "mkdir", "open"])
    FAULTED[f"trainer.save, {errno.errorcode[code]}"] = faults.failed
    assert str(err.value).startswith(f"{tmp_path / 'ck'}: not written: [Errno {code}] ")
    assert os.strerror(code) in str(err.value)
    assert not (tmp_path / "ck").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no .tmp-* left behind


def test_a_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch, save_calls):
    run = tmp_path / "run"
    t = _fresh(run)
    t.fit(X, Y, epochs=1)
    before = RunDir(run).latest()
    faulted = 0
    for i in range(1, len(save_calls)):
        with Faults().installed(monkeypatch) as faults:
            faults.fail_at = i
            with pytest.raises(SaveFailedError):
                t.fit(X, Y, epochs=1)
        faulted += faults.failed
    assert faulted == len(save_calls) - 1 == 37
    FAULTED["one trainer, each call in turn"] = faulted
    leftovers = [e.name for e in (run / "checkpoints").iterdir() if e.name.startswith(".")]
    assert leftovers == []
    assert [p.name for p in RunDir(run).checkpoints()] == [before.name]
    assert np.isfinite(t.history[-1]["loss"])
    t.close()


class _FailAtEpoch(warmfit.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: warmfit.Trainer, logs: dict) -> bool:
        if logs["epoch"] == self.epoch:
            raise RuntimeError("the user's callback failed")
        return False


def test_leaving_a_with_block_on_an_error_keeps_that_error_and_releases_the_lock(
    tmp_path, monkeypatch
):
    """A background save fails, then the caller's code raises: the caller sees its own
    error (the failed save is a warning beside it), and the run dir is unlocked."""
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failing = _FailAtEpoch(2)
        with (
            pytest.raises(RuntimeError, match="^the user's callback failed$"),
            _fresh(run, checkpoint_every=3, callbacks=[failing]) as t,
        ):
            t.fit(X, Y, epochs=1)
            with Faults().installed(monkeypatch) as faults:
                faults.fail_at, faults.code = 1, errno.ENOSPC  # the step-9 save
                t.fit(X, Y, epochs=1)
    assert faults.failed == 1
    FAULTED["background, then the caller's own error"] = faults.failed
    [message] = [str(w.message) for w in caught]
    assert message.startswith("previous checkpoint save failed: ")
    assert message.endswith("(while leaving on RuntimeError)")
    with RunDir(run) as again:  # unlocked
        assert again.locked
