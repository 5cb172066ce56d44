"""What a fit call holds while it runs: the trainer's random streams, swapped in, and
the stop signals.

- :class:`Streams` — the trainer owns its random streams (Python's, NumPy's and the
  framework's). A fit call swaps them in and the caller's back out at its end, so code
  between calls cannot perturb training and training does not perturb the caller;
  evaluate and predict run with them installed but never store them back; validation
  runs between captures of them (E5).
- :class:`StopSignals` — SIGINT/SIGTERM during a fit call set a flag the loop acts on
  at the next step boundary (a second signal stops at once); under DDP the ranks agree
  on it, so they save together.

Owns: swapping and signals. Does not own: what is saved when a signal comes (the
Trainer), nor the streams' format (:mod:`warmfit.state`, the backend).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .backends.base import Backend
from .state import HostStreams


class Streams:
    """The trainer's random streams: ``{"host": ..., "framework": ...}`` as plain data,
    in :attr:`state` between calls and installed globally during one."""

    def __init__(self, backend: Backend, state: dict[str, Any]) -> None:
        self._backend = backend
        self.state = state
        self.installed = False

    @classmethod
    def seeded(cls, backend: Backend, seed: int, rank: int = 0) -> Streams:
        """The streams a run starts with."""
        return cls(
            backend,
            {"host": HostStreams.seeded(seed, rank), "framework": backend.seeded_rng(seed)},
        )

    def current(self) -> dict[str, Any]:
        """The streams as they are now (the live globals during a call)."""
        return self._capture() if self.installed else self.state

    def replace(self, state: dict[str, Any]) -> None:
        """Make ``state`` the trainer's streams (a load); installed at once inside a call."""
        self.state = state
        if self.installed:
            self._install(state)

    @contextlib.contextmanager
    def swapped_in(
        self, *, keep: bool, switch: Callable[[], Callable[[], None] | None] | None = None
    ) -> Iterator[None]:
        """Install the trainer's streams for a call, and the caller's back afterwards.
        ``keep``: store what the call drew (a fit call; evaluate/predict never move the
        training streams). ``switch`` turns something on for the call (deterministic
        algorithms) and returns what turns it back off. Nested calls do nothing."""
        if self.installed:
            yield
            return
        caller = self._capture()
        self._install(self.state)
        self.installed = True
        restore = switch() if switch is not None else None
        try:
            yield
        finally:
            self.installed = False
            if keep:
                self.state = self._capture()
            self._install(caller)
            if restore is not None:
                restore()

    @contextlib.contextmanager
    def untouched(self) -> Iterator[None]:
        """A block (validation) after which the streams are as they were before it."""
        before = self._capture()
        try:
            yield
        finally:
            self._install(before)

    def _capture(self) -> dict[str, Any]:
        return {"host": HostStreams.capture(), "framework": self._backend.capture_rng()}

    def _install(self, state: dict[str, Any]) -> None:
        HostStreams.install(state["host"])
        self._backend.install_rng(state["framework"])


class StopSignals:
    """SIGINT/SIGTERM received during a fit call (:attr:`received`: the first one's
    name, or None)."""

    def __init__(self) -> None:
        self.received: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handlers that record a signal (a second one raises ``KeyboardInterrupt``: stop
        at once); the previous handlers are put back afterwards. Only the main thread can
        install handlers: elsewhere signals keep their own."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.received is not None:  # a second signal: stop right now
                raise KeyboardInterrupt
            self.received = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def any(self, backend: Backend, world_size: int) -> bool:
        """Whether a signal came (on any rank, under DDP: a collective)."""
        if world_size > 1:
            return backend.any_rank(self.received is not None)
        return self.received is not None

    def agreed(self, backend: Backend, world_size: int) -> str | None:
        """The signal this call received (under DDP: any rank's — the lowest rank that got
        one — agreed by all, so each reports, and the CLI exits with, the same one)."""
        name = self.received
        if world_size > 1 and backend.any_rank(name is not None):
            names = backend.gather_bytes((name or "").encode())
            return next(n.decode() for n in names if n)
        return name
