"""The full training step: warmfit with bf16 + accumulation + clipping + EMA vs a
hand-written nanoGPT-style loop doing the same work.

The model is ``examples/charlm.py``'s character-level transformer (2 blocks, width 64,
context 64) on random token windows; AdamW with decay/no-decay groups, warm-up +
cosine, ``precision="bf16"`` (autocast around each micro-batch's forward and loss),
``accumulate=4`` (each global batch of 32 in 4 micro-batches, each loss weighted by its
share), ``clip_grad_norm=1.0`` and ``ema=0.99``. The hand loop does exactly that: per
step it sets the learning rate, runs the 4 micro-batches under ``torch.autocast``,
clips, steps, updates the EMA with the same arithmetic, and reads the loss once per step
(warmfit reads it too on the CPU, to catch a NaN before the optimizer step). Both build
their model and optimizer inside the timing. One thread, one process, interleaved
rounds; the headline ratio is the median of the per-round ratios (see the step-overhead
section for why), with their quartiles.

Prints the ratio and rewrites its section of BENCHMARKS.md (not with ``--quick``).

    .venv/bin/python benchmarks/bench_training_step.py [--quick] [--device {cpu,cuda}]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import charlm
from _report import (
    cli,
    command,
    device_label,
    interleaved,
    median,
    paired,
    paired_verdict,
    quartiles,
    section,
    write_section,
)

import warmfit

SCRIPT = "bench_training_step.py"
VOCAB = 80
BATCH, ACCUMULATE, CLIP, EMA_DECAY = 32, 4, 1.0, 0.99


def windows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.integers(0, VOCAB, size=(n, charlm.BLOCK + 1))
    return {"idx": w[:, :-1].copy(), "targets": w[:, 1:].copy()}


def schedule() -> warmfit.schedules.Schedule:
    return warmfit.schedules.warmup(20, warmfit.schedules.cosine(3e-3, horizon=400, min_lr=3e-4))


def case(n: int, epochs: int, repeats: int, device: torch.device) -> dict[str, float]:
    data = windows(n)
    idx = torch.from_numpy(data["idx"]).to(device)
    targets = torch.from_numpy(data["targets"]).to(device)
    sched = schedule()

    def hand() -> None:
        torch.manual_seed(0)
        model = charlm.CharLM(VOCAB).to(device)
        opt = charlm.adamw(model)
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        model.train()
        step = 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, BATCH):
                rows = perm[i : i + BATCH]
                for g in opt.param_groups:
                    g["lr"] = warmfit.schedules.lr_at(sched, step)
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for part in torch.tensor_split(rows, ACCUMULATE):
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        loss = model(idx.index_select(0, part), targets.index_select(0, part)).loss
                    weighted = loss * (len(part) / len(rows))
                    weighted.backward()
                    total += weighted.item()
                if not math.isfinite(total):
                    raise FloatingPointError(total)
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if ema[k].is_floating_point():
                            ema[k].mul_(EMA_DECAY).add_(v, alpha=1 - EMA_DECAY)
                        else:
                            ema[k].copy_(v)
                step += 1

    def trainer() -> None:
        t = warmfit.Trainer(
            lambda: charlm.CharLM(VOCAB),
            optimizer=charlm.adamw,
            schedule=sched,
            batch_size=BATCH,
            seed=0,
            verbose=0,
            device=str(device),
            precision="bf16",
            accumulate=ACCUMULATE,
            clip_grad_norm=CLIP,
            ema=EMA_DECAY,
        )
        t.fit({"idx": idx, "targets": targets}, epochs=epochs)

    times = interleaved({"hand": hand, "warmfit": trainer}, repeats, device)
    r = {k: median(v) for k, v in times.items()}
    ratios = paired(times["warmfit"], times["hand"])
    r["ratio"] = median(ratios)
    r["ratio_q1"], r["ratio_q3"] = quartiles(ratios)
    r["ratio_min"] = min(times["warmfit"]) / min(times["hand"])
    r["steps"] = float(epochs * -(-n // BATCH))
    return r


def run(
    repeats: int = 11, device: torch.device | str = "cpu", *, scale: float = 1.0, write: bool = True
) -> dict[str, float]:
    device = torch.device(device)
    torch.set_num_threads(1)
    n = max(BATCH, int(512 * scale))
    r = case(n, epochs=1, repeats=repeats, device=device)
    target = paired_verdict(r, 1.03)
    print(
        f"char LM, bf16 + accumulate={ACCUMULATE} + clip + EMA, {r['steps']:.0f} steps: hand "
        f"{r['hand']:.3f}s, warmfit {r['warmfit']:.3f}s; warmfit / hand, median of paired "
        f"ratios {r['ratio']:.3f}x (quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}; "
        f"target {target}); ratio of the fastest runs {r['ratio_min']:.3f}x"
    )
    if write:
        body = (
            f"## The full training step: bf16 + accumulation + clipping + EMA vs a "
            f"hand-written loop ({device_label(device)}, 1 thread)\n\n"
            "| case | hand-written loop | warmfit | **warmfit / hand**: median of paired "
            "ratios (quartiles) | target | ratio of the fastest runs |\n"
            "|---|---|---|---|---|---|\n"
            f"| char LM (examples/charlm.py), {r['steps']:.0f} steps of 32 in 4 micro-batches "
            f"| {r['hand']:.3f} s | {r['warmfit']:.3f} s | **{r['ratio']:.3f}×** "
            f"({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}) | {target} | {r['ratio_min']:.3f}× |\n\n"
            "The same model, data, AdamW groups, warm-up + cosine, bf16 autocast around each "
            "micro-batch, loss weights, clipping and EMA arithmetic; both build their model "
            "and optimizer inside the timing and read each step's loss once. "
            f"{repeats} interleaved rounds after a warm-up run each; the headline is the "
            "median of the per-round ratios (read as in the step-overhead section)."
        )
        write_section(section("training-step", device), body, command(SCRIPT, device))
    return r


def main() -> None:
    args, device = cli(__doc__)
    if args.quick:
        run(repeats=2, device=device, scale=0.125, write=False)
    else:
        run(device=device)


if __name__ == "__main__":
    main()
