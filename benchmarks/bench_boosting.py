"""Boosted trees through warmfit vs the library's own ``train``, for the same rounds.

XGBoost (``xgb.train``; with row and column subsampling, and without) and LightGBM
(``lgb.train``, bagging and feature fraction on) on 100,000 rows x 20 features, one
thread, 100 rounds. warmfit adds the same 100
rounds with ``fit(x, y, rounds=100)``: one exact round at a time (the tree updater or
samplers rebuilt from the round's seed first), the training loss read from the
library's cached predictions each round, a schedule setting the learning rate. Both
build their data object (DMatrix / Dataset) inside the timing. warmfit records the
training loss of every round (the history's ``loss``), which the library's ``train``
does only when asked — ``evals=[(dtrain, "train")]`` / ``valid_sets=[dtrain]`` — so the
headline compares with that (the same work); the ratio against a bare ``train``, which
computes no metric, is printed beside it. Interleaved rounds; the headline is the median
of the paired ratios, with their quartiles.

The second table is the cost of a checkpoint every round (``checkpoint_every=1`` on a
run dir: the booster's bytes and the training state, written in the background) over
the same fit without a run dir, per round, with the size of one checkpoint.

Prints the ratios and rewrites its section of BENCHMARKS.md (not with ``--quick``).

    .venv/bin/python benchmarks/bench_boosting.py [--quick]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import (
    cli,
    command,
    interleaved,
    median,
    paired,
    paired_verdict,
    quartiles,
    write_section,
)

import warmfit

SCRIPT = "bench_boosting.py"
LR = 0.1


def data(n: int, d: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def libraries() -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    """name -> (the library's own training of ``rounds`` rounds, the warmfit model)."""
    import lightgbm as lgb
    import xgboost as xgb

    xgb_params = {"objective": "binary:logistic", "eta": LR, "max_depth": 6,
                  "subsample": 0.8, "colsample_bytree": 0.8, "nthread": 1}  # fmt: skip
    lgb_params = {"objective": "binary", "learning_rate": LR, "num_leaves": 31,
                  "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8,
                  "num_threads": 1, "verbose": -1, "deterministic": True,
                  "force_col_wise": True}  # fmt: skip

    unsampled = {k: v for k, v in xgb_params.items() if not k.startswith(("sub", "colsample"))}

    def xgb_train(params: dict[str, Any]) -> Callable[..., None]:
        def own(x: np.ndarray, y: np.ndarray, rounds: int, *, loss: bool) -> None:
            dtrain = xgb.DMatrix(x, label=y, nthread=1)
            evals = [(dtrain, "train")] if loss else ()
            xgb.train({**params, "seed": 0}, dtrain, rounds, evals=evals, verbose_eval=False)

        return own

    def lgb_own(x: np.ndarray, y: np.ndarray, rounds: int, *, loss: bool) -> None:
        dtrain = lgb.Dataset(x, y, params=lgb_params)
        lgb.train(lgb_params, dtrain, rounds, valid_sets=[dtrain] if loss else None)

    return {
        "XGBoost": (xgb_train(xgb_params), lambda: warmfit.boosting.XGBoost(dict(xgb_params))),
        "XGBoost, no subsampling": (
            xgb_train(unsampled),
            lambda: warmfit.boosting.XGBoost(dict(unsampled)),
        ),
        "LightGBM": (lgb_own, lambda: warmfit.boosting.LightGBM(dict(lgb_params))),
    }


def overhead(name: str, n: int, rounds: int, repeats: int) -> dict[str, float]:
    own, model = libraries()[name]
    x, y = data(n)

    def warmfit_fit() -> None:
        t = warmfit.Trainer(model(), schedule=warmfit.schedules.constant(LR), verbose=0)
        t.fit(x, y, rounds=rounds)

    times = interleaved(
        {
            "own": lambda: own(x, y, rounds, loss=True),
            "bare": lambda: own(x, y, rounds, loss=False),
            "warmfit": warmfit_fit,
        },
        repeats,
    )
    r = {k: median(v) for k, v in times.items()}
    ratios = paired(times["warmfit"], times["own"])
    r["ratio"] = median(ratios)
    r["ratio_q1"], r["ratio_q3"] = quartiles(ratios)
    bare = paired(times["warmfit"], times["bare"])
    r["bare_ratio"] = median(bare)
    r["bare_q1"], r["bare_q3"] = quartiles(bare)
    return r


def checkpoint_cost(name: str, n: int, rounds: int, repeats: int) -> dict[str, float]:
    _, model = libraries()[name]
    x, y = data(n)
    root = Path(tempfile.mkdtemp(prefix="warmfit-bench-boost-"))
    sizes: list[int] = []

    def plain() -> None:
        warmfit.Trainer(model(), verbose=0).fit(x, y, rounds=rounds)

    def every_round() -> None:
        run = root / "run"
        shutil.rmtree(run, ignore_errors=True)
        with warmfit.Trainer(model(), verbose=0, run_dir=run, checkpoint_every=1,
                             keep_last=2) as t:  # fmt: skip
            t.fit(x, y, rounds=rounds)
        newest = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
        sizes.append(sum(f.stat().st_size for f in newest.iterdir()))

    try:
        times = interleaved({"plain": plain, "checkpoints": every_round}, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r = {k: median(v) for k, v in times.items()}
    extra = [a - b for a, b in zip(times["checkpoints"], times["plain"], strict=True)]
    r["per_round_ms"] = 1000 * median(extra) / rounds
    r["round_ms"] = 1000 * r["plain"] / rounds
    r["bytes"] = float(sizes[-1])
    return r


def run(repeats: int = 5, *, n: int = 100_000, rounds: int = 100, write: bool = True) -> dict:
    results: dict[str, dict[str, float]] = {}
    for name in libraries():
        r = overhead(name, n, rounds, repeats)
        c = checkpoint_cost(name, max(n // 10, 1000), max(rounds // 2, 2), max(repeats - 2, 1))
        results[name] = {**r, **{f"ck_{k}": v for k, v in c.items()}}
        print(
            f"{name}, {rounds} rounds on {n} rows: own train with the training loss "
            f"{r['own']:.2f}s (bare {r['bare']:.2f}s), warmfit {r['warmfit']:.2f}s; warmfit / "
            f"own, median of paired ratios {r['ratio']:.3f}x (quartiles {r['ratio_q1']:.3f}-"
            f"{r['ratio_q3']:.3f}; target {paired_verdict(r, 1.05)}), / bare train "
            f"{r['bare_ratio']:.3f}x; a checkpoint every round adds "
            f"{c['per_round_ms']:.1f} ms a round to a {c['round_ms']:.1f} ms round "
            f"({c['bytes'] / 1e3:.0f} kB a checkpoint)"
        )
    if write:
        rows = "".join(
            f"| {name} | {r['own']:.2f} s | {r['bare']:.2f} s | {r['warmfit']:.2f} s | "
            f"**{r['ratio']:.3f}×** ({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}) | "
            f"{paired_verdict(r, 1.05)} | {r['bare_ratio']:.3f}× ({r['bare_q1']:.3f}–"
            f"{r['bare_q3']:.3f}) |\n"
            for name, r in results.items()
        )
        ck_rows = "".join(
            f"| {name} | {r['ck_round_ms']:.1f} ms | {r['ck_per_round_ms']:.1f} ms | "
            f"{r['ck_bytes'] / 1e3:.0f} kB |\n"
            for name, r in results.items()
        )
        ck_n, ck_rounds = max(n // 10, 1000), max(rounds // 2, 2)
        body = (
            f"## Boosted trees: warmfit vs the library's own train (CPU, 1 thread)\n\n"
            f"{rounds} rounds on {n:,} rows × 20 features (subsample and colsample_bytree "
            "0.8 for XGBoost unless said; bagging and feature fraction 0.8 for LightGBM); both "
            "build their data object inside the timing. warmfit records the training loss of "
            "every round (the history's `loss`); the library's `train` does so when asked "
            "(`evals=[(dtrain, \"train\")]`, `valid_sets=[dtrain]`), which is the headline's "
            "comparison — the same work. A bare `train` computes no metric; the last column "
            "is the ratio to it: the difference is that per-round evaluation of the training "
            "metric over every row (profiled: 2.4 ms of XGBoost's 3.8 ms a round of "
            "overhead, 1.8 of LightGBM's 2.2 ms). With row or column subsampling, every "
            "XGBoost round also rebuilds its samplers so that they draw from the round's own "
            "seed (what makes 4 + 6 rounds equal 10): two configurations a round, ~0.9 ms, "
            "that `xgb.train` pays once; without subsampling warmfit skips them.\n\n"
            "| library | own `train`, training loss each round | bare own `train` | warmfit "
            "`fit(rounds=...)` | **warmfit / own**: median of paired ratios (quartiles) | "
            "target | warmfit / bare `train` (quartiles) |\n|---|---|---|---|---|---|---|\n"
            + rows
            + f"\nA checkpoint every round ({ck_rounds} rounds on {ck_n:,} rows, "
            "`checkpoint_every=1`, `keep_last=2`): the time it adds per round, over the same "
            "fit without a run dir, and the size of one checkpoint (the booster grows with "
            "the rounds; this is the last one).\n\n"
            "| library | a round without checkpoints | added per round by a checkpoint | "
            "checkpoint size |\n|---|---|---|---|\n"
            + ck_rows
            + "\nThe exact alternative the libraries offer — one `train(..., "
            "num_boost_round=1, xgb_model=previous)` per round, which rebuilds the booster "
            "and predicts every tree again each round — measured 5.3× `xgb.train` at 100 "
            "rounds on 100k rows (docs/boosting.md). "
            f"{repeats} interleaved rounds after a warm-up run each."
        )
        write_section("boosting", body, command(SCRIPT, "cpu"))
    return results


def main() -> None:
    args, _ = cli(__doc__)
    if args.quick:
        run(repeats=1, n=2000, rounds=5, write=False)
    else:
        run()


if __name__ == "__main__":
    main()
