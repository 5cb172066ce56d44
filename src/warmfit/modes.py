"""The modes table of ``docs/design.md`` as data, and the one function that applies it.

Each row is a part of the training state; each column a mode; each cell what a fit call
in that mode does to that part, in the words of the docs (a test checks that this table
and the docs' are the same). :func:`apply` performs the cells that are actions, through
the four operations a :class:`ModeTarget` (the Trainer) offers; the others (kept,
continue, appended) are what happens when nothing is done.

Owns: the table and :func:`apply`. Does not own: the operations themselves (the Trainer
and the backend), nor the data-dependent rule of a ``warm`` call inside an epoch
(``Trainer._warm_restarts_epoch``).
"""

from __future__ import annotations

from typing import Protocol

MODES = ("continue", "warm", "restart")

#: part of the state -> (continue, warm, restart), as docs/design.md words it.
TABLE: dict[str, tuple[str, str, str]] = {
    "weights": ("kept", "kept", "re-initialised from the seed"),
    "optimizer state": ("kept", "fresh (factory called again)", "fresh"),
    "LR schedule position": (
        "continues (global step)",
        "starts again at 0 (`schedule_origin` = current step)",
        "starts again at 0",
    ),
    "global epoch / step": ("continue", "continue (cumulative)", "back to 0"),
    "data order": (
        "next epoch's permutation",
        "next epoch's permutation",
        "epoch 0's permutation",
    ),
    "callbacks": ("kept", "`reset()`", "`reset()`"),
    "history": (
        "appended, new segment",
        "appended, new segment",
        "a new run; the old run's `history-run<N>.jsonl` and checkpoints stay on disk",
    ),
    "RNG streams": ("continue", "continue", "re-seeded"),
    "ledger": ("appended", "appended", "appended (the ledger is never reset)"),
}


class ModeTarget(Protocol):
    """The operations the modes table is made of."""

    def new_run(self) -> None:
        """Everything a run starts with, from the seed: weights, optimizer, schedule
        position, counters, random streams, callbacks, a new history (the ledger and the
        old run's files are kept)."""

    def fresh_optimizer(self) -> None:
        """A new optimizer from the factory (the weights kept)."""

    def restart_schedule(self) -> None:
        """The schedule starts again at 0 from the current global step."""

    def reset_callbacks(self) -> None:
        """Every callback's ``reset()``."""


def cell(part: str, mode: str) -> str:
    """What a fit call in ``mode`` does to ``part``."""
    return TABLE[part][MODES.index(mode)]


def apply(mode: str, target: ModeTarget) -> None:
    """Make ``target`` what the table says a fit call in ``mode`` starts from."""
    if cell("weights", mode).startswith("re-initialised"):
        target.new_run()  # a new run: every row of the restart column at once
        return
    if cell("optimizer state", mode).startswith("fresh"):
        target.fresh_optimizer()
    if cell("LR schedule position", mode).startswith("starts again at 0"):
        target.restart_schedule()
    if cell("callbacks", mode) == "`reset()`":
        target.reset_callbacks()
