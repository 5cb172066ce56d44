"""Learning curves: one PNG that shows a run across its fit calls.

Owns: :func:`plot_history` — train and validation loss over global epochs, the
fit-call boundaries as vertical lines labelled with their mode, the best epoch
marked, the learning rate on a second y-axis; in a fork, the fork point (the parent's
epochs before it are shaded). Uses matplotlib's Agg backend (no
display needed) through its object API, so it never touches ``pyplot``'s global state.

Does not own: the records (:mod:`warmfit.history`) or reading a run directory
(:mod:`warmfit.cli`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MODE_COLORS = {"continue": "#2ca02c", "warm": "#ff7f0e", "restart": "#d62728"}
FORK_COLOR = "#e377c2"


def plot_history(
    history_records: Sequence[Mapping[str, Any]],
    ledger_records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    monitor: str = "val_loss",
    mode: str = "min",
    title: str | None = None,
) -> Path:
    """Draw the learning curves of one run to ``path`` (PNG) and return the path.

    ``history_records`` are the run's per-epoch records (``trainer.history.records``;
    ``x = record["epoch"]``); ``ledger_records`` the fit calls of that run
    (``trainer.ledger.records``; only the fit calls of the last call's run are drawn). A fit
    call starts at the line drawn at ``epoch_start + 0.5``; without ledger records the
    boundaries come from the records' ``segment`` and ``mode``. A fork (a ledger row
    ``{"mode": "fork", "parent": ...}`` of the drawn run) is marked by a dashed line at
    its ``epoch_start + 0.5``, labelled with the parent, and the epochs before it (the
    parent's, which a fork's history holds) are shaded. A ``path`` that is a
    directory, or lies under a file, is a ValueError raised before anything is drawn;
    missing parent directories are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if mode not in ("min", "max"):
        raise ValueError(f"The 'mode' parameter of plot_history must be one of {{'min', 'max'}}. "
                         f"Got {mode!r} instead.")  # fmt: skip
    path = Path(path)
    _check_output(path)
    records = sorted(history_records, key=lambda r: r["epoch"])
    fig = Figure(figsize=(9, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in records]
    loss = [_num(r.get("loss")) for r in records]
    val = [_num(r.get("val_loss")) for r in records]
    style: dict[str, Any] = {"marker": "o", "markersize": 3.5, "linewidth": 1.8}
    handles = []
    if any(not math.isnan(v) for v in loss):
        handles += ax.plot(epochs, loss, color="#1f77b4", label="train loss", **style)
    if any(not math.isnan(v) for v in val):
        handles += ax.plot(epochs, val, color="#9467bd", label="validation loss", **style)
    if monitor not in ("loss", "val_loss"):
        mon = [_num(r.get(monitor)) for r in records]
        if any(not math.isnan(v) for v in mon):
            handles += ax.plot(epochs, mon, color="#8c564b", label=monitor, **style)

    # best epoch
    best = _best(records, monitor, mode)
    if best is not None:
        b_epoch, b_value = best
        handles += ax.plot(
            [b_epoch], [b_value], linestyle="none", marker="*", markersize=16,
            color="gold", markeredgecolor="black", zorder=5,
            label=f"best {monitor} = {b_value:.4g} (epoch {b_epoch})",
        )  # fmt: skip

    # learning rate on a second axis
    lrs = [_num(r.get("lr")) for r in records]
    if any(not math.isnan(v) for v in lrs):
        ax_lr = ax.twinx()
        handles += ax_lr.plot(
            epochs, lrs, color="0.45", linestyle="--", linewidth=1.2, marker=".",
            markersize=4, label="learning rate (right axis)",
        )  # fmt: skip
        ax_lr.set_ylabel("learning rate", color="0.35")
        ax_lr.tick_params(axis="y", colors="0.35")
        finite = [v for v in lrs if not math.isnan(v) and v > 0]
        if finite and max(finite) / min(finite) > 100:
            ax_lr.set_yscale("log")
        else:
            ax_lr.set_ylim(bottom=0, top=max(finite, default=1.0) * 1.15)
            ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_zorder(ax_lr.get_zorder() + 1)  # curves above the LR line
        ax.patch.set_visible(False)

    # fit-call boundaries
    lo = min(epochs, default=0) - 0.5 if epochs else 0.5
    calls = _calls(records, ledger_records)
    for call in calls:
        lo = min(lo, call["start"] + 0.5)
    hi = max(epochs, default=1) + 0.5
    ax.set_xlim(lo - 0.1, hi + 0.1)
    ymin, ymax = ax.get_ylim() if handles else (0.0, 1.0)
    for call in calls:
        x = call["start"] + 0.5
        color = MODE_COLORS.get(call["mode"], "0.3")
        ax.axvline(x, color=color, linestyle=":", linewidth=1.4, zorder=1)
        ax.annotate(
            f" {call['label']}", xy=(x, 1.0), xycoords=("data", "axes fraction"),
            xytext=(2, -4), textcoords="offset points", rotation=90, va="top", ha="left",
            fontsize=8, color=color,
        )  # fmt: skip
    forks = _forks(records, ledger_records)
    if forks:
        from matplotlib.patches import Patch

        ax.axvspan(lo - 0.1, forks[-1]["x"], color="0.5", alpha=0.1, linewidth=0, zorder=0)
        shade = Patch(color="0.5", alpha=0.1, linewidth=0, label="the parent's epochs")
        handles.append(shade)  # type: ignore[arg-type]  # a legend takes any artist
    for fork in forks:
        ax.axvline(fork["x"], color=FORK_COLOR, linestyle="--", linewidth=1.6, zorder=1)
        ax.annotate(
            f"{fork['label']} ", xy=(fork["x"], 0.0), xycoords=("data", "axes fraction"),
            xytext=(-2, 4), textcoords="offset points", rotation=90, va="bottom", ha="right",
            fontsize=8, color=FORK_COLOR,
        )  # fmt: skip
    ax.set_ylim(ymin, ymax)

    if hi - lo <= 12:
        ax.set_xticks(range(math.ceil(lo), math.floor(hi) + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.25)
    n_calls = len(calls)
    heading = title or "warmfit learning curves"
    ax.set_title(
        f"{heading} — {len(records)} epoch{'s' * (len(records) != 1)}, "
        f"{n_calls} fit call{'s' * (n_calls != 1)}",
        fontsize=11,
    )
    if not records:
        ax.text(0.5, 0.5, "no completed epoch yet", transform=ax.transAxes, ha="center")
    if handles:  # below the axes: never over a curve or a boundary label
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
            fontsize=8, frameon=False,
        )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _check_output(path: Path) -> None:
    """Refuse a PNG path that is a directory or lies under a file (ValueError)."""
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; pass the PNG file to write, e.g. {path / 'curves.png'}"
        )
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise ValueError(
                f"cannot write {path}: {parent} is a file, not a directory. Pass a path "
                "whose folders are directories (missing ones are created)."
            )


