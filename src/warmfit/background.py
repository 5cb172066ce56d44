"""Saving in the background: reused snapshot buffers and a writer thread.

A save blocks training only for a copy of the state into buffers that training no
longer touches (:class:`SnapshotBuffers`, or a backend's own ``snapshot_tensors()``)
and a deep copy of its JSON part (:func:`warmfit.checkpoint.snapshot_state`);
:class:`AsyncWriter` writes it while training goes on, one save at a time, and raises
a failed save at the next.
It does not own what a save writes (:mod:`warmfit.rundir`, :mod:`warmfit.checkpoint`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from warmfit.errors import WarmfitError

__all__ = ["AsyncWriter", "SaveFailedError", "SnapshotBuffers"]


class SaveFailedError(WarmfitError):
    """A background save failed; raised at the next :meth:`AsyncWriter.submit` or
    :meth:`AsyncWriter.wait`. The cause is chained (``__cause__``)."""


class SnapshotBuffers:
    """Reused host buffers that make background saving safe.

    :meth:`copy` copies each array into a buffer of the same dtype and shape,
    allocated on first use (and again if the dtype or shape changes), so the training
    thread pays one memcpy per array per save and the writer thread reads data that
    training no longer touches.

    The returned arrays *are* the buffers: the next :meth:`copy` overwrites them. So
    the order for each save is: :meth:`AsyncWriter.wait` (or ``submit``, which waits)
    for the previous save, *then* ``copy``, then ``submit``::

        writer.wait()
        snapshot = buffers.copy(arrays)
        writer.submit(run_dir.save, snapshot, snapshot_state(state), step=step)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def copy(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy ``arrays`` (anything ``np.asarray`` accepts) into the buffers; return
        ``{name: buffer}``. Buffers of names no longer present are freed."""
        out: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            a = np.asarray(value)
            buf = self._buffers.get(name)
            if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
                buf = np.empty(a.shape, dtype=a.dtype)
            np.copyto(buf, a, casting="no")
            out[name] = buf
        self._buffers = dict(out)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for b in self._buffers.values())


class AsyncWriter:
    """Runs saves in the background, one at a time.

    :meth:`submit` first waits for the previous save; if that save failed it raises
    :class:`SaveFailedError` ("previous checkpoint save failed: <cause>", the cause
    chained) *instead of* starting the new one. :meth:`wait` blocks until idle and
    raises a pending failure the same way. Each failure is raised once.

    Each save runs in its own non-daemon thread: a save in flight when the program
    ends is completed, not cut off (a daemon thread would be killed mid-write, losing
    the last checkpoint; a long-lived non-daemon worker would keep a crashed program
    from exiting). Use from one thread (the training thread).
    """

    def __init__(self, name: str = "warmfit-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def busy(self) -> bool:
        """Whether a save is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Wait for the previous save (raising its failure, if any), then run
        ``fn(*args, **kwargs)`` in the background."""
        if self._closed:
            raise WarmfitError("AsyncWriter.submit after close(); create a new AsyncWriter.")
        self.wait()

        def run() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name=self.name, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until no save is running; raise :class:`SaveFailedError` if the last
        one failed."""
        self.drain()
        error, self._error = self._error, None
        if error is not None:
            detail = (
                str(error)
                if isinstance(error, OSError | WarmfitError)
                else (f"{type(error).__name__}: {error}")
            )
            raise SaveFailedError(f"previous checkpoint save failed: {detail}") from error

    def drain(self) -> None:
        """Block until no save is running, without raising: a failure stays pending for
        the next :meth:`wait` or :meth:`submit` (for a caller already raising an error
        of its own)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Wait for the save in flight, then refuse further submits. Raises a pending
        failure like :meth:`wait`."""
        self._closed = True
        self.wait()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
