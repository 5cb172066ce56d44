"""Faults in the checkpoint writer, through the Trainer (issue 9).

A clean Trainer-level save is recorded once as a sequence of file-system calls
(``mkdir``, ``open`` for writing, ``write``, ``fsync``, ``rename``, ``replace``); then
the save is repeated with ENOSPC, EIO or a failing fsync injected at *each* of those
calls in turn. Every time: the previous checkpoint stays intact, ``LATEST`` still names
it, a new Trainer resumes from it bit for bit, and the error the user sees names the
cause (errno text). Both paths: the save at the end of ``fit`` (raised at the end of
the call) and a periodic background save (raised at the next save).

``test_checkpoint.py`` already covers failing fsyncs and writes at the RunDir level;
this file drives the same code through the Trainer and its background writer.
"""

from __future__ import annotations

import builtins
import errno
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import warmfit
import warmfit.checkpoint as ckpt
from conftest import make_data, make_trainer
from warmfit.background import SaveFailedError
from warmfit.checkpoint import read_checkpoint
from warmfit.rundir import RunDir, verify_run_dir

KINDS = ("mkdir", "open", "write", "fsync", "rename", "replace")


class Faults:
    """Counts file-system calls made by warmfit.checkpoint; raises ``OSError(code)`` at
    call number ``fail_at`` (0-based, over all kinds) when armed."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.code = errno.ENOSPC

    def hit(self, kind: str) -> None:
        i = len(self.calls)
        self.calls.append(kind)
        if self.fail_at == i:
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


def _fresh(run: Path, **kw) -> warmfit.Trainer:
    return make_trainer(run_dir=run, keep_last=100, **kw)  # no retention deletes


def _record_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = tmp_path / "record"
    with _fresh(run) as t:
        t.fit(X, Y, epochs=1)
        with Faults().installed(monkeypatch) as faults:
            t.fit(X, Y, epochs=1)
    return faults.calls


@pytest.fixture(scope="module")
def save_calls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    mp = pytest.MonkeyPatch()
    try:
        return _record_calls(tmp_path_factory.mktemp("rec"), mp)
    finally:
        mp.undo()


def test_a_save_makes_the_expected_calls(save_calls):
    # tensor file + state.json + index.json + LATEST; folder rename, two os.replace
    assert save_calls.count("mkdir") == 2  # parent.mkdir(exist_ok=True), then the .tmp- folder
    assert save_calls.count("open") == 4
    assert save_calls.count("rename") == 1
    assert save_calls.count("replace") == 2
    assert save_calls.count("fsync") >= 6


CODES = (errno.ENOSPC, errno.EIO)


def _cases(n: int) -> list[tuple[int, int]]:
    return [(i, code) for i in range(n) for code in CODES]


@pytest.mark.parametrize("code", CODES, ids=lambda c: errno.errorcode[c])
def test_fault_at_each_step_of_the_end_of_fit_save(tmp_path, monkeypatch, save_calls, code):
    """Each call of the save fails in turn: the error names the cause, the previous
    checkpoint stays intact and LATEST, a new Trainer resumes from it exactly."""
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
    assert RunDir(run).latest() == before
    assert [p.name for p in RunDir(run).checkpoints()] == [before.name]
    t.close()


def test_background_save_failure_surfaces_at_the_next_save(tmp_path, monkeypatch):
    """A periodic save runs in the background: its failure is raised by fit at the next
    checkpoint (here 3 steps later), naming the cause; the in-memory state is intact and
    training goes on once the fault is gone."""
    run = tmp_path / "run"
    t = _fresh(run, checkpoint_every=3)
    t.fit(X, Y, epochs=1)  # steps 3 and 6 + end of fit
    before = RunDir(run).latest()
    with Faults().installed(monkeypatch) as faults:
        faults.fail_at, faults.code = 1, errno.ENOSPC  # the next save's .tmp- mkdir
        with pytest.raises(SaveFailedError) as err:
            t.fit(X, Y, epochs=1)
    assert str(err.value).startswith("previous checkpoint save failed: " + str(run / "checkpoints"))
    assert "[Errno 28] No space left on device" in str(err.value)
    # Raised at the save after epoch 2 (its last step, 12, is a checkpoint_every step, so
    # that save comes after the epoch is logged), about the step-9 one.
    assert (t.epoch, t.global_step) == (2, 12)
    assert RunDir(run).latest() == before
    assert [p for p, why in verify_run_dir(run) if why] == []
    t.fit(X, Y, epochs=1)  # the fault is gone: training goes on and saves
    assert (t.epoch, t.global_step) == (3, 18)
    assert RunDir(run).latest() != before
    t.close()


def test_background_failure_of_the_last_periodic_save_surfaces_at_the_end_of_fit(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    t = _fresh(run, checkpoint_every=6)
    t.fit(X, Y, epochs=1)
    with Faults().installed(monkeypatch) as faults:
        faults.fail_at, faults.code = 3, errno.EIO  # the step-12 periodic save
        with pytest.raises(SaveFailedError, match=r"\[Errno 5\] Input/output error"):
            t.fit(X, Y, epochs=1)
    assert t.epoch == 2 and t.global_step == 12  # the epoch is done; only the save failed
    assert [p for p, why in verify_run_dir(run) if why] == []
    t.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES])
def test_explicit_save_names_the_cause(tmp_path, monkeypatch, code):
    t = make_trainer()
    t.fit(X, Y, epochs=1)
    with Faults().installed(monkeypatch) as faults:
        faults.fail_at, faults.code = 2, code
        with pytest.raises(ckpt.CheckpointWriteError) as err:
            t.save(tmp_path / "ck")
    assert str(err.value).startswith(f"{tmp_path / 'ck'}: not written: [Errno {code}] ")
    assert os.strerror(code) in str(err.value)
    assert not (tmp_path / "ck").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no .tmp-* left behind


def test_a_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch, save_calls):
    run = tmp_path / "run"
    t = _fresh(run)
    t.fit(X, Y, epochs=1)
    for i in range(1, len(save_calls)):
        with Faults().installed(monkeypatch) as faults:
            faults.fail_at = i
            with pytest.raises(SaveFailedError):
                t.fit(X, Y, epochs=1)
    leftovers = [e.name for e in (run / "checkpoints").iterdir() if e.name.startswith(".")]
    assert leftovers == []
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
    [message] = [str(w.message) for w in caught]
    assert message.startswith("previous checkpoint save failed: ")
    assert message.endswith("(while leaving on RuntimeError)")
    with RunDir(run) as again:  # unlocked
        assert again.locked
