"""Resume: time to the first resumed step at 1% and 99% of a large epoch.

A checkpoint is taken after one step, then copied with its cursor moved to 1% and to
99% of the epoch (the arrays are the same; only ``counters`` changes), so both resumes
read exactly the same bytes and differ only in where the epoch goes on. Timed:

- ``warmfit resume``: ``Trainer(..., run_dir=...)`` (finds, verifies and loads the
  newest checkpoint), then ``fit()`` up to the end of the first resumed step. In
  process, from Trainer construction; and from process start in a fresh interpreter
  (imports included).
- ``warmfit restore``: the part of that construction that is the resume itself — find,
  verify, read and load the whole training state — i.e. the construction minus the
  model factory's own time (building and initialising the model, which any resume
  does).
- ``safetensors read``: ``safetensors.numpy.load_file`` of the same tensor file (the
  target's reference), and ``read_checkpoint`` (warmfit's verified read of it).
- ``hand-written restore``: ``load_file`` then ``model.load_state_dict`` and
  ``optimizer.load_state_dict`` into a model that exists — what a hand-written resume
  does, without verifying anything.
- ``hand lower bound``: build the model and Adam + safetensors read + one step — what a
  hand-written resume that replays nothing cannot avoid.
- ``replay``: skipping to the offset the way Accelerate / HF Trainer do without a
  stored cursor: iterate a ``DataLoader(TensorDataset)`` over the first k batches.

GPU (``--device cuda``): the same code with the model, the optimizer state and the data
set on the GPU (``Trainer(device="cuda")``; the data set is moved there before timing).
The reference read and the hand-written restore read with
``safetensors.torch.load_file(..., device="cuda")``, which lands the tensors on the GPU
where training needs them; ``read_checkpoint`` reads into host memory, as warmfit's
restore does before copying the state to the GPU (which the restore row includes, with
moving the freshly built model there). The replay baseline iterates the host
DataLoader without copying the skipped batches to the GPU (a lower bound of replay).
Each timed block ends with ``torch.cuda.synchronize()``, and starts with the CUDA
caching allocator emptied (as in a fresh process). The process-start rows include
initialising CUDA. Rows of the ``resume-cuda`` section: the same rows as on the CPU,
with these readings.

Prints ratios and rewrites its section of BENCHMARKS.md (not with ``--quick``).

    python benchmarks/bench_resume.py [--quick] [--device {cpu,cuda}]
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors.numpy import load_file
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

import warmfit
from warmfit.checkpoint import TENSOR_FILE, read_checkpoint
from warmfit.rundir import RunDir

SCRIPT = "bench_resume.py"


def mlp(d: int, hidden: int, layers: int, out: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Linear(d, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, out))
    return nn.Sequential(*mods)


class _FirstStepDone(Exception):
    pass


def make_data(n: int, d: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, out, size=n))
    return x, y


def trainer_for(cfg: dict, run_dir: Path, clock: dict | None = None) -> warmfit.Trainer:
    """A Trainer on ``run_dir``; ``clock["build"]`` gets the model factory's time."""
    d, hidden, layers, out = cfg["d"], cfg["hidden"], cfg["layers"], cfg["out"]
    clock = {} if clock is None else clock

    def build() -> nn.Module:
        t0 = time.perf_counter()
        model = mlp(d, hidden, layers, out)
        clock["build"] = clock.get("build", 0.0) + time.perf_counter() - t0
        return model

    with contextlib.redirect_stdout(io.StringIO()):  # the one-line "resumed from ..."
        return warmfit.Trainer(
            build,
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
            loss="cross_entropy",
            batch_size=cfg["bs"],
            seed=0,
            run_dir=run_dir,
            verbose=0,
            device=cfg.get("device", "cpu"),
        )


