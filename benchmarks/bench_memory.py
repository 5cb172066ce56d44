"""Memory: peak RSS of ``Trainer.fit`` vs a hand-written loop doing the same work.

Each variant runs in a fresh interpreter (so peaks do not mix) and reports its own
peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``imports only``: Python + torch + warmfit loaded, the data set made (the floor);
- ``hand-written loop``: model, Adam, ``steps`` steps over batches cut from tensors;
- ``warmfit fit``: the same through ``Trainer.fit(steps=...)`` without a run dir;
- ``warmfit fit + checkpoints``: with ``run_dir`` and ``checkpoint_every``: adds one
  snapshot buffer (a host copy of the state, reused by every save).

Target: ``fit`` ≤ 1.1× the hand-written loop, plus one snapshot buffer with
checkpoints. The snapshot buffer's size is what the trainer's snapshot buffers hold
after the run (warmfit's own and, where the backend keeps its own host copy of the
state, the backend's).

GPU (``--device cuda``): the same variants with the model, Adam and the data set on
the GPU (the data set is moved there before the variant runs) and
``Trainer(device="cuda")``. Each child calls ``torch.cuda.reset_peak_memory_stats()``
once the data set is on the GPU, runs the variant, synchronises, and reports
``torch.cuda.max_memory_allocated()`` (the data set, as the baseline, included) next
to its host peak RSS. Rows of the ``memory-cuda`` section: per variant, the peak GPU
memory allocated and its ratio to the hand-written loop's, then the host peak RSS and
its ratio. On the GPU warmfit's snapshot buffer is pinned host memory, so the GPU
target is ``fit`` (with or without checkpoints) ≤ 1.1× the hand-written loop's GPU
peak; the snapshot shows in the host RSS column.

Prints ratios and rewrites its section of BENCHMARKS.md (not with ``--quick``).

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--device {cpu,cuda}]
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import (
    ROOT,
    cli,
    command,
    device_label,
    median,
    section,
    sync,
    write_section,
)

SCRIPT = "bench_memory.py"
VARIANTS = ("imports only", "hand-written loop", "warmfit fit", "warmfit fit + checkpoints")


def mlp(d: int, hidden: int, layers: int, out: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Linear(d, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, out))
    return nn.Sequential(*mods)


def child(variant: str, cfg: dict, run_dir: str) -> dict[str, float]:
    """Run one variant in this process; return its peak RSS (bytes), the snapshot
    buffers' size, and on a GPU the peak GPU memory allocated."""
    import warmfit

    torch.set_num_threads(1)
    n, d, hidden, layers, out, bs, steps = (
        cfg[k] for k in ("n", "d", "hidden", "layers", "out", "bs", "steps")
    )
    device = torch.device(cfg.get("device", "cpu"))
    cuda = device.type == "cuda"
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, out, size=n)).to(device)
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    state_bytes = 0
    if variant == "hand-written loop":
        torch.manual_seed(0)
        model = mlp(d, hidden, layers, out).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif variant.startswith("warmfit"):
        ckpt = variant.endswith("checkpoints")
        trainer = warmfit.Trainer(
            lambda: mlp(d, hidden, layers, out),
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
            loss="cross_entropy",
            batch_size=bs,
            seed=0,
            verbose=0,
            run_dir=run_dir if ckpt else None,
            checkpoint_every=max(1, steps // 2) if ckpt else None,
            keep_last=1,
            device=str(device),
        )
        trainer.fit(x, y, steps=steps)
        if ckpt:  # warmfit's buffers, plus the backend's own host copy where it keeps one
            own = getattr(trainer._backend, "_snapshot", None)
            own_bytes = own.nbytes if own is not None else 0
            state_bytes = trainer.checkpointer.snapshot_bytes + own_bytes
        trainer.close()
    elif variant != "imports only":
        raise ValueError(variant)
    sync(device)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    got = {"peak": peak_kib * 1024.0, "snapshot": float(state_bytes)}
    if cuda:
        got["cuda_peak"] = float(torch.cuda.max_memory_allocated(device))
    return got


def measure(variant: str, cfg: dict) -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix="warmfit-bench-mem-")
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", variant, json.dumps(cfg), tmp + "/run"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    n: int = 200_000,
    d: int = 256,
    hidden: int = 2048,
    layers: int = 4,
    out: int = 10,
    bs: int = 64,
    steps: int = 8,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    *,
    write: bool = True,
) -> dict[str, float]:
    """Peaks (bytes) by variant and the ratios. On a GPU the ratios are of the peak GPU
    memory allocated (``cuda_peak_*``); the host peaks are returned too (``peak_*``)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    cfg = dict(
        n=n, d=d, hidden=hidden, layers=layers, out=out, bs=bs, steps=steps, device=str(device)
    )
    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gpu_peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    snapshot = 0.0
    for _ in range(repeats):
        for v in VARIANTS:
            got = measure(v, cfg)
            peaks[v].append(got["peak"])
            if cuda:
                gpu_peaks[v].append(got["cuda_peak"])
            snapshot = max(snapshot, got["snapshot"])
    m = {v: median(p) for v, p in peaks.items()}
    g = {v: median(p) for v, p in gpu_peaks.items()} if cuda else {}
    params = sum(p.numel() for p in mlp(d, hidden, layers, out).parameters())
    r = {
        **{f"peak_{v}": val for v, val in m.items()},
        **{f"cuda_peak_{v}": val for v, val in g.items()},
        "params": float(params),
        "snapshot_bytes": snapshot,
    }
    mib = 2**20
    for v in VARIANTS:
        gpu = f"  GPU {g[v] / mib:8.0f} MiB" if cuda else ""
        print(f"  {v:26s} {m[v] / mib:8.0f} MiB{gpu}")
    print(f"snapshot buffer {snapshot / mib:.0f} MiB")
    if cuda:  # the snapshot is pinned host memory: the GPU peak gets nothing added
        hand, fit, fit_ck = (g[v] for v in VARIANTS[1:])
        r.update(ratio_fit=fit / hand, ratio_fit_ckpt=fit_ck / hand)
        print(f"GPU: fit / hand: {r['ratio_fit']:.3f}x (target <= 1.1x)")
        print(f"GPU: fit + checkpoints / hand: {r['ratio_fit_ckpt']:.3f}x (target <= 1.1x)")
    else:
        hand, fit, fit_ck = (m[v] for v in VARIANTS[1:])
        r.update(ratio_fit=fit / hand, ratio_fit_ckpt=fit_ck / (hand + snapshot))
        print(f"fit / hand: {r['ratio_fit']:.3f}x (target <= 1.1x)")
        print(f"fit + checkpoints / (hand + snapshot): {r['ratio_fit_ckpt']:.3f}x (target <= 1.1x)")
    r["ratio_fit_ckpt_vs_hand"] = fit_ck / hand
    if write:
        body = _body_cuda(r, repeats, cfg, device) if cuda else _body(r, repeats, cfg)
        write_section(section("memory", device), body, command(SCRIPT, device))
    return r


def _body(r: dict[str, float], repeats: int, cfg: dict) -> str:
    mib = 2**20
    hand = r["peak_hand-written loop"]
    data_mib = cfg["n"] * (cfg["d"] * 4 + 8) / mib
    rows = "\n".join(
        f"| {'**' + v + '**' if v.startswith('warmfit') else v} | {r['peak_' + v] / mib:.0f} MiB | "
        f"{r['peak_' + v] / hand:.3f}× |"
        for v in VARIANTS
    )
    ok = r["ratio_fit"] <= 1.1 and r["ratio_fit_ckpt"] <= 1.1
    return (
        "## Memory: peak RSS of `fit` vs a hand-written loop (CPU)\n\n"
        f"{cfg['steps']} steps of an MLP of {r['params'] / 1e6:.1f}M parameters with Adam, "
        f"batch {cfg['bs']}, on {cfg['n']} in-memory samples ({data_mib:.0f} MiB); each "
        "variant in a fresh interpreter reporting its own peak RSS (`ru_maxrss`). Target: "
        "`fit` ≤ 1.1× the hand-written loop, plus one snapshot buffer when checkpointing. "
        f"Measured: `fit` **{r['ratio_fit']:.3f}×**; with checkpoints "
        f"**{r['ratio_fit_ckpt']:.3f}×** of (hand-written + one snapshot buffer of "
        f"{r['snapshot_bytes'] / mib:.0f} MiB) — {'meets' if ok else 'misses'} the target.\n\n"
        "| variant | peak RSS | × hand-written |\n|---|---|---|\n"
        f"{rows}\n\n"
        f"Medians of {repeats} interleaved repeats (each a fresh process); every × is the "
        "quotient of the medians shown."
    )


def _body_cuda(r: dict[str, float], repeats: int, cfg: dict, device: torch.device) -> str:
    mib = 2**20
    hand, hand_rss = r["cuda_peak_hand-written loop"], r["peak_hand-written loop"]
    data_mib = cfg["n"] * (cfg["d"] * 4 + 8) / mib
    rows = "\n".join(
        f"| {'**' + v + '**' if v.startswith('warmfit') else v} | "
        f"{r['cuda_peak_' + v] / mib:.0f} MiB | {r['cuda_peak_' + v] / hand:.3f}× | "
        f"{r['peak_' + v] / mib:.0f} MiB | {r['peak_' + v] / hand_rss:.3f}× |"
        for v in VARIANTS
    )
    ok = r["ratio_fit"] <= 1.1 and r["ratio_fit_ckpt"] <= 1.1
    return (
        f"## Memory: peak GPU memory of `fit` vs a hand-written loop ({device_label(device)})"
        f"\n\n{cfg['steps']} steps of an MLP of {r['params'] / 1e6:.1f}M parameters with "
        f"Adam, batch {cfg['bs']}, on {cfg['n']} in-memory samples ({data_mib:.0f} MiB) on "
        "the GPU; each variant in a fresh interpreter that moves the data set to the GPU, "
        "calls `torch.cuda.reset_peak_memory_stats()`, runs, and reports "
        "`torch.cuda.max_memory_allocated()` (the data set included) and its host peak RSS "
        "(`ru_maxrss`). Target: `fit` ≤ 1.1× the hand-written loop. warmfit's snapshot "
        "buffer is pinned host memory, so with checkpoints the GPU peak is held to the same "
        f"1.1× and the snapshot ({r['snapshot_bytes'] / mib:.0f} MiB) shows in the host "
        f"column. Measured on the GPU: `fit` **{r['ratio_fit']:.3f}×**; with checkpoints "
        f"**{r['ratio_fit_ckpt']:.3f}×** — {'meets' if ok else 'misses'} the target.\n\n"
        "| variant | peak GPU memory allocated | × hand-written | host peak RSS | "
        "× hand-written |\n|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Medians of {repeats} interleaved repeats (each a fresh process)."
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
        return
    args, device = cli(__doc__)
    if args.quick:
        run(n=20_000, d=64, hidden=512, layers=2, steps=4, repeats=1, device=device, write=False)
    else:
        run(device=device)


if __name__ == "__main__":
    main()
