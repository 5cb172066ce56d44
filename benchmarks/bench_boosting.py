"""Boosted trees through warmfit vs the library's own ``train``, for the same rounds.

XGBoost (``xgb.train``) and LightGBM (``lgb.train``) on 100,000 rows x 20 features, one
thread, row and column subsampling / bagging on, 100 rounds. warmfit adds the same 100
rounds with ``fit(x, y, rounds=100)``: one exact round at a time (the tree updater or
samplers rebuilt from the round's seed first), the training loss read from the
library's cached predictions each round, a schedule setting the learning rate. Both
build their data object (DMatrix / Dataset) inside the timing. Interleaved rounds; the
headline is the median of the paired ratios, with their quartiles.

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

    def xgb_own(x: np.ndarray, y: np.ndarray, rounds: int) -> None:
        xgb.train({**xgb_params, "seed": 0}, xgb.DMatrix(x, label=y, nthread=1), rounds)

    def lgb_own(x: np.ndarray, y: np.ndarray, rounds: int) -> None:
        lgb.train(lgb_params, lgb.Dataset(x, y, params=lgb_params), rounds)

    return {
        "XGBoost": (xgb_own, lambda: warmfit.boosting.XGBoost(dict(xgb_params))),
        "LightGBM": (lgb_own, lambda: warmfit.boosting.LightGBM(dict(lgb_params))),
    }


def overhead(name: str, n: int, rounds: int, repeats: int) -> dict[str, float]:
    own, model = libraries()[name]
    x, y = data(n)

    def warmfit_fit() -> None:
        t = warmfit.Trainer(model(), schedule=warmfit.schedules.constant(LR), verbose=0)
        t.fit(x, y, rounds=rounds)

    times = interleaved({"own": lambda: own(x, y, rounds), "warmfit": warmfit_fit}, repeats)
    r = {k: median(v) for k, v in times.items()}
    ratios = paired(times["warmfit"], times["own"])
    r["ratio"] = median(ratios)
    r["ratio_q1"], r["ratio_q3"] = quartiles(ratios)
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
            f"{name}, {rounds} rounds on {n} rows: own train {r['own']:.2f}s, warmfit "
            f"{r['warmfit']:.2f}s; warmfit / own, median of paired ratios {r['ratio']:.3f}x "
            f"(quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}; target "
            f"{paired_verdict(r, 1.05)}); a checkpoint every round adds "
            f"{c['per_round_ms']:.1f} ms a round to a {c['round_ms']:.1f} ms round "
            f"({c['bytes'] / 1e3:.0f} kB a checkpoint)"
        )
    if write:
        rows = "".join(
            f"| {name} | {r['own']:.2f} s | {r['warmfit']:.2f} s | **{r['ratio']:.3f}×** "
            f"({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}) | {paired_verdict(r, 1.05)} |\n"
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
            f"{rounds} rounds on {n:,} rows × 20 features, subsampling / bagging on; both "
            "build their data object inside the timing.\n\n"
            "| library | own `train` | warmfit `fit(rounds=...)` | **warmfit / own**: median "
            "of paired ratios (quartiles) | target |\n|---|---|---|---|---|\n"
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