def _calls(
    records: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The fit calls that trained in this run: start epoch, mode, a label."""
    fit_calls = [
        r for r in ledger if r.get("mode") in MODE_COLORS and isinstance(r.get("epoch_start"), int)
    ]
    if fit_calls:  # the run of the last fit call: the one the history records belong to
        run = fit_calls[-1].get("run")
        fit_calls = [r for r in fit_calls if r.get("run") == run]
    if fit_calls:
        out = []
        for r in fit_calls:
            resumed = r.get("resumes_call")  # a requeued call finishing an interrupted one
            start = 0 if r["mode"] == "restart" and resumed is None else r["epoch_start"]
            label = f"call {r.get('call', '?')}: {r['mode']}"
            if resumed is not None:
                label += f", resumes call {resumed}"
            if r.get("stopped_by"):
                label += f" (stopped by {r['stopped_by']})"
            out.append({"start": start, "mode": r["mode"], "label": label})
        return out
    out, seen = [], set()
    for r in records:
        seg = r.get("segment")
        if seg in seen:
            continue
        seen.add(seg)
        mode = r.get("mode", "continue")
        out.append({"start": r["epoch"] - 1, "mode": mode, "label": f"call {seg}: {mode}"})
    return out


def _forks(
    records: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The forks of the drawn run (its history's run, else the last ledger row's): where
    each is drawn and its label, oldest first."""
    rows = [r for r in ledger if r.get("mode") == "fork" and isinstance(r.get("epoch_start"), int)]
    runs = [r.get("run") for r in (*ledger, *records) if "run" in r]
    run = records[-1].get("run") if records and "run" in records[-1] else (runs or [None])[-1]
    out = []
    for r in rows:
        if r.get("run") != run:
            continue
        parent: Mapping[str, Any] = r["parent"] if isinstance(r.get("parent"), Mapping) else {}
        where = parent.get("run_dir")
        label = f"fork of {Path(where).name if where else 'an unsaved state'}"
        label += f" at step {r.get('step_start')}"
        if parent.get("offset"):
            label += " (mid-epoch)"
        out.append({"x": r["epoch_start"] + 0.5, "label": label})
    return out


def _best(
    records: Sequence[Mapping[str, Any]], monitor: str, mode: str
) -> tuple[int, float] | None:
    best = None
    for r in records:
        v = _num(r.get(monitor))
        if math.isnan(v) or math.isinf(v):
            continue
        if best is None or (v < best[1] if mode == "min" else v > best[1]):
            best = (r["epoch"], v)
    return best


def _num(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return math.nan
