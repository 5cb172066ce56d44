"""In-memory data path: batches cut from tensors by indexing vs a DataLoader.

The same training loop (model, Adam, loss, batch size, one shuffled epoch) fed three
ways, side by side in one process with interleaved repeats:

- ``warmfit``: ``Trainer.fit`` on in-memory tensors (its path: one permutation per
  epoch, each batch ``x[idx]``, no per-sample collation);
- ``tensor indexing``: a hand-written loop cutting batches the same way;
- ``DataLoader``: the same hand-written loop over
  ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`` (per-sample fetch and
  collation, as most code does).

Two more rows time the data path alone (iterating the batches, no training):
``DataLoader only`` and ``indexing only``.

GPU (``--device cuda``): the same code with the model on the GPU. ``warmfit``
(``Trainer(device="cuda")``) and ``tensor indexing`` cut their batches from tensors
already on the GPU (placed there once, before timing), with the epoch's permutation
moved there once; ``DataLoader`` iterates a ``DataLoader(TensorDataset)`` of the host
tensors with ``pin_memory=True`` and moves each batch with ``.to("cuda",
non_blocking=True)``, as GPU code fed by a DataLoader does. The training loops keep
their losses on the GPU and read them once at the end (as warmfit does on a GPU; on the
CPU they read each one, as warmfit does there). Every timed run ends with
``torch.cuda.synchronize()``. The GPU run uses 49152 samples, so that batch 64 is the
issue's 768 steps (the issue: 1.21 s vs 3.27 s on an H100). Rows of the
``data-path-cuda`` section: per batch size, the DataLoader loop's time, the indexing
loop's and warmfit's with the speed-up over the DataLoader loop in parentheses, and
the data path alone (DataLoader + copies to the GPU vs indexing on the GPU).

Target: warmfit ≥ 2× faster than the DataLoader loop. Prints ratios and rewrites its
section of BENCHMARKS.md (not with ``--quick``).

    .venv/bin/python benchmarks/bench_data_path.py [--quick] [--device {cpu,cuda}]
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import (
    cli,
    command,
    device_label,
    interleaved,
    median,
    section,
    write_section,
)
from bench_step_overhead import mlp  # the same model as the step-overhead benchmark

import warmfit

SCRIPT = "bench_data_path.py"
#: Samples on the GPU: batch 64 makes the issue's 768 steps. (32768 on the CPU.)
N_CUDA = 49152


def run(
    n: int | None = None,
    d: int = 20,
    hidden: int = 64,
    out: int = 3,
    batch_sizes: tuple[int, ...] = (64, 512),
    repeats: int = 7,
    device: torch.device | str = "cpu",
    *,
    write: bool = True,
) -> dict[str, float]:
    """One case per batch size; keys are suffixed ``@<batch size>``, and the first
    case's figures are also returned unsuffixed. ``n`` defaults to 32768 samples on the
    CPU and :data:`N_CUDA` on a GPU."""
    device = torch.device(device)
    if n is None:
        n = N_CUDA if device.type == "cuda" else 32768
    torch.set_num_threads(1)
    r: dict[str, float] = {}
    for i, bs in enumerate(batch_sizes):
        case = _case(n, d, hidden, out, bs, repeats, device)
        r.update({f"{k}@{bs}": v for k, v in case.items()})
        if i == 0:
            r.update(case)
    if write:
        write_section(
            section("data-path", device),
            _body(r, repeats, n, d, hidden, out, batch_sizes, device),
            command(SCRIPT, device),
        )
    return r


def _case(
    n: int, d: int, hidden: int, out: int, bs: int, repeats: int, device: torch.device
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))  # host
    y = torch.from_numpy(rng.integers(0, out, size=n))
    x_dev, y_dev = x.to(device), y.to(device)  # the same tensors on the CPU
    cuda = device.type == "cuda"

    def train(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        torch.manual_seed(0)
        model = mlp(d, hidden, out).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses: list[torch.Tensor] = []
        for xb, yb in batches:
            loss = nn.functional.cross_entropy(model(xb), yb)
            if cuda:  # read once at the end, as warmfit does on a GPU
                losses.append(loss.detach())
            else:  # read each step, as warmfit does on the CPU
                loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if losses:
            torch.stack(losses).sum().item()

    def permutation() -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)

    def loader_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(x, y)
        for xb, yb in torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=True, generator=gen, pin_memory=cuda
        ):
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)

    def indexing() -> None:
        train((x_dev[idx], y_dev[idx]) for idx in permutation().split(bs))

    def loader() -> None:
        train(loader_batches())

    def trainer() -> None:
        t = warmfit.Trainer(
            lambda: mlp(d, hidden, out),
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
            loss="cross_entropy",
            batch_size=bs,
            seed=0,
            verbose=0,
            device=str(device),
        )
        t.fit(x_dev, y_dev, epochs=1)

    def loader_only() -> None:  # the data path alone, no training
        for _ in loader_batches():
            pass

    def indexing_only() -> None:
        for idx in permutation().split(bs):
            x_dev[idx], y_dev[idx]

    times = interleaved(
        {
            "warmfit": trainer,
            "tensor indexing": indexing,
            "DataLoader": loader,
            "DataLoader only": loader_only,
            "indexing only": indexing_only,
        },
        repeats,
        device,
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
    r: dict[str, float],
    repeats: int,
    n: int,
    d: int,
    hidden: int,
    out: int,
    sizes: tuple[int, ...],
    device: torch.device,
) -> str:
    rows = []
    for bs in sizes:
        g = {k[: -len(f"@{bs}")]: v for k, v in r.items() if k.endswith(f"@{bs}")}
        rows.append(
            f"| {bs} ({g['steps']:.0f} steps) | {g['t_DataLoader']:.3f} s | "
            f"{g['t_tensor indexing']:.3f} s ({g['speedup_indexing']:.2f}×) | "
            f"{g['t_warmfit']:.3f} s (**{g['speedup_warmfit']:.2f}×**) | "
            f"{g['t_DataLoader only']:.4f} s vs {g['t_indexing only']:.4f} s "
            f"({g['speedup_data_only']:.0f}×) |"
        )
    table = (
        "| batch | DataLoader loop | hand-written, indexing | **warmfit `fit`** | data path "
        "alone: DataLoader vs indexing |\n|---|---|---|---|---|\n" + "\n".join(rows)
    )
    if device.type == "cuda":
        return (
            "## In-memory data: batches cut from tensors on the GPU vs a DataLoader "
            f"({device_label(device)})\n\n"
            f"One epoch of a {d}-{hidden}-{hidden}-{out} MLP with Adam on the GPU, {n} "
            'in-memory samples, fed by `Trainer(device="cuda").fit` and by a '
            "hand-written loop, both cutting batches from tensors already on the GPU "
            "(the epoch's permutation moved there once), and by the same hand-written "
            "loop over `DataLoader(TensorDataset(x, y), shuffle=True, pin_memory=True)` "
            'of the host tensors, each batch moved with `.to("cuda", non_blocking=True)`. '
            "Losses stay on the GPU and are read once at the end, as warmfit does there. "
            "Target: warmfit ≥ 2× faster than the DataLoader loop; the issue measured "
            "1.21 s vs 3.27 s (2.7×) for 768 steps on an H100 (batch 64 here). In "
            "parentheses: the DataLoader loop's time / this one's. The last column times "
            "the data path alone (iterating the batches, copies to the GPU included, no "
            "training).\n\n"
            + table
            + f"\n\nMedians of {repeats} interleaved repeats after a warm-up, one process, "
            "one CPU thread; each timed run ends with `torch.cuda.synchronize()`."
        )
    lo, hi = sizes[0], sizes[-1]

    def g(key: str, bs: int) -> float:
        return r[f"{key}@{bs}"]

    ceiling = (
        f"so no loop measured here reaches 2× there: the hand-written indexing loop, the "
        f"ceiling, measured {g('speedup_indexing', lo):.2f}×"
        if g("speedup_indexing", lo) < 2
        else f"and the hand-written indexing loop measured {g('speedup_indexing', lo):.2f}×"
    )
    at_hi = "past" if g("speedup_warmfit", hi) >= 2 else "short of"
    return (
        "## In-memory data: batches cut from tensors vs a DataLoader (CPU, 1 thread)\n\n"
        f"One epoch of a {d}-{hidden}-{hidden}-{out} MLP with Adam on {n} in-memory samples, "
        "fed by `Trainer.fit` (batches cut from the tensors by indexing), by a hand-written "
        "loop cutting batches the same way, and by the same hand-written loop over "
        "`DataLoader(TensorDataset(x, y), shuffle=True)` (per-sample fetch and collation). "
        "Target: warmfit ≥ 2× faster than the DataLoader loop. In parentheses: the "
        "DataLoader loop's time / this one's. The last column times the data path alone "
        "(iterating the batches, no training).\n\n"
        + table
        + f"\n\nTimes: medians of {repeats} interleaved repeats after a warm-up, one "
        "process; every speed-up is the quotient of the two medians in its row (of the "
        "unrounded times).\n\n"
        "Reading the target: the speed-up of the whole loop is bounded by the share of the "
        f"step the DataLoader costs. On one CPU thread at batch {lo} the model's own "
        f"compute is most of the step, {ceiling} and warmfit "
        f"{g('speedup_warmfit', lo):.2f}×, while the data path alone is "
        f"{g('speedup_data_only', lo):.0f}× faster than the DataLoader's at batch {lo} "
        f"({g('speedup_data_only', hi):.0f}× at batch {hi}). The issue's 2× figure is an "
        "H100 measurement (1.21 s vs 3.27 s), where the step's compute is tiny and the "
        f"DataLoader dominates; at batch {hi} on the CPU, where collation grows with the "
        f"batch, warmfit measured {g('speedup_warmfit', hi):.2f}×, {at_hi} 2×. The GPU "
        "variant (`--device cuda`) makes the same comparison on the GPU, in its own section."
    )


def main() -> None:
    args, device = cli(__doc__)
    if args.quick:
        run(n=4096, batch_sizes=(64,), repeats=2, device=device, write=False)
    else:
        run(device=device)


if __name__ == "__main__":
    main()