def resume_to_first_step(cfg: dict, run_dir: Path, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Construct a Trainer on ``run_dir`` and run up to the end of its first step.
    Returns the times and the first batch's rows (to check nothing was replayed)."""
    device = cfg.get("device", "cpu")
    clock: dict[str, float] = {}
    t0 = time.perf_counter()
    trainer = trainer_for(cfg, run_dir, clock)
    sync(device)
    t1 = time.perf_counter()
    real = trainer._backend.train_step
    seen: dict = {}

    def first_step(batch):  # type: ignore[no-untyped-def]
        real(batch)
        seen["x"] = batch[0]
        raise _FirstStepDone

    trainer._backend.train_step = first_step
    with contextlib.suppress(_FirstStepDone):
        trainer.fit(x, y, epochs=1)
    sync(device)
    t2 = time.perf_counter()
    offset = trainer.counters.offset
    trainer.close()
    return {
        "construct": t1 - t0,
        "restore": t1 - t0 - clock["build"],
        "total": t2 - t0,
        "x": seen["x"],
        "offset": offset,
    }


def st_read(tfile: Path, device: torch.device | str = "cpu") -> dict:
    """The reference read, with safetensors: ``safetensors.numpy.load_file`` on the CPU;
    ``safetensors.torch.load_file(..., device=...)`` onto a GPU."""
    if torch.device(device).type == "cpu":
        return load_file(str(tfile))
    return safetensors.torch.load_file(str(tfile), device=str(device))


def hand_restore(
    tfile: Path, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device | str = "cpu"
) -> dict:
    """A hand-written resume's restore: read with safetensors (onto ``device``), load
    into model and Adam."""
    arrays = st_read(tfile, device)

    def tensor(v: np.ndarray | torch.Tensor) -> torch.Tensor:
        return v if torch.is_tensor(v) else torch.from_numpy(v)

    weights = {k[6:]: tensor(v) for k, v in arrays.items() if k.startswith("model/")}
    model.load_state_dict(weights)
    slots: dict[int, dict] = {}
    for k, v in arrays.items():
        if k.startswith("optim/"):
            _, i, slot = k.split("/", 2)
            slots.setdefault(int(i), {"step": torch.tensor(1.0)})[slot] = tensor(v)
    opt.load_state_dict({"state": slots, "param_groups": opt.state_dict()["param_groups"]})
    return arrays  # freed by the caller, outside the timing


def fresh_heap() -> None:
    """Collect garbage and hand freed memory back to the OS (glibc's malloc_trim), so
    that what a timed block allocates is paged in during the block, whatever ran before
    it: without this, a block that runs after a large free reuses mapped pages and
    looks up to 2× faster than the same block elsewhere in the round. On a GPU, the
    CUDA caching allocator is emptied for the same reason (a resume runs in a fresh
    process, whose allocator holds nothing)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_initialized():  # only where this process uses the GPU
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (no root needed): the next read comes
    from the disk, as after a reboot or on another machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def replay_skip(x: torch.Tensor, y: torch.Tensor, bs: int, k: int) -> None:
    """Reach batch k of an epoch by iterating a DataLoader over the first k batches
    (of host tensors; on a GPU run the skipped batches are not copied there)."""
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=True, generator=gen
    )
    it = iter(loader)
    for _ in range(k + 1):
        next(it)


_CHILD = """
import contextlib, io, json, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import bench_resume as b
cfg = json.loads({cfg!r})
x, y = b.make_data(cfg["n"], cfg["d"], cfg["out"])
x, y = x.to(cfg["device"]), y.to(cfg["device"])
t0 = time.time()
r = b.resume_to_first_step(cfg, __import__("pathlib").Path({run!r}), x, y)
print(json.dumps({{"end": time.time(), "data": t0}}))
"""


def from_process_start(cfg: dict, run_dir: Path) -> float:
    """Wall time from launching a fresh interpreter to the end of its first resumed
    step (on a GPU, initialising CUDA and placing the data set there included)."""
    code = _CHILD.format(bench=str(Path(__file__).parent), cfg=json.dumps(cfg), run=str(run_dir))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["end"] - start  # includes making the data: the same at both offsets


def run(
    n: int = 1_000_000,
    d: int = 32,
    hidden: int = 2048,
    layers: int = 4,
    out: int = 10,
    bs: int = 128,
    repeats: int = 7,
    subprocess_repeats: int = 3,
    device: torch.device | str = "cpu",
    *,
    write: bool = True,
) -> dict[str, float]:
    device = torch.device(device)
    torch.set_num_threads(1)
    cfg = dict(n=n, d=d, hidden=hidden, layers=layers, out=out, bs=bs, device=str(device))
    steps = -(-n // bs)
    k_lo, k_hi = max(1, steps // 100), steps - max(1, steps // 100)
    x_host, y_host = make_data(n, d, out)
    x, y = x_host.to(device), y_host.to(device)  # the same tensors on the CPU
    tmp = Path(tempfile.mkdtemp(prefix="warmfit-bench-resume-"))
    try:
        base = tmp / "base"
        with contextlib.closing(trainer_for(cfg, base)) as t:
            t.fit(x, y, steps=1)
            ckpt = t.run_dir.latest()
        tensors, state = read_checkpoint(ckpt)
        dirs = {}
        for label, k in (("1%", k_lo), ("99%", k_hi)):
            st = json.loads(json.dumps(state))
            st["counters"].update(offset=k * bs, global_step=k, samples_seen=k * bs)
            dirs[label] = tmp / f"at-{k}"
            with RunDir(dirs[label]) as rd:
                rd.save(tensors, st, step=k)
        tfile = RunDir(dirs["1%"]).latest() / TENSOR_FILE
        file_bytes = tfile.stat().st_size
        del tensors

        perm = warmfit.data.epoch_permutation(0, 0, n)
        expected = {
            "1%": x[torch.from_numpy(perm[k_lo * bs : k_lo * bs + bs]).to(device)],
            "99%": x[torch.from_numpy(perm[k_hi * bs : k_hi * bs + bs]).to(device)],
        }

        def build_and_step() -> None:
            torch.manual_seed(0)
            model = mlp(d, hidden, layers, out).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            idx = torch.from_numpy(perm[k_hi * bs : k_hi * bs + bs]).to(device)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times: dict[str, list[float]] = {
            k: []
            for k in (
                "warmfit 1%",
                "warmfit 99%",
                "construct 1%",
                "construct 99%",
                "restore 1%",
                "restore 99%",
                "restore 99% cold",
                "hand restore",
                "hand restore cold",
                "safetensors read",
                "read_checkpoint",
                "warmfit 99% cold",
                "safetensors read cold",
                "read_checkpoint cold",
                "build + step",
            )
        }

        def timed(fn: Callable[[], object], cold: Path | None = None) -> float:
            """Time ``fn`` from the same starting point every time: freed memory
            returned to the OS (so each variant pays for the pages it allocates) and,
            for ``cold``, that file evicted from the page cache."""
            fresh_heap()
            if cold is not None:
                evict(cold)
            t0 = time.perf_counter()
            result = fn()
            sync(device)
            elapsed = time.perf_counter() - t0
            del result  # freeing what it read is not part of reading it
            return elapsed

        for rep in range(repeats + 1):  # the first round is a warm-up
            rows = {}
            for label in ("1%", "99%"):
                fresh_heap()
                r = resume_to_first_step(cfg, dirs[label], x, y)
                assert r["offset"] == (k_lo if label == "1%" else k_hi) * bs
                assert torch.equal(r["x"], expected[label]), (
                    "the first batch is not the resume point"
                )
                rows[f"warmfit {label}"] = r["total"]
                rows[f"construct {label}"] = r["construct"]
                rows[f"restore {label}"] = r["restore"]
            rows["safetensors read"] = timed(lambda: st_read(tfile, device))
            rows["read_checkpoint"] = timed(lambda: read_checkpoint(tfile.parent))
            rows["safetensors read cold"] = timed(lambda: st_read(tfile, device), tfile)
            rows["read_checkpoint cold"] = timed(lambda: read_checkpoint(tfile.parent), tfile)
            fresh_heap()
            evict(RunDir(dirs["99%"]).latest() / TENSOR_FILE)
            r = resume_to_first_step(cfg, dirs["99%"], x, y)
            rows["warmfit 99% cold"], rows["restore 99% cold"] = r["total"], r["restore"]
            model = mlp(d, hidden, layers, out).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            restore = functools.partial(hand_restore, tfile, model, opt, device)
            rows["hand restore"] = timed(restore)
            rows["hand restore cold"] = timed(restore, tfile)
            del model, opt, restore
            rows["build + step"] = timed(build_and_step)
            if rep:
                for k, v in rows.items():
                    times[k].append(v)

        replay = {}
        for label, k in (("1%", k_lo), ("99%", k_hi)):
            t0 = time.perf_counter()
            replay_skip(x_host, y_host, bs, k)
            replay[label] = time.perf_counter() - t0

        proc: dict[str, list[float]] = {"1%": [], "99%": []}
        for _ in range(subprocess_repeats):
            for label in ("1%", "99%"):
                proc[label].append(from_process_start(cfg, dirs[label]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = {k: median(v) for k, v in times.items()}
    lower = m["safetensors read"] + m["build + step"]
    r: dict[str, float] = {
        "n": float(n),
        "steps_per_epoch": float(steps),
        "params": float(sum(p.numel() for p in mlp(d, hidden, layers, out).parameters())),
        "file_bytes": float(file_bytes),
        **{f"t_{k}": v for k, v in m.items()},
        "t_hand_lower_bound": lower,
        "t_replay_skip 1%": replay["1%"],
        "t_replay_skip 99%": replay["99%"],
        "t_process 1%": median(proc["1%"]) if proc["1%"] else float("nan"),
        "t_process 99%": median(proc["99%"]) if proc["99%"] else float("nan"),
        "offset_ratio": m["warmfit 99%"] / m["warmfit 1%"],
        "read_ratio": m["read_checkpoint"] / m["safetensors read"],
        "read_ratio_cold": m["read_checkpoint cold"] / m["safetensors read cold"],
        "resume_vs_read_cold": m["warmfit 99% cold"] / m["safetensors read cold"],
        "t_hand_lower_bound_cold": m["safetensors read cold"] + m["build + step"],
        "resume_vs_lower_bound_cold": m["warmfit 99% cold"]
        / (m["safetensors read cold"] + m["build + step"]),
        "resume_vs_read": m["warmfit 99%"] / m["safetensors read"],
        "restore_vs_read": m["restore 99%"] / m["safetensors read"],
        "restore_vs_read_cold": m["restore 99% cold"] / m["safetensors read cold"],
        "restore_vs_hand": m["restore 99%"] / m["hand restore"],
        "restore_vs_hand_cold": m["restore 99% cold"] / m["hand restore cold"],
        "resume_vs_lower_bound": m["warmfit 99%"] / lower,
        "replay_ratio": (lower + replay["99%"]) / m["warmfit 99%"],
    }
    _print(r, repeats)
    if write:
        write_section(
            section("resume", device),
            _body(r, repeats, subprocess_repeats, bs, device),
            command(SCRIPT, device),
        )
    return r


def _print(r: dict[str, float], repeats: int) -> None:
    for k, v in r.items():
        if k.startswith("t_"):
            print(f"  {k[2:]:22s} {v:.3f}s")
    print(f"99% / 1% offset: {r['offset_ratio']:.2f}x (target ~1.0x: nothing replayed)")
    print(f"warmfit restore / safetensors read: {r['restore_vs_read']:.2f}x (target <= 1.2x)")
    print(f"cold: warmfit restore / safetensors read: {r['restore_vs_read_cold']:.2f}x")
    print(f"warmfit restore / hand-written restore: {r['restore_vs_hand']:.2f}x")
    print(f"cold: warmfit restore / hand-written restore: {r['restore_vs_hand_cold']:.2f}x")
    print(f"read_checkpoint / safetensors read: {r['read_ratio']:.2f}x")
    print(f"cold: read_checkpoint / safetensors read: {r['read_ratio_cold']:.2f}x")
    print(f"cold: resume (99%) / safetensors read: {r['resume_vs_read_cold']:.2f}x")
    print(f"cold: resume (99%) / hand lower bound: {r['resume_vs_lower_bound_cold']:.2f}x")
    print(f"resume (99%) / safetensors read: {r['resume_vs_read']:.2f}x")
    print(f"resume (99%) / hand lower bound: {r['resume_vs_lower_bound']:.2f}x")
    print(f"replay resume / warmfit resume at 99%: {r['replay_ratio']:.1f}x")


def _body(
    r: dict[str, float],
    repeats: int,
    proc_repeats: int,
    bs: int,
    device: torch.device | str = "cpu",
) -> str:
    mib = r["file_bytes"] / 2**20
    cuda = torch.device(device).type == "cuda"
    gpu = (
        " The model, the Adam state and the data set live on the GPU "
        '(`Trainer(device="cuda")`; the data set is placed there before timing), and every '
        "timed block ends with `torch.cuda.synchronize()`."
        if cuda
        else ""
    )
    gpu_read = (
        " On the GPU the reference read is `safetensors.torch.load_file(..., "
        'device="cuda")`, which lands the tensors on the GPU where training needs them; '
        "warmfit's restore reads into host memory and includes copying the state to the "
        "GPU (and moving the freshly built model there)."
        if cuda
        else ""
    )
    ref = "`load_file` to the GPU (`safetensors.torch`)" if cuda else "`load_file` (numpy)"
    hand = "`load_file` to the GPU" if cuda else "`load_file`"
    into = "; into host memory" if cuda else ""
    start = "imports, CUDA initialisation and data set" if cuda else "imports and data set"
    skip = " (host batches, not copied to the GPU)" if cuda else ""

    def t(k: str) -> str:
        return f"{r['t_' + k]:.3f} s"

    def x(k: str) -> str:
        return f"{r['t_' + k] / r['t_safetensors read']:.2f}×"

    def xc(k: str) -> str:
        return f"{r['t_' + k] / r['t_safetensors read cold']:.2f}×"

    return (
        "## Resume: restore cost, and time to the first resumed step at 1% and 99% of an "
        f"epoch ({device_label(device)})\n\n"
        f"A {r['n'] / 1e6:.0f}M-sample in-memory data set, batch {bs} "
        f"({r['steps_per_epoch']:.0f} steps per epoch), an MLP of "
        f"{r['params'] / 1e6:.1f}M parameters with Adam ({mib:.0f} MiB tensor file). The same "
        "checkpoint with its cursor at 1% and at 99% of the epoch is resumed: "
        "`Trainer(model_factory, ..., run_dir=...)` then `fit()` to the end of the first "
        "step; the first batch is checked to be the one at the cursor. Targets: the same "
        "time at both offsets (O(1): nothing replayed), and ≤ 1.2× the time of reading the "
        f"same tensors with safetensors.{gpu}\n\n"
        "**What the 1.2× target is read on.** *Warmfit restore* is the resume itself: "
        "find the newest intact checkpoint, verify its checksums, read it, and load the "
        "whole training state (weights, Adam slots, random streams, cursor, schedules, "
        "history) — Trainer construction minus the model factory's own time (building and "
        "initialising the model, which every resume does and no read replaces). The time "
        "from process start is reported too; it is dominated by `import torch` and by "
        f"building the model, which the target cannot mean.{gpu_read}\n\n"
        "| restore (same tensor file) | in page cache | × read | evicted first | × read |\n"
        "|---|---|---|---|---|\n"
        f"| safetensors {ref}, the reference | {t('safetensors read')} | 1.00× | "
        f"{t('safetensors read cold')} | 1.00× |\n"
        f"| hand-written restore: {hand} + `load_state_dict` of model and Adam, nothing "
        f"verified | {t('hand restore')} | {x('hand restore')} | {t('hand restore cold')} | "
        f"{xc('hand restore cold')} |\n"
        f"| **warmfit restore: find, verify, read, load the whole state** | "
        f"{t('restore 99%')} | **{x('restore 99%')}** | {t('restore 99% cold')} | "
        f"**{xc('restore 99% cold')}** |\n"
        f"| of which `read_checkpoint` (XXH3-128 verified in the same pass{into}) | "
        f"{t('read_checkpoint')} | {x('read_checkpoint')} | {t('read_checkpoint cold')} | "
        f"{xc('read_checkpoint cold')} |\n\n"
        "| to the first resumed step | at 1% | at 99% |\n|---|---|---|\n"
        f"| **warmfit: Trainer construction → end of first step** | {t('warmfit 1%')} | "
        f"{t('warmfit 99%')} |\n"
        f"| of which warmfit restore | {t('restore 1%')} | {t('restore 99%')} |\n"
        f"| warmfit, file not in the page cache (evicted first) | | {t('warmfit 99% cold')} |\n"
        f"| warmfit from process start (fresh interpreter, {start} included) | "
        f"{t('process 1%')} | {t('process 99%')} |\n"
        f"| hand lower bound: build + safetensors read + one step | | "
        f"{t('hand_lower_bound')} |\n"
        "| replay baseline: hand lower bound + iterate a DataLoader over the first k "
        f"batches{skip} | {r['t_hand_lower_bound'] + r['t_replay_skip 1%']:.3f} s | "
        f"{r['t_hand_lower_bound'] + r['t_replay_skip 99%']:.3f} s |\n\n"
        f"- 99% / 1%: **{r['offset_ratio']:.2f}×** (target ≈ 1: O(1) in the offset).\n"
        f"- warmfit restore / safetensors read: **{r['restore_vs_read']:.2f}×** in the page "
        f"cache, **{r['restore_vs_read_cold']:.2f}×** from the disk (target ≤ 1.2×); against "
        f"the hand-written restore {r['restore_vs_hand']:.2f}× and "
        f"{r['restore_vs_hand_cold']:.2f}×.\n"
        f"- Whole resume to the end of the first step / hand lower bound: "
        f"{r['resume_vs_lower_bound']:.2f}× ({r['resume_vs_lower_bound_cold']:.2f}× from the "
        "disk).\n"
        f"- Replaying to the 99% offset instead costs {r['replay_ratio']:.1f}× "
        "warmfit's resume.\n\n"
        "Where the time goes: `read_checkpoint` reads the file once, straight into fresh "
        "arrays, and checksums it with XXH3-128 (~15 GB/s) in a second thread as the bytes "
        "arrive; loading then copies the weights into the model's parameters, while the "
        "Adam slots are handed to the optimizer as they were read (no copy). Before "
        "schema 2 the checksum was SHA-256 (~1.5 GB/s), which bound the whole restore: "
        "`read_checkpoint` took 4.8× a safetensors read from the page cache, the restore "
        "more than that.\n\n"
        f"Medians of {repeats} interleaved repeats after a warm-up round (the file is in the "
        f"page cache), one torch thread; process-start figures are medians of {proc_repeats}; "
        "the replay skip is timed once per offset."
    )


def main() -> None:
    args, device = cli(__doc__)
    if args.quick:
        run(
            n=100_000,
            hidden=256,
            layers=2,
            bs=256,
            repeats=2,
            subprocess_repeats=1,
            device=device,
            write=False,
        )
    else:
        run(device=device)


if __name__ == "__main__":
    main()
