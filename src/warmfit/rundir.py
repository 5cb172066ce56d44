"""The run directory: checkpoint folders, the ``LATEST`` pointer, retention, the lock.

This module owns :class:`RunDir`: where a run's checkpoints live and which is the
newest (``LATEST``), retention (per run: the last k and the best, ranked by the metric
in ``index.json``), the lock against a second writer (released also when the
``RunDir`` is dropped), falling back to the newest intact checkpoint, and
:func:`verify_run_dir`. It does not own the checkpoint folder itself (its format,
atomic write and integrity checks: :mod:`warmfit.checkpoint`).

Layout of a run directory::

    <root>/lock                          fcntl.flock'd; JSON {pid, host, started}
    <root>/checkpoints/ckpt-00000007-run000-step-000000001000/{tensors.safetensors, state.json}
    <root>/checkpoints/LATEST            text: the name of the newest checkpoint folder
    <root>/checkpoints/index.json        step and metric of each checkpoint (for retention)
    <root>/checkpoints/.tmp-* .trash-*   in-progress writes and deletions, never checkpoints

The commit point of :meth:`RunDir.save` is the replacement of ``LATEST``: a process
killed at any instant leaves either the previous state or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import math
import numbers
import os
import re
import shutil
import socket
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from warmfit.checkpoint import (
    SCHEMA_VERSION,
    CheckpointWriteError,
    UnsupportedSchemaError,
    fsync_dir,
    read_checkpoint,
    read_state,
    remove_checkpoint_dir,
    replace_durably,
    verify_checkpoint,
    write_checkpoint,
)
from warmfit.errors import CheckpointError, RunDirLockedError, WarmfitError, invalid_param

__all__ = ["LATEST", "RunDir", "run_dir_of", "verify_checkpoints", "verify_run_dir"]

LATEST = "LATEST"
INDEX_FILE = "index.json"
LOCK_FILE = "lock"
CHECKPOINTS_DIR = "checkpoints"
_NAME_RE = re.compile(r"ckpt-(\d{8,})-run(\d{3,})-step-(\d{12,})")


def _name_number(path: Path, group: int) -> int:
    m = _NAME_RE.fullmatch(path.name)
    assert m is not None  # only called on names checkpoints() accepted
    return int(m.group(group))


def _sort_key(path: Path) -> int:
    """Save order: the sequence number every checkpoint name starts with."""
    return _name_number(path, 1)


def _run_of(path: Path) -> int:
    """The run (``counters.run``: 0, then +1 at each ``restart``) a checkpoint is of."""
    return _name_number(path, 2)


#: The descriptors of the locks this process holds (or is taking), each with the
#: ``weakref.finalize`` that releases it (None while :meth:`RunDir.lock` takes it).
_LOCK_FDS: dict[int, weakref.finalize | None] = {}

#: How long :meth:`RunDir.lock` waits when the lock file names a process of this host
#: that is gone: processes it left behind (children forked without this module's fork
#: hook, e.g. by a C library, or by an older warmfit) may still hold the lock for a few
#: seconds. PyTorch's DataLoader workers notice a dead parent within 5 s.
ORPHAN_WAIT_S = 10.0


def _release_lock(fd: int, owner_pid: int) -> None:
    """Drop a run directory's lock: clear the holder's record, unlock, close the
    descriptor. Run by :meth:`RunDir.unlock`, or by the finalizer when the ``RunDir`` is
    garbage-collected or the interpreter exits. The owner unlocks explicitly: a child
    that shares the open file (started without the fork hook below) would otherwise
    keep the lock until it exits. In a forked child it only closes the descriptor."""
    try:
        if os.getpid() == owner_pid:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        _LOCK_FDS.pop(fd, None)
        os.close(fd)


def _forget_locks_in_child() -> None:
    """``os.register_at_fork(after_in_child=...)``: a forked child (a DataLoader worker,
    a multiprocessing pool) must not hold its parent's lock. An flock belongs to the
    open file, which the child's copy of the descriptor shares: left open, it would keep
    the run directory locked after the parent is killed, until the orphan exits. Closing
    the copy does not unlock the parent's; the child's copies of the ``RunDir`` objects
    are marked unlocked, and their finalizers detached (they would close a descriptor
    number the child may have reused)."""
    for fd, release in list(_LOCK_FDS.items()):
        found = release.detach() if release is not None else None
        if found is not None:
            owner = found[0]
            owner._lock_fd, owner._lock_depth, owner._lock_release = None, 0, None
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _is_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists (as seen from this process's PID namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, as another user's process
        return False
    return False


def _processes_with_open(path: Path) -> list[int]:
    """The processes other than this one that have ``path`` open (Linux ``/proc``;
    those of other users are not visible). Best effort, for an error message."""
    try:
        target = os.stat(path)
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(pid)
                break
    return sorted(found)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunDir:
    """A run directory: checkpoint folders, the ``LATEST`` pointer, retention, a lock.

    Checkpoints live in ``<root>/checkpoints/ckpt-<seq>-run<run>-step-<global_step>``,
    where ``seq`` counts saves, so name order is save order — also across a restart
    (steps start again at 0 in a new run) and a rewind (training goes on from an
    earlier step). ``LATEST`` (in the same folder) holds the name of the last
    checkpoint saved and is replaced atomically; it is the commit point of
    :meth:`save`. "Newest" means "saved last" for retention and for the fallback of
    :meth:`latest`.

    Retention after each save applies within each run (the ``run<run>`` part of the
    name): every run keeps its ``keep_last`` newest checkpoints (``None``: all), plus
    its one with the best metric when ``keep_best`` (lowest for ``monitor_mode="min"``,
    highest for ``"max"``; the earliest wins a tie). So a ``restart`` never deletes the
    previous run: a finished run keeps its last ``keep_last`` and its best for good.
    The one ``LATEST`` names is never deleted. Metrics are recorded in ``index.json``.
    "Best" is per run too (:meth:`best`): metrics of different runs are not compared.

    The lock (:meth:`lock`, or ``with RunDir(...)``) is an ``fcntl.flock`` on
    ``<root>/lock``: the kernel drops it when its process dies, so a crashed or killed
    run never leaves a stale lock. Within a process it is released by :meth:`unlock`,
    or, failing that, when the ``RunDir`` is garbage-collected or the interpreter
    exits (a ``weakref.finalize``), so a ``RunDir`` (or a Trainer holding one) that is
    dropped without being closed does not keep it. A copy or a pickle of a ``RunDir``
    does not hold the lock, nor does a forked child's copy (the child closes its
    descriptor at the fork). :meth:`save` and :meth:`clean_temporary` require it;
    reading does not.

    ``LATEST`` or a checkpoint folder that leads outside ``<root>/checkpoints`` (``..``,
    an absolute path, a symbolic link) is refused with
    :class:`~warmfit.errors.CheckpointError`.

    Constructing a ``RunDir`` touches nothing on disk.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_best: bool = True,
        monitor_mode: str = "min",
    ) -> None:
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise invalid_param("keep_last", "RunDir", "an int >= 1 or None", keep_last)
        if monitor_mode not in ("min", "max"):
            raise invalid_param("monitor_mode", "RunDir", ("min", "max"), monitor_mode)
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor_mode = monitor_mode
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._lock_release: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The lock belongs to this object: a copy (or a pickle) starts unlocked.
        return {**self.__dict__, "_lock_fd": None, "_lock_depth": 0, "_lock_release": None}

    def __repr__(self) -> str:
        return (
            f"RunDir({str(self.root)!r}, keep_last={self.keep_last}, "
            f"keep_best={self.keep_best}, monitor_mode={self.monitor_mode!r})"
        )

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def latest_file(self) -> Path:
        return self.checkpoints_dir / LATEST

    @property
    def index_file(self) -> Path:
        return self.checkpoints_dir / INDEX_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock_fd is not None

    # -- lock ---------------------------------------------------------------------

    def lock(self) -> None:
        """Take the exclusive lock on the run directory (re-entrant for this object).

        Raises :class:`~warmfit.errors.RunDirLockedError` naming the holder's pid and
        host if another live process holds it. If the holder is this process, an
        unreachable ``RunDir`` (a dropped Trainer in a reference cycle) not yet
        collected may hold it: one ``gc.collect()`` releases such a lock, then the lock
        is tried again; if another ``RunDir`` of this process still holds it, the error
        says so and how to close it. If the holder is a process of this host that is
        gone, processes it left behind still share its lock: wait up to
        :data:`ORPHAN_WAIT_S` for them to exit, then raise naming them.

        Children forked while the lock is held (DataLoader workers, multiprocessing
        pools) close their copy of its descriptor at once (``os.register_at_fork``), so
        they never keep the lock after this process dies.
        """
        if self._lock_fd is not None:
            self._lock_depth += 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _LOCK_FDS[fd] = None  # a child forked from now on closes its copy
        try:
            if not _try_flock(fd):
                pid, host = self._lock_holder(fd)
                here = host == socket.gethostname()
                if here and pid == os.getpid():
                    gc.collect()
                    if not _try_flock(fd):
                        raise RunDirLockedError(self.root, pid, host, this_process=True)
                elif here and _is_gone(pid):
                    self._wait_for_orphans(fd, pid, host)
                else:
                    raise RunDirLockedError(self.root, pid, host)
        except BaseException:
            _LOCK_FDS.pop(fd, None)
            os.close(fd)
            raise
        try:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            # Not fsync'd: the flock is the lock, and this text only names the holder
            # for the error message of a second taker (a crash drops both anyway).
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            _LOCK_FDS.pop(fd, None)
            os.close(fd)  # closing drops the flock
            raise
        self._lock_fd = fd
        self._lock_depth = 1
        self._lock_release = weakref.finalize(self, _release_lock, fd, os.getpid())
        _LOCK_FDS[fd] = self._lock_release

    def _wait_for_orphans(self, fd: int, pid: int, host: str) -> None:
        """The lock is held, and the process its file names (``pid``, this host) is
        gone: processes it left behind still share its locked open file. Wait up to
        :data:`ORPHAN_WAIT_S` for them to exit; raise if they do not, naming them."""
        waited, start = 0.0, time.monotonic()
        while waited < ORPHAN_WAIT_S:
            time.sleep(min(0.05, ORPHAN_WAIT_S - waited))
            if _try_flock(fd):
                return
            holder, holder_host = self._lock_holder(fd)
            if holder != pid or holder_host != host:  # a new process took it meanwhile
                if holder_host == socket.gethostname() and _is_gone(holder):
                    pid, host = holder, holder_host  # which died too: wait on
                else:
                    raise RunDirLockedError(self.root, holder, holder_host)
            waited = time.monotonic() - start
        orphans = _processes_with_open(self.lock_file)
        raise RunDirLockedError(self.root, pid, host, orphans=(orphans, ORPHAN_WAIT_S))

    @staticmethod
    def _lock_holder(fd: int) -> tuple[int, str]:
        # The holder writes its pid right after taking the lock: retry briefly.
        for _ in range(20):
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode())
                return int(info["pid"]), str(info.get("host", ""))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                time.sleep(0.01)
        return 0, ""

    def unlock(self) -> None:
        """Release one level of the lock; the last level releases it. No-op when not
        held. The lock file stays (deleting it would race with a new taker)."""
        if self._lock_fd is None:
            return
        self._lock_depth -= 1
        if self._lock_depth > 0:
            return
        release, self._lock_release, self._lock_fd = self._lock_release, None, None
        if release is not None:
            release()

    def __enter__(self) -> RunDir:
        self.lock()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()

    def _require_lock(self, what: str) -> None:
        if self._lock_fd is None:
            raise WarmfitError(
                f"RunDir.{what} needs the run directory's lock: call lock() first or use "
                f"'with RunDir({str(self.root)!r}) as run_dir:'."
            )

    # -- listing --------------------------------------------------------------------

    def _safe_checkpoints_dir(self) -> Path:
        cdir = self.checkpoints_dir
        if cdir.is_symlink():
            raise CheckpointError(
                cdir, "is a symbolic link; refusing to follow it out of the run directory"
            )
        return cdir

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest (lowest step) first. Temporary and
        half-deleted folders (``.tmp-*``, ``.trash-*``), files and symbolic links are
        not checkpoints."""
        cdir = self._safe_checkpoints_dir()
        if not cdir.is_dir():
            return []
        found = [
            Path(entry.path)
            for entry in os.scandir(cdir)
            if _NAME_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
        return sorted(found, key=_sort_key)

    def _inside(self, name: str, source: Path) -> Path:
        """``checkpoints_dir / name``, refusing anything that leads outside it."""
        cdir = self._safe_checkpoints_dir()
        if (
            not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or "\0" in name
            or os.path.isabs(name)
        ):
            raise CheckpointError(
                source,
                f"points outside the run directory: {name!r}; it must name a "
                f"checkpoint folder inside {cdir}",
            )
        target = cdir / name
        if target.is_symlink() or not target.resolve().is_relative_to(cdir.resolve()):
            raise CheckpointError(
                source,
                f"points outside the run directory: {name!r} is a symbolic link "
                f"(to {os.path.realpath(target)})",
            )
        return target

    def _read_latest_name(self) -> str | None:
        file = self.latest_file
        if file.is_symlink():
            raise CheckpointError(file, "is a symbolic link; refusing to follow it")
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(file, f"unreadable: {exc}") from exc
        # Bytes that are no text (a damaged file) name no checkpoint: latest() then falls
        # back to the newest checkpoint folder with a warning.
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return "<not UTF-8 text>"
        return "<contains NUL bytes>" if "\0" in text else text

    def latest(self) -> Path | None:
        """The checkpoint ``LATEST`` names; if it names no existing checkpoint folder
        (warns), the newest in :meth:`checkpoints`; None if there is none. Raises
        :class:`~warmfit.errors.CheckpointError` if ``LATEST`` leads outside the run
        directory."""
        name = self._read_latest_name()
        if name:
            target = self._inside(name, self.latest_file)
            if _NAME_RE.fullmatch(name) and target.is_dir():
                return target
        found = self.checkpoints()
        if name is not None and found:
            warnings.warn(
                f"{self.latest_file} names {name!r}, which is not a checkpoint folder; "
                f"using the newest checkpoint, {found[-1].name}",
                stacklevel=2,
            )
        return found[-1] if found else None

    def best(self, *, run: int | None = None) -> Path | None:
        """The checkpoint of run ``run`` with the best recorded metric (see the class
        docstring), or None if no existing checkpoint of that run has one. ``run=None``:
        the run of :meth:`latest` (the current one). Metrics of different runs are not
        compared: each run is its own training from scratch."""
        if run is not None and (
            isinstance(run, bool) or not isinstance(run, numbers.Integral) or run < 0
        ):
            raise invalid_param("run", "RunDir.best", "an int >= 0 or None", run)
        if run is None:
            latest = self.latest()
            if latest is None:
                return None
            run = _run_of(latest)
        found = [p for p in self.checkpoints() if _run_of(p) == run]
        return self._best_of(found, self._read_index())

    def _best_of(self, paths: list[Path], index: dict[str, dict[str, Any]]) -> Path | None:
        sign = 1.0 if self.monitor_mode == "min" else -1.0
        scored = []
        for path in paths:
            metric = index.get(path.name, {}).get("metric")
            if isinstance(metric, (int, float)) and math.isfinite(metric):
                scored.append((sign * metric, _sort_key(path), path))
        return min(scored)[2] if scored else None

    def find(
        self,
        to: str | os.PathLike[str] = "latest",
        *,
        epoch: int | None = None,
        step: int | None = None,
        run: int | None = None,
    ) -> Path:
        """The checkpoint ``to`` names: ``"best"`` (of run ``run``; None: the run of
        :meth:`latest`), ``"latest"``, the name of a checkpoint folder of this run
        directory (``ckpt-…``), or a path; or run ``run``'s checkpoint at the end of
        global epoch ``epoch`` or at global step ``step``. Only reads. Raises
        ``ValueError`` saying which checkpoints there are when none matches (a path is
        returned as it is: reading it names what is wrong)."""
        if epoch is not None or step is not None:
            if run is None:
                latest = self.latest()
                run = 0 if latest is None else _run_of(latest)
            for path in reversed(self.checkpoints()):
                c = read_state(path)["counters"]
                if c["run"] != run:
                    continue
                if (epoch is not None and c["epoch"] == epoch and c["offset"] == 0) or (
                    step is not None and c["global_step"] == step
                ):
                    return path
            kept = [p.name for p in self.checkpoints()]
            raise ValueError(
                f"No checkpoint of run {run} at "
                f"{'epoch ' + str(epoch) if epoch is not None else 'step ' + str(step)}. "
                f"Checkpoints kept: {kept}. Raise keep_last, or rewind to one of them."
            )
        found: Path | None
        if to == "best":
            found = self.best(run=run)
        elif to == "latest":
            found = self.latest()
        elif isinstance(to, str) and _NAME_RE.fullmatch(to):  # a name: a folder of ours
            found = self._inside(to, self.checkpoints_dir)
            if not found.is_dir():
                kept = [p.name for p in self.checkpoints()]
                raise ValueError(f"{self.root} has no checkpoint {to!r}. Checkpoints kept: {kept}.")
        else:
            found = Path(to)
        if found is None:
            raise ValueError(f"There is no {to!r} checkpoint in {self.root} yet.")
        return found

    def metric(self, path: str | os.PathLike[str]) -> float | None:
        """The metric ``index.json`` records for the checkpoint folder ``path`` of this
        run directory (what "best" ranks it by), or None."""
        value = self._read_index().get(Path(path).name, {}).get("metric")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) else None

    # -- loading --------------------------------------------------------------------

    def load_latest(self) -> tuple[Path, dict[str, np.ndarray], dict] | None:
        """Load the newest intact checkpoint: :meth:`latest`, then older ones.

        Each damaged one is skipped with a warning (``skipping damaged checkpoint
        <path>: <file>: <problem>``). Returns ``(path, tensors, state)``; None if there
        are no checkpoints. Raises :class:`~warmfit.errors.CheckpointError` listing
        every problem if all are damaged, and :class:`UnsupportedSchemaError` at once
        for a checkpoint written by a newer warmfit (falling back past it would
        silently lose progress; upgrade instead).
        """
        first = self.latest()
        if first is None:
            return None
        key = _sort_key(first)
        older = [p for p in reversed(self.checkpoints()) if _sort_key(p) < key]
        problems = []
        for path in [first, *older]:
            try:
                tensors, state = read_checkpoint(path)
            except UnsupportedSchemaError as exc:
                if "newer" in exc.problem:
                    raise
                problem = f"{Path(exc.path).name}: {exc.problem}"
            except CheckpointError as exc:
                problem = f"{Path(exc.path).name}: {exc.problem}"
            else:
                return path, tensors, state
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
            problems.append(f"{path.name} ({problem})")
        raise CheckpointError(self.checkpoints_dir, "no intact checkpoint: " + "; ".join(problems))

    # -- saving ---------------------------------------------------------------------

    def save(
        self,
        tensors: Mapping[str, np.ndarray],
        state: dict,
        *,
        step: int,
        metric: float | None = None,
        run: int = 0,
    ) -> Path:
        """Write a checkpoint for global step ``step``, point ``LATEST`` at it, then
        apply retention; return its path. Requires the lock.

        ``metric`` (lower is better for ``monitor_mode="min"``) ranks checkpoints for
        ``keep_best``; None or non-finite means unranked.

        If writing the checkpoint, the index or ``LATEST`` fails,
        :class:`CheckpointWriteError` is raised and nothing changed: ``LATEST`` and the
        previous checkpoints are as before and the new folder is removed. A failure
        while deleting old checkpoints only warns: the save itself succeeded.
        """
        self._require_lock("save")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise invalid_param("step", "RunDir.save", "an int >= 0", step)
        if metric is not None and (
            isinstance(metric, bool) or not isinstance(metric, numbers.Real)
        ):
            raise invalid_param("metric", "RunDir.save", "a float or None", metric)
        step = int(step)
        metric = None if metric is None or not math.isfinite(metric) else float(metric)
        cdir = self._safe_checkpoints_dir()
        found = self.checkpoints()
        seq = _sort_key(found[-1]) + 1 if found else 1
        name = f"ckpt-{seq:08d}-run{int(run):03d}-step-{step:012d}"
        while os.path.lexists(cdir / name):  # a leftover of a failed deletion
            seq += 1
            name = f"ckpt-{seq:08d}-run{int(run):03d}-step-{step:012d}"
        path = write_checkpoint(cdir / name, tensors, state)

        previous = self._read_latest_raw()
        index = self._read_index()
        index[name] = {
            "step": step,
            "metric": metric,
        }
        try:
            self._write_index(index)
            replace_durably(self.latest_file, (name + "\n").encode())
        except BaseException as exc:
            self._roll_back_latest(previous)
            with contextlib.suppress(OSError):
                remove_checkpoint_dir(path)
            if isinstance(exc, OSError):
                raise CheckpointWriteError.from_os_error(path, exc) from exc
            raise
        self._apply_retention(path)
        return path

    def _read_latest_raw(self) -> bytes | None:
        try:
            return self.latest_file.read_bytes()
        except FileNotFoundError:
            return None

    def _roll_back_latest(self, previous: bytes | None) -> None:
        try:
            if self._read_latest_raw() == previous:
                return
            if previous is None:
                os.unlink(self.latest_file)
                fsync_dir(self.checkpoints_dir)
            else:
                replace_durably(self.latest_file, previous)
        except OSError as exc:
            warnings.warn(f"could not restore {self.latest_file}: {exc}", stacklevel=3)

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.index_file.read_text(encoding="utf-8"))
            entries = doc["checkpoints"]
            if isinstance(entries, dict):
                return {k: v for k, v in entries.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        warnings.warn(
            f"{self.index_file} is damaged; checkpoint metrics are forgotten", stacklevel=3
        )
        return {}

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        doc = {"schema_version": SCHEMA_VERSION, "checkpoints": index}
        replace_durably(self.index_file, (json.dumps(doc, indent=1) + "\n").encode())

    def _apply_retention(self, latest: Path) -> None:
        """Per run: the ``keep_last`` newest and the best; and the one just saved."""
        found = self.checkpoints()
        index = self._read_index()
        runs: dict[int, list[Path]] = {}
        for path in found:
            runs.setdefault(_run_of(path), []).append(path)
        keep = {latest}
        for paths in runs.values():
            keep.update(paths if self.keep_last is None else paths[-self.keep_last :])
            best = self._best_of(paths, index) if self.keep_best else None
            if best is not None:
                keep.add(best)
        try:
            for path in found:
                if path not in keep:
                    remove_checkpoint_dir(path)
            names = {p.name for p in found if p in keep}
            if set(index) - names:
                self._write_index({k: v for k, v in index.items() if k in names})
        except OSError as exc:
            warnings.warn(
                f"checkpoint {latest} was saved, but deleting old checkpoints failed: {exc}",
                stacklevel=3,
            )

    def clean_temporary(self) -> None:
        """Remove leftover ``.tmp-*`` and ``.trash-*`` entries of interrupted saves and
        deletions. Requires the lock (so no save of ours is in progress)."""
        self._require_lock("clean_temporary")
        for folder in (self.root, self.checkpoints_dir):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for entry in os.scandir(folder):
                if entry.name.startswith((".tmp-", ".trash-")):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)


def run_dir_of(path: str | os.PathLike[str]) -> Path | None:
    """The run directory whose checkpoint folder ``path`` is (``<root>/checkpoints/ckpt-…``),
    or None for a checkpoint folder elsewhere (written by ``Trainer.save``)."""
    path = Path(path)
    if _NAME_RE.fullmatch(path.name) and path.parent.name == CHECKPOINTS_DIR:
        return path.parent.parent
    return None


def file_in_the_way(path: Path) -> Path | None:
    """The file (or dangling link) that ``path`` is, or lies under, so that no directory
    can be made there; None where ``path`` is a directory or could become one."""
    for where in (path, *path.parents):
        if where.is_dir():
            return None
        if where.exists() or where.is_symlink():
            return where
    return None


def verify_run_dir(root: str | os.PathLike[str]) -> list[tuple[Path, str | None]]:
    """Every checkpoint of the run directory at ``root``, oldest first, with its
    problem (``"<file>: <problem>"``) or None if intact. Reads every byte; loads no
    arrays; needs no lock, so it may run while a Trainer trains there: a checkpoint
    that retention deletes while this runs is left out (see :func:`verify_checkpoints`)."""
    return verify_checkpoints(RunDir(root).checkpoints())


def verify_checkpoints(paths: Iterable[Path]) -> list[tuple[Path, str | None]]:
    """Verify each checkpoint folder of a listing taken earlier (``RunDir.checkpoints()``)
    and return ``(path, problem or None)`` for each, in the listing's order. A folder
    that is gone when its check fails was deleted after the listing (by retention, a
    rename to ``.trash-*`` then a removal): it is left out, not reported damaged."""
    report: list[tuple[Path, str | None]] = []
    for path in paths:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            if not os.path.lexists(path):
                continue  # removed while we read it: not a checkpoint any more
            report.append((path, f"{Path(exc.path).name}: {exc.problem}"))
        else:
            report.append((path, None))
    return report
