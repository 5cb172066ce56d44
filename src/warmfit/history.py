"""History and ledger: what happened, per epoch and per fit call.

Owns: :class:`History` (one record per completed epoch, across fit calls: global
epoch, segment = fit-call index, mode, train loss, validation loss and metrics,
learning rate) and :class:`Ledger` (one record per fit call, across runs: mode,
epochs asked and done, step range, data fingerprint, what changed, wall time, final
metrics). Both are plain lists of JSON dicts, saved whole in every checkpoint.

Does not own: plotting (:mod:`warmfit.plots`) or writing files as training goes
(:mod:`warmfit.trainer` appends JSONL lines to the run directory).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any


class _Records:
    """A list of JSON records with ``state_dict()`` / ``load_state_dict()``."""

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records: list[dict[str, Any]] = list(records or [])

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records]

    def load_state_dict(self, records: list[dict[str, Any]]) -> None:
        self.records = [dict(r) for r in records]


class History(_Records):
    """Per-epoch records of the current run, accumulated across fit calls.

    ``history.records`` is a list of dicts; ``history.history`` gives the Keras-style
    ``{"loss": [...], "val_loss": [...], ...}`` view over every epoch of the run.
    """

    @property
    def history(self) -> dict[str, list[Any]]:
        keys: list[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        return {k: [r.get(k) for r in self.records] for k in keys}

    def segment(self, index: int) -> list[dict[str, Any]]:
        """The records written by fit call ``index`` of this run."""
        return [r for r in self.records if r["segment"] == index]

    def best(self, monitor: str = "val_loss", mode: str = "min") -> dict[str, Any] | None:
        """The record with the best finite ``monitor`` value (earliest on ties)."""
        best = None
        for r in self.records:
            v = r.get(monitor)
            if v is None or not math.isfinite(v):
                continue
            if best is None or (v < best[monitor] if mode == "min" else v > best[monitor]):
                best = r
        return best

    def __repr__(self) -> str:
        return f"History({len(self.records)} epochs)"


class Ledger(_Records):
    """One record per fit call (and per rewind, and the fork a run began with: mode
    ``"fork"``, see :mod:`warmfit.fork`), across every run of a trainer."""

    def table(self) -> str:
        """The ledger as a fixed-width text table."""
        cols = ["call", "run", "mode", "epochs", "done", "steps", "wall_s", "final", "changes"]
        rows = []
        for r in self.records:
            final = r.get("final") or {}
            rows.append(
                [
                    str(r.get("call", "")),
                    str(r.get("run", "")),
                    str(r.get("mode", "")),
                    str(r.get("epochs_asked", "")),
                    str(r.get("epochs_done", "")),
                    f"{r.get('step_start', '')}-{r.get('step_end', '')}",
                    f"{r.get('wall_s', 0):.2f}",
                    " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)),
                    changes_text(r.get("changes") or {}),
                ]
            )
        return format_table(cols, rows)

    def __repr__(self) -> str:
        return f"Ledger({len(self.records)} calls)"


#: How the ledger table words a move of the schedule's plan (``changes.schedule.replan``).
_MOVES = {
    "plan": "planned to step {end_step}",
    "extend": "re-planned to step {end_step}",
    "cooldown": "cooldown to step {end_step}",
    "rewarm": "rewarm from step {at_step}",
}


def changes_text(changes: dict[str, Any]) -> str:
    """A ledger row's ``changes`` in a few words: a new schedule, the plan's moves, changed
    settings, an interrupted call left unfinished, an epoch started over."""
    parts = []
    schedule = changes.get("schedule") or {}
    if "to" in schedule:
        parts.append("new schedule")
    parts += [_MOVES[m["kind"]].format(**m) for m in schedule.get("replan", ())]
    if changes.get("settings"):
        parts.append("settings changed")
    if "abandoned_call" in changes:
        parts.append(f"leaves call {changes['abandoned_call']} unfinished")
    if "cursor" in changes:
        parts.append(f"epoch {changes['cursor']['epoch'] + 1} started over")
    return "; ".join(parts)


def format_table(cols: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def epoch_table(records: list[dict[str, Any]]) -> str:
    """Per-epoch history records as a text table."""
    keys = ["epoch", "segment", "mode", "loss"]
    for r in records:
        keys += [k for k in r if k not in keys and k not in ("run", "step", "time")]
    rows = [[_fmt(r.get(k)) for k in keys] for r in records]
    return format_table(keys, rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
