"""Memory: peak RSS of ``Trainer.fit`` vs a hand-written loop doing the same work.

Each variant runs in a fresh interpreter (so peaks do not mix) and reports its own
peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``imports only``: Python + torch + warmfit loaded, the data set made (the floor);
- ``hand-written loop``: model, Adam, ``steps`` steps over batches cut from tensors;
- ``warmfit fit``: the same through ``Trainer.fit(steps=...)`` without a run dir;
- ``warmfit fit + checkpoints``: with ``run_dir`` and ``checkpoint_every``: adds one
  snapshot buffer (a host copy of the state, reused by every save).

Target: ``fit`` ≤ 1.1× the hand-written loop, plus one snapshot buffer with
checkpoints. Prints ratios and rewrites its section of BENCHMARKS.md.

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
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
from _report import ROOT, median, write_section

COMMAND = "python benchmarks/bench_memory.py"
VARIANTS = ("imports only", "hand-written loop", "warmfit fit", "warmfit fit + checkpoints")


def mlp(d: int, hidden: int, layers: int, out: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Linear(d, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, out))
    return nn.Sequential(*mods)


def child(variant: str, cfg: dict, run_dir: str) -> dict[str, float]:
    """Run one variant in this process; return its peak RSS and the state's size."""
    import warmfit

    torch.set_num_threads(1)
    n, d, hidden, layers, out, bs, steps = (
        cfg[k] for k in ("n", "d", "hidden", "layers", "out", "bs", "steps")
    )
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, out, size=n))
    state_bytes = 0
    if variant == "hand-written loop":
        torch.manual_seed(0)
        model = mlp(d, hidden, layers, out)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
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
        )
        trainer.fit(x, y, steps=steps)
        if ckpt:
            state_bytes = trainer._buffers.nbytes
        trainer.close()
    elif variant != "imports only":
        raise ValueError(variant)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak": peak_kib * 1024.0, "snapshot": float(state_bytes)}


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
    *,
    write: bool = True,
) -> dict[str, float]:
    cfg = dict(n=n, d=d, hidden=hidden, layers=layers, out=out, bs=bs, steps=steps)
    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    snapshot = 0.0
    for _ in range(repeats):
        for v in VARIANTS:
            got = measure(v, cfg)
            peaks[v].append(got["peak"])
            snapshot = max(snapshot, got["snapshot"])
    m = {v: median(p) for v, p in peaks.items()}
    hand, fit, fit_ck = m["hand-written loop"], m["warmfit fit"], m["warmfit fit + checkpoints"]
    params = sum(p.numel() for p in mlp(d, hidden, layers, out).parameters())
    r = {
        **{f"peak_{v}": val for v, val in m.items()},
        "params": float(params),
        "snapshot_bytes": snapshot,
        "ratio_fit": fit / hand,
        "ratio_fit_ckpt": fit_ck / (hand + snapshot),
        "ratio_fit_ckpt_vs_hand": fit_ck / hand,
    }
    mib = 2**20
    for v in VARIANTS:
        print(f"  {v:26s} {m[v] / mib:8.0f} MiB")
    print(f"snapshot buffer {snapshot / mib:.0f} MiB")
    print(f"fit / hand: {r['ratio_fit']:.3f}x (target <= 1.1x)")
    print(f"fit + checkpoints / (hand + snapshot): {r['ratio_fit_ckpt']:.3f}x (target <= 1.1x)")
    if write:
        write_section("memory", _body(r, repeats, cfg), COMMAND)
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
        f"Medians of {repeats} interleaved repeats (each a fresh process)."
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        run(n=20_000, d=64, hidden=512, layers=2, steps=4, repeats=1, write=False)
    else:
        run()


if __name__ == "__main__":
    main()
