"""Resume: restore cost, and time to the first resumed step at 1% and 99% of a large epoch.

A checkpoint is taken after one step, then copied with its cursor moved to 1% and to
99% of the epoch (the arrays are the same; only ``counters`` changes), so both resumes
read exactly the same bytes and differ only in where the epoch goes on.

Each round times seven blocks, in an order shuffled afresh every round (seeded, so the
same from run to run; the first round is a warm-up, not counted):

- ``warmfit 1%``, ``warmfit 99%``: ``Trainer(..., run_dir=...)`` (finds, verifies and
  loads the newest checkpoint), then ``fit()`` up to the end of the first resumed step.
  Parts timed inside the block: the model factory (``build``), ``read_checkpoint``
  (``read``, timed where the run directory calls it) and ``restore``: construction
  minus the factory, i.e. find, verify, read and load the whole training state.
- ``warmfit 99% evicted``: the same with the tensor file dropped from the page cache.
- ``hand 99%``, ``hand 99% evicted``: a hand-written resume of the same tensor file:
  build the model and Adam (``build``); ``safetensors.numpy.load_file`` (``read``: the
  1.2× target's reference); ``load_state_dict`` into model and Adam (``restore`` =
  read + load, nothing verified); one step on the batch at the cursor, the epoch's
  order drawn with ``torch.randperm``.
- ``raw``, ``raw evicted``: the file's bytes alone, ``readinto`` a buffer already in
  memory (nothing allocated or parsed): what any reader of this file pays at least.

Every "of which" figure is a part of the block it belongs to, timed in the same run,
so a part never exceeds its whole: the reference read is the hand-written restore's
own ``load_file``, warmfit's ``read_checkpoint`` its restore's own read. Times are
medians over the rounds; every ratio is the median of the ratios within each round
(the two sides ran seconds apart, so the machine's other work hits both alike), given
with its interquartile range.

Measurement conditions, each checked and reported (``--uncontrolled`` runs the rounds
without the first two and prints the page faults and spreads; it writes no report):

- Memory allocator. glibc's malloc is pinned (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``,
  its initial threshold, which also stops it raising the threshold as large blocks are
  freed): every large buffer a block allocates is a fresh ``mmap``, unmapped when
  freed, so each block pays for the pages it touches, as a resume in a fresh process
  does. Without it, a block reused pages an earlier block had freed or whose range
  numpy had asked to back with huge pages, depending on the order of the blocks: one
  ``load_file`` of the 145 MiB file took from about 400 to 39,000 minor page faults
  from round to round, and the hand-written restore, timed apart, came out faster than
  ``load_file`` alone. Pinned, each block's count is the same in every round.
- Host memory. On a virtual machine with free page reporting (virtio-balloon), memory
  left free for a few seconds is handed back to the host in 2 MiB blocks, and touching
  it again costs host-side faults — most for huge pages, which ``read_checkpoint``'s
  numpy arrays use. Which block got such memory was chance of timing, and warmfit's
  read varied tenfold from round to round. Before each block, 1 GiB (at most) is
  touched in huge pages and freed, outside the timing, so every block takes
  host-backed memory, as on a machine without page reporting; the cost that step
  avoids is measured and reported (:func:`host_reclaim_cost`).
- Page cache. An evicted block first ``fsync``s the file and drops its pages with
  ``posix_fadvise(POSIX_FADV_DONTNEED)``; every block records the share of the file's
  pages resident at its start (``mincore``) and the bytes the process read from the
  disk during it (``ru_inblock``), and the report states both.

GPU (``--device cuda``): the same code with the model, the optimizer state and the data
set on the GPU (``Trainer(device="cuda")``; the data set is moved there before timing).
The hand-written resume reads with ``safetensors.torch.load_file(..., device="cuda")``,
which lands the tensors on the GPU where training needs them; ``read_checkpoint`` reads
into host memory, as warmfit's restore does before copying the state to the GPU (which
the restore includes, with moving the freshly built model there). The replay baseline
iterates the host DataLoader without copying the skipped batches to the GPU (a lower
bound of replay). Each timed block ends with ``torch.cuda.synchronize()``, and starts
with the CUDA caching allocator emptied (as in a fresh process). The process-start rows
include initialising CUDA.

Prints the figures and rewrites its section of BENCHMARKS.md (not with ``--quick`` or
``--uncontrolled``).

    .venv/bin/python benchmarks/bench_resume.py [--quick] [--uncontrolled]
        [--device {cpu,cuda}] [--rounds-json PATH]
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import mmap
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import xxhash
from safetensors.numpy import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import (
    ROOT,
    cli,
    command,
    device_label,
    median,
    paired,
    quartiles,
    section,
    sync,
    write_section,
)

import warmfit
import warmfit.rundir
from warmfit.checkpoint import TENSOR_FILE, read_checkpoint
from warmfit.rundir import RunDir

SCRIPT = "bench_resume.py"
_IO_CHUNK = 64 << 20


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


# -- measurement conditions ------------------------------------------------------------
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_allocator() -> bool:
    """Fix glibc's mmap threshold at its initial 128 KiB (``mallopt``), which also
    turns off its raising of the threshold as large blocks are freed: from then on
    every allocation of 128 KiB or more is a fresh ``mmap``, unmapped when freed, so a
    timed block pays for the pages it touches whatever ran before it, as in a fresh
    process. Returns whether it took effect (False off glibc)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident(path: Path) -> float:
    """The share of ``path``'s pages in the page cache, by ``mincore`` on a mapping of
    it that touches no page (NaN where that is unavailable)."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return float("nan")
    size = path.stat().st_size
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        return float("nan")
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return float("nan")
        return sum(v & 1 for v in vec) / pages
    finally:
        libc.munmap(addr, size)


def _counters() -> tuple[int, int]:
    """This process's minor page faults, and bytes read from block devices so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_inblock * 512


def fresh_heap() -> None:
    """Collect garbage and hand freed memory back to the OS (glibc's malloc_trim). On a
    GPU, the CUDA caching allocator is emptied too (a resume runs in a fresh process,
    whose allocator holds nothing)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_initialized():  # only where this process uses the GPU
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (no root needed): ``fsync`` first, since
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` leaves dirty pages. The kernel may still keep
    pages (mapped ones, for one): :func:`resident` says what it did."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the timed blocks ------------------------------------------------------------------
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


@contextlib.contextmanager
def _timed_reads(clock: dict) -> Iterator[None]:
    """Time each ``read_checkpoint`` the run directory makes (into ``clock["read"]``,
    its minor page faults into ``clock["read_faults"]``)."""
    real = warmfit.rundir.read_checkpoint

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        f0, _ = _counters()
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            clock["read"] = clock.get("read", 0.0) + time.perf_counter() - t0
            clock["read_faults"] = clock.get("read_faults", 0) + _counters()[0] - f0

    warmfit.rundir.read_checkpoint = timed
    try:
        yield
    finally:
        warmfit.rundir.read_checkpoint = real


def resume_to_first_step(cfg: dict, run_dir: Path, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Construct a Trainer on ``run_dir`` and run up to the end of its first step.
    Returns the times (whole and parts) and the first batch's rows (to check nothing
    was replayed)."""
    device = cfg.get("device", "cpu")
    clock: dict[str, float] = {}
    with _timed_reads(clock):
        t0 = time.perf_counter()
        trainer = trainer_for(cfg, run_dir, clock)
        sync(device)
        t1 = time.perf_counter()
    if "read" not in clock:
        raise RuntimeError(
            "the resume did not read through warmfit.rundir.read_checkpoint: update "
            "_timed_reads, or the read part of the restore goes untimed"
        )
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
        "total": t2 - t0,
        "construct": t1 - t0,
        "step": t2 - t1,
        "build": clock["build"],
        "restore": t1 - t0 - clock["build"],
        "read": clock["read"],
        "read_faults": clock["read_faults"],
        "x": seen["x"],
        "offset": offset,
        "keep": trainer,
    }


def st_read(tfile: Path, device: torch.device | str = "cpu") -> dict:
    """The reference read, with safetensors: ``safetensors.numpy.load_file`` on the CPU;
    ``safetensors.torch.load_file(..., device=...)`` onto a GPU."""
    if torch.device(device).type == "cpu":
        return load_file(str(tfile))
    return safetensors.torch.load_file(str(tfile), device=str(device))


def load_into(arrays: dict, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """What a hand-written restore does with what it read: ``load_state_dict`` into the
    model (a copy into its parameters) and into Adam (which keeps the arrays it is
    given: same dtype and device)."""

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


def hand_resume(cfg: dict, tfile: Path, x: torch.Tensor, y: torch.Tensor, k: int) -> dict:
    """A hand-written resume of ``tfile``, timed whole and in parts: build the model and
    Adam; read with safetensors; ``load_state_dict``; one step on batch ``k`` of the
    epoch (drawn with ``torch.randperm``). Verifies nothing; restores weights and Adam
    only (no random streams, cursor or schedules)."""
    device = torch.device(cfg.get("device", "cpu"))
    n, bs = cfg["n"], cfg["bs"]
    t0 = time.perf_counter()
    model = mlp(cfg["d"], cfg["hidden"], cfg["layers"], cfg["out"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync(device)
    t1 = time.perf_counter()
    f0, _ = _counters()
    arrays = st_read(tfile, device)
    sync(device)
    t2 = time.perf_counter()
    read_faults = _counters()[0] - f0
    load_into(arrays, model, opt)
    sync(device)
    t3 = time.perf_counter()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    idx = perm[k * bs : (k + 1) * bs].to(device)
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(device)
    t4 = time.perf_counter()
    return {
        "total": t4 - t0,
        "build": t1 - t0,
        "read": t2 - t1,
        "restore": t3 - t1,
        "step": t4 - t3,
        "read_faults": read_faults,
        "keep": (model, opt, arrays),
    }


def raw_read(tfile: Path, buf: np.ndarray) -> dict:
    """The file's bytes alone: ``readinto`` a buffer already in memory."""
    t0 = time.perf_counter()
    with open(tfile, "rb", buffering=0) as f:
        view = memoryview(buf)
        done = 0
        while n := f.readinto(view[done : done + _IO_CHUNK]):
            done += n
    return {"total": time.perf_counter() - t0}


def back_free_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory in huge pages, then free it, so that the free
    memory the next block takes is backed by the machine's host. On a virtual machine
    with free page reporting (virtio-balloon; this one reports free 2 MiB blocks), memory
    left free for a couple of seconds is handed back to the host, and the first touch of
    it again costs host-side faults: a block that got such memory took several times as
    long as one that did not, by chance of timing (:func:`host_reclaim_cost` shows it).
    Touched and freed just before, every block starts alike, as on a machine without
    it."""
    a = np.empty(nbytes, dtype=np.uint8)  # numpy asks for huge pages for large arrays
    a[:: mmap.PAGESIZE] = 1
    del a


def host_reclaim_cost(nbytes: int, idle: float = 3.0, repeats: int = 3) -> tuple[float, float]:
    """Seconds to allocate and touch ``nbytes`` in huge pages right after freeing as
    much (median of ``repeats``), and after ``idle`` seconds with it free."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for waited in (False, True):
            back_free_memory(nbytes)
            if waited:
                time.sleep(idle)
            t0 = time.perf_counter()
            back_free_memory(nbytes)
            times[waited].append(time.perf_counter() - t0)
    return median(times[False]), median(times[True])


def run_block(fn: Callable[[], dict], watch: Path, evicted: bool, backed: int) -> dict:
    """Run one timed block from the same starting point every time: freed memory handed
    back, ``backed`` bytes of free memory backed by the host (:func:`back_free_memory`)
    and, if ``evicted``, ``watch`` dropped from the page cache. Adds the share of
    ``watch`` resident at the start, and the minor page faults and bytes read from the
    disk during the block. What the block built is freed after, outside its timing."""
    fresh_heap()
    if backed:
        back_free_memory(backed)
    if evicted:
        evict(watch)
    share = resident(watch)
    f0, io0 = _counters()
    r = fn()
    f1, io1 = _counters()
    r.pop("keep", None)
    r.update(resident=share, faults=f1 - f0, disk_bytes=io1 - io0)
    return r


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
import json, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import bench_resume as b
t_imports = time.time()
cfg = json.loads({cfg!r})
x, y = b.make_data(cfg["n"], cfg["d"], cfg["out"])
x, y = x.to(cfg["device"]), y.to(cfg["device"])
t_data = time.time()
r = b.resume_to_first_step(cfg, __import__("pathlib").Path({run!r}), x, y)
print(json.dumps({{"imports": t_imports, "data": t_data, "end": time.time(),
    "construct": r["construct"], "read": r["read"], "step": r["step"]}}))
"""


def from_process_start(cfg: dict, run_dir: Path) -> dict[str, float]:
    """Wall time from launching a fresh interpreter to the end of its first resumed
    step (on a GPU, initialising CUDA and placing the data set there included), and
    its parts: interpreter start and imports, making the data set (the same at both
    offsets), Trainer construction, its read, and ``fit()`` to the end of the step."""
    code = _CHILD.format(bench=str(Path(__file__).parent), cfg=json.dumps(cfg), run=str(run_dir))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "total": out["end"] - start,
        "imports": out["imports"] - start,
        "data": out["data"] - out["imports"],
        "construct": out["construct"],
        "read": out["read"],
        "step": out["step"],
    }


def _hash_speed(buf: np.ndarray, name: str, repeats: int = 3) -> float:
    """Bytes per second of one checksum over ``buf``, median of ``repeats``."""
    make = {"xxh3_128": xxhash.xxh3_128, "sha256": __import__("hashlib").sha256}[name]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        make(memoryview(buf)).digest()
        times.append(time.perf_counter() - t0)
    return buf.nbytes / median(times)


def page_reporting() -> float:
    """1.0 if a virtio-balloon device here offers free page reporting (the host takes
    back memory the guest leaves free), 0.0 if not, NaN if this cannot be told."""
    devices = Path("/sys/bus/virtio/devices")
    if not devices.is_dir():
        return float("nan")
    for dev in devices.iterdir():
        try:
            kind = (dev / "device").read_text().strip()
            features = (dev / "features").read_text().strip()
        except OSError:
            continue
        if int(kind, 16) == 5:  # balloon; feature bit 5: VIRTIO_BALLOON_F_REPORTING
            return 1.0 if len(features) > 5 and features[5] == "1" else 0.0
    return 0.0


def _thp() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


BLOCKS = (
    "warmfit 1%",
    "warmfit 99%",
    "warmfit 99% evicted",
    "hand 99%",
    "hand 99% evicted",
    "raw",
    "raw evicted",
)


def run(
    n: int = 1_000_000,
    d: int = 32,
    hidden: int = 2048,
    layers: int = 4,
    out: int = 10,
    bs: int = 128,
    repeats: int = 15,
    subprocess_repeats: int = 3,
    device: torch.device | str = "cpu",
    *,
    pin: bool = True,
    back: bool = True,
    idle: float = 3.0,
    write: bool = True,
    rounds_json: Path | None = None,
) -> dict[str, float]:
    """Time the blocks (see the module's docstring); ``pin``: pin glibc's allocator
    first (:func:`pin_allocator`; it stays pinned for the rest of the process);
    ``back``: back free memory by the host before each block
    (:func:`back_free_memory`); ``idle``: the pause of :func:`host_reclaim_cost`;
    ``rounds_json``: also write every round's figures there, in the order run."""
    device = torch.device(device)
    torch.set_num_threads(1)
    pinned = pin_allocator() if pin else False
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
        del tensors
        files = {label: RunDir(dirs[label]).latest() / TENSOR_FILE for label in dirs}
        tfile = files["99%"]  # every 99% block reads this one file
        file_bytes = tfile.stat().st_size
        buf = np.ones(file_bytes, dtype=np.uint8)  # the raw read's buffer, in memory
        # More than a block allocates (the read arrays, the model, its gradients, Adam's
        # temporaries: about 3.5x the file), at most 1 GiB.
        backed = min(1 << 30, max(16 << 20, 6 * file_bytes)) if back else 0

        perm = warmfit.data.epoch_permutation(0, 0, n)
        expected = {
            "1%": x[torch.from_numpy(perm[k_lo * bs : k_lo * bs + bs]).to(device)],
            "99%": x[torch.from_numpy(perm[k_hi * bs : k_hi * bs + bs]).to(device)],
        }

        def warmfit_block(label: str) -> Callable[[], dict]:
            def fn() -> dict:
                r = resume_to_first_step(cfg, dirs[label], x, y)
                assert r["offset"] == (k_lo if label == "1%" else k_hi) * bs
                assert torch.equal(r.pop("x"), expected[label]), (
                    "the first batch is not the resume point"
                )
                return r

            return fn

        blocks: dict[str, tuple[Callable[[], dict], Path, bool]] = {
            "warmfit 1%": (warmfit_block("1%"), files["1%"], False),
            "warmfit 99%": (warmfit_block("99%"), tfile, False),
            "warmfit 99% evicted": (warmfit_block("99%"), tfile, True),
            "hand 99%": (lambda: hand_resume(cfg, tfile, x, y, k_hi), tfile, False),
            "hand 99% evicted": (lambda: hand_resume(cfg, tfile, x, y, k_hi), tfile, True),
            "raw": (lambda: raw_read(tfile, buf), tfile, False),
            "raw evicted": (lambda: raw_read(tfile, buf), tfile, True),
        }
        rounds: dict[str, list[dict]] = {name: [] for name in BLOCKS}
        log: list[dict] = []
        for rep in range(repeats + 1):  # the first round is a warm-up
            # A fresh order every round (seeded: the same from run to run), so that no
            # block always follows the same one: what a block leaves behind (memory just
            # freed, a file just read) changes the next one's time.
            order = list(BLOCKS)
            random.Random(rep).shuffle(order)
            for name in order:
                fn, watch, evicted = blocks[name]
                r = run_block(fn, watch, evicted, backed)
                log.append({"round": rep, "block": name, **r})
                if rep:
                    rounds[name].append(r)

        replay = {}
        for label, k in (("1%", k_lo), ("99%", k_hi)):
            t0 = time.perf_counter()
            replay_skip(x_host, y_host, bs, k)
            replay[label] = time.perf_counter() - t0

        speeds = {name: _hash_speed(buf, name) for name in ("xxh3_128", "sha256")}
        touch_fresh, touch_idle = host_reclaim_cost(file_bytes, idle)

        proc: dict[str, list[dict]] = {"1%": [], "99%": []}
        for i in range(subprocess_repeats):  # alternating which offset goes first
            for label in ("1%", "99%") if i % 2 == 0 else ("99%", "1%"):
                proc[label].append(from_process_start(cfg, dirs[label]))
                log.append({"round": "process start", "block": label, **proc[label][-1]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def series(block: str, part: str = "total") -> list[float]:
        return [r[part] for r in rounds[block]]

    r: dict[str, float] = {
        "n": float(n),
        "steps_per_epoch": float(steps),
        "params": float(sum(p.numel() for p in mlp(d, hidden, layers, out).parameters())),
        "file_bytes": float(file_bytes),
        "rounds": float(repeats),
        "pinned": float(pinned),
        "backed": float(backed),
        "touch fresh": touch_fresh,
        "touch idle": touch_idle,
        "idle": idle,
        "page reporting": page_reporting(),
        "replay 1%": replay["1%"],
        "replay 99%": replay["99%"],
        **{
            f"process {label}{stat}": (
                f([p["total"] for p in proc[label]]) if proc[label] else float("nan")
            )
            for label in ("1%", "99%")
            for stat, f in (("", median), (" min", min), (" max", max))
        },
        **{
            f"process {label}: {part}": (
                median([p[part] for p in proc[label]]) if proc[label] else float("nan")
            )
            for label in ("1%", "99%")
            for part in ("imports", "data", "construct", "read", "step")
        },
        "xxh3_128 B/s": speeds["xxh3_128"],
        "sha256 B/s": speeds["sha256"],
    }
    parts = ("total", "build", "read", "restore", "step", "read_faults", "faults", "disk_bytes")
    for block, rs in rounds.items():
        for part in parts:
            if rs and part in rs[0]:
                r[f"{block}: {part}"] = median(series(block, part))
        if rs:
            shares = series(block, "resident")
            r[f"{block}: resident min"], r[f"{block}: resident max"] = min(shares), max(shares)
            for part in ("disk_bytes", "read_faults"):
                if part in rs[0]:
                    xs = series(block, part)
                    r[f"{block}: {part} min"], r[f"{block}: {part} max"] = min(xs), max(xs)
    # Ratios: paired within each round, then the median and the quartiles over rounds.
    ratios = {
        "offset": ("warmfit 99%", "total", "warmfit 1%", "total"),
        "offset step": ("warmfit 99%", "step", "warmfit 1%", "step"),
        "hand restore / read": ("hand 99%", "restore", "hand 99%", "read"),
        "restore / read": ("warmfit 99%", "restore", "hand 99%", "read"),
        "read_checkpoint / read": ("warmfit 99%", "read", "hand 99%", "read"),
        "restore / hand restore": ("warmfit 99%", "restore", "hand 99%", "restore"),
        "resume / hand resume": ("warmfit 99%", "total", "hand 99%", "total"),
        "raw / read": ("raw", "total", "hand 99%", "read"),
    }
    for name, (a, pa, b, pb) in list(ratios.items()):
        if not name.startswith("offset"):
            ratios[f"{name} evicted"] = (f"{a} evicted", pa, f"{b} evicted", pb)
    for name, (a, pa, b, pb) in ratios.items():
        if rounds[a]:
            xs = paired(series(a, pa), series(b, pb))
            r[f"x {name}"] = median(xs)
            r[f"x {name} q1"], r[f"x {name} q3"] = quartiles(xs)
    r["x replay"] = (r["hand 99%: total"] + replay["99%"]) / r["warmfit 99%: total"]
    _print(r)
    if rounds_json is not None:
        rounds_json.write_text(json.dumps({"summary": r, "rounds": log}, indent=1) + "\n")
    if write:
        write_section(
            section("resume", device),
            _body(r, subprocess_repeats, bs, device),
            command(SCRIPT, device),
        )
    return r


def _print(r: dict[str, float]) -> None:
    for k, v in r.items():
        if not k.startswith("x ") and k.endswith(("total", "build", "read", "restore", "step")):
            print(f"  {k:34s} {v:.3f}s")
    for k in ("read_faults", "faults", "disk_bytes"):
        for block in BLOCKS:
            if f"{block}: {k}" in r:
                lo, hi = r.get(f"{block}: {k} min"), r.get(f"{block}: {k} max")
                spread = f" (min {lo:.0f}, max {hi:.0f})" if lo is not None else ""
                print(f"  {block}: {k} {r[f'{block}: {k}']:.0f}{spread}")
    for block in BLOCKS:
        if f"{block}: resident min" in r:
            print(
                f"  {block}: resident at start {r[f'{block}: resident min']:.0%}-"
                f"{r[f'{block}: resident max']:.0%}, read from disk "
                f"{r[f'{block}: disk_bytes min'] / 2**20:.0f}-"
                f"{r[f'{block}: disk_bytes max'] / 2**20:.0f} MiB"
            )
    for k, v in r.items():
        if k.startswith("x ") and not k.endswith(("q1", "q3")):
            q = f" (quartiles {r[k + ' q1']:.2f}-{r[k + ' q3']:.2f})" if k + " q1" in r else ""
            print(f"{k[2:]}: {v:.2f}x{q}")
    print(
        f"allocator pinned: {bool(r['pinned'])}; free memory backed before each block: "
        f"{r['backed'] / 2**20:.0f} MiB; touching the file's size in fresh huge pages: "
        f"{r['touch fresh']:.3f}s right after a free, {r['touch idle']:.3f}s after "
        f"{r['idle']:g} s idle"
    )


def _body(
    r: dict[str, float],
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
    into = "; into host memory" if cuda else ""
    start = "imports, CUDA initialisation and data set" if cuda else "imports and data set"
    skip = " (host batches, not copied to the GPU)" if cuda else ""

    def t(key: str) -> str:
        return f"{r[key]:.3f} s" if key in r else "—"

    def x(name: str, bold: bool = False) -> str:
        if f"x {name}" not in r:
            return "—"
        v = f"{r[f'x {name}']:.2f}×"
        spread = f" ({r[f'x {name} q1']:.2f}–{r[f'x {name} q3']:.2f})"
        return (f"**{v}**" if bold else v) + spread

    def verdict(name: str, target: float) -> str:
        q1, q3 = r.get(f"x {name} q1", float("nan")), r.get(f"x {name} q3", float("nan"))
        if q3 <= target:
            return "meets it"
        if q1 > target:
            return "misses it"
        return "its quartiles straddle it"

    def p(part: str) -> str:
        return f"{r[f'process 1%: {part}']:.2f} / {r[f'process 99%: {part}']:.2f}"

    def pct(v: float) -> str:
        return f"{v:.0%}"

    def span(block: str, what: str) -> str:
        lo, hi = r[f"{block}: {what} min"], r[f"{block}: {what} max"]
        if what == "resident":
            return pct(lo) if pct(lo) == pct(hi) else f"{pct(lo)}–{pct(hi)}"
        a, b = f"{lo / 2**20:.0f}", f"{hi / 2**20:.0f}"
        return f"{a} MiB" if a == b else f"{a}–{b} MiB"

    hw, he, ww, we = "hand 99%", "hand 99% evicted", "warmfit 99%", "warmfit 99% evicted"
    restore_table = (
        f"| restore (the same {mib:.0f} MiB tensor file) | in page cache | × `load_file` | "
        "evicted first | × `load_file` |\n|---|---|---|---|---|\n"
        "| the file's bytes alone: `readinto` a buffer already in memory (nothing allocated "
        f"or parsed) | {t('raw: total')} | {x('raw / read')} | {t('raw evicted: total')} | "
        f"{x('raw / read evicted')} |\n"
        f"| safetensors {ref}, the reference (the hand-written restore's own read) | "
        f"{t(hw + ': read')} | 1.00× | {t(he + ': read')} | 1.00× |\n"
        "| hand-written restore: `load_file` + `load_state_dict` of model and Adam, nothing "
        f"verified | {t(hw + ': restore')} | {x('hand restore / read')} | "
        f"{t(he + ': restore')} | {x('hand restore / read evicted')} |\n"
        "| **warmfit restore: find, verify, read, load the whole state** | "
        f"{t(ww + ': restore')} | {x('restore / read', True)} | {t(we + ': restore')} | "
        f"{x('restore / read evicted', True)} |\n"
        f"| of which `read_checkpoint` (XXH3-128 verified in the same pass{into}) | "
        f"{t(ww + ': read')} | {x('read_checkpoint / read')} | {t(we + ': read')} | "
        f"{x('read_checkpoint / read evicted')} |"
    )
    resume_table = (
        "| to the first resumed step | at 1% | at 99% | at 99%, evicted first |\n"
        "|---|---|---|---|\n"
        "| **warmfit: Trainer construction → end of first step** | "
        f"{t('warmfit 1%: total')} | {t(ww + ': total')} | {t(we + ': total')} |\n"
        f"| of which the model factory (building the model) | {t('warmfit 1%: build')} | "
        f"{t(ww + ': build')} | {t(we + ': build')} |\n"
        f"| of which warmfit restore | {t('warmfit 1%: restore')} | {t(ww + ': restore')} | "
        f"{t(we + ': restore')} |\n"
        "| of which `fit()` from its call to the end of the first step (where a replay "
        f"would show) | {t('warmfit 1%: step')} | {t(ww + ': step')} | {t(we + ': step')} |\n"
        "| hand-written resume: build model and Adam, `load_file`, `load_state_dict`, one "
        f"step (verifies nothing; weights and Adam only) | | {t(hw + ': total')} | "
        f"{t(he + ': total')} |\n"
        f"| of which building the model and Adam | | {t(hw + ': build')} | "
        f"{t(he + ': build')} |\n"
        f"| of which its restore (`load_file` + `load_state_dict`) | | {t(hw + ': restore')} "
        f"| {t(he + ': restore')} |\n"
        "| of which the epoch's order (`torch.randperm`) and one step | | "
        f"{t(hw + ': step')} | {t(he + ': step')} |\n"
        f"| warmfit from process start (fresh interpreter, {start} included; range in "
        f"parentheses) | {t('process 1%')} ({r['process 1% min']:.2f}–"
        f"{r['process 1% max']:.2f}) | {t('process 99%')} ({r['process 99% min']:.2f}–"
        f"{r['process 99% max']:.2f}) | |\n"
        "| replay baseline: the hand-written resume + iterate a DataLoader over the first k "
        f"batches{skip} | {r[hw + ': total'] + r['replay 1%']:.3f} s | "
        f"{r[hw + ': total'] + r['replay 99%']:.3f} s | |"
    )
    bullets = (
        f"- 99% / 1%: {x('offset', True)} from construction to the end of the first step; "
        f"{x('offset step')} for `fit()` alone, where replaying k batches would show "
        "(target ≈ 1: O(1) in the offset).\n"
        f"- warmfit restore / safetensors `load_file`: {x('restore / read', True)} in the "
        f"page cache, {x('restore / read evicted', True)} evicted first (target ≤ 1.2×: "
        f"{verdict('restore / read', 1.2)}; evicted first, "
        f"{verdict('restore / read evicted', 1.2)}); against the hand-written restore "
        f"{x('restore / hand restore')} and {x('restore / hand restore evicted')}.\n"
        "- Whole resume to the end of the first step / the hand-written resume: "
        f"{x('resume / hand resume')} ({x('resume / hand resume evicted')} evicted "
        "first).\n"
        f"- Replaying to the 99% offset instead costs {r['x replay']:.1f}× warmfit's "
        "resume (the replay baseline's 99% figure / warmfit's, in the table).\n"
        "- From process start, at 1% / 99% (medians of each part): interpreter start and "
        f"imports {p('imports')} s, making the data set {p('data')} s, Trainer "
        f"construction {p('construct')} s (of which `read_checkpoint` {p('read')} s), "
        f"`fit()` to the end of the first step {p('step')} s. A fresh interpreter runs "
        "with neither of the two conditions below fixed, so its read meets whatever "
        "memory the machine gives it.\n"
    )
    evicted_ok = all(
        r[f"{b}: resident max"] <= 0.01 and r[f"{b}: disk_bytes min"] >= 0.9 * r["file_bytes"]
        for b in (we, he, "raw evicted")
    )
    check = (
        "at the start of every evicted block "
        f"{span(we, 'resident')} (warmfit), {span(he, 'resident')} (hand-written) and "
        f"{span('raw evicted', 'resident')} (raw) of the file's pages were in the page "
        f"cache (`mincore`), and during it the process read {span(we, 'disk_bytes')}, "
        f"{span(he, 'disk_bytes')} and {span('raw evicted', 'disk_bytes')} from the disk "
        "(`ru_inblock`); at the start of the page-cache blocks "
        f"{span(ww, 'resident')}, {span(hw, 'resident')} and {span('raw', 'resident')} "
        f"were resident, and {span(ww, 'disk_bytes')}, {span(hw, 'disk_bytes')} and "
        f"{span('raw', 'disk_bytes')} were read from the disk"
    )
    raw_speed = r["file_bytes"] / r["raw evicted: total"] / 1e9
    cache_speed = r["file_bytes"] / r["raw: total"] / 1e9
    evicted = (
        '**What "evicted first" measures.** Before each such block the file is '
        "`fsync`ed and its pages dropped with `posix_fadvise(POSIX_FADV_DONTNEED)`. "
        f"Checked in every round: {check}. "
        + (
            "So the evicted columns are reads of the whole file from this machine's disk "
            f"(a virtual disk, whose host may cache below it): the raw read gets the file "
            f"at {raw_speed:.2f} GB/s from it, and at {cache_speed:.2f} GB/s from the page "
            "cache. warmfit reads the file with `read` calls straight into each array; "
            "safetensors maps it and copies each tensor out of the mapping, so its reads "
            "come through page faults and the kernel's read-ahead."
            if evicted_ok
            else "**The eviction did not fully take effect** in some rounds (see the "
            "figures above): the evicted columns partly measure reads from the page "
            "cache."
        )
    )
    rf, lf = r.get(ww + ": read_faults", float("nan")), r.get(hw + ": read_faults", float("nan"))
    xxh, sha = r["xxh3_128 B/s"], r["sha256 B/s"]
    where = (
        "Where the time goes: `read_checkpoint` reads the file once, straight into fresh "
        "numpy arrays, and checksums it with XXH3-128 in a second thread as the bytes "
        "arrive; loading then copies the weights into the model's parameters, while the "
        "Adam slots are handed to the optimizer as read (no copy). `load_file` copies each "
        "tensor out of a mapping of the file into memory it allocates. Minor page faults "
        f"per read (medians): `read_checkpoint` {rf:,.0f}, `load_file` {lf:,.0f} — numpy "
        "asks the kernel to back its arrays of 4 MiB and more with 2 MiB pages "
        f"(transparent huge pages here: `{_thp()}`), while `load_file`'s copies land in "
        "4 KiB pages. Checksums over the file's bytes "
        f"in memory, on this machine: XXH3-128 {xxh / 1e9:.1f} GB/s, SHA-256 (schema 1's "
        f"checksum) {sha / 1e9:.2f} GB/s — SHA-256 alone would take "
        f"{r['file_bytes'] / sha:.3f} s for this file."
    )
    how = (
        f"How measured: {r['rounds']:.0f} rounds after a warm-up round, one process, one "
        "torch thread; each round runs seven blocks (warmfit's resume at 1%, at 99%, at "
        "99% evicted first; the hand-written resume, in the page cache and evicted; the "
        "raw read, in the page cache and evicted) in a fresh order (seeded), so no block "
        "always follows the same one. "
        "Times are medians over the rounds. Every ratio (×) is the median over the rounds "
        "of the ratio within a round, its quartiles in parentheses: it is not the "
        "quotient of the two medians in the table, which can differ from it by the noise. "
        'Every "of which" figure is part of the same block as its whole, timed in the '
        "same run (the reference `load_file` is the hand-written restore's own read; "
        "`read_checkpoint` is timed inside warmfit's restore), so no part exceeds its "
        "whole in any round. Each row, part or whole, is its own median over the rounds, "
        "and medians do not add up: the parts' medians can sum to a little more or less "
        "than their whole's.\n\n"
        "Two conditions are fixed before every block, outside its timing. **The memory "
        "allocator**: glibc's malloc is pinned (`mallopt(M_MMAP_THRESHOLD, 128 KiB)`"
        + ("" if r["pinned"] else " — **not in this run**")
        + "), so every large buffer is a fresh mapping and each block pays for the memory "
        "it touches, as a resume in a fresh process does; left as it is, a block reuses "
        "memory earlier blocks freed, by their order, and its page faults change from "
        "round to round — which once made the hand-written restore, timed apart, look "
        "faster than the `load_file` it contains. **The host's memory**: "
        + (
            "this machine is a virtual machine that hands free memory back to its host in "
            "2 MiB blocks after a few seconds (virtio-balloon free page reporting): "
            if r["page reporting"] == 1
            else ""
        )
        + f"in this run, touching {mib:.0f} MiB of fresh huge pages took "
        f"{r['touch fresh']:.3f} s right after freeing as much and {r['touch idle']:.3f} s "
        f"after {r['idle']:g} s idle (medians of 3; how much the host takes back, and "
        "when, varies with its own load). Where memory left idle costs more to touch "
        "again, `read_checkpoint`, whose arrays are in huge pages, takes whatever time "
        "the chance of timing gives it; before each block "
        + (
            f"{r['backed'] / 2**20:.0f} MiB are touched in huge pages and freed"
            if r["backed"]
            else "nothing was done about it — **not in this run**"
        )
        + ", so every block takes memory the host backs, as on a machine without page "
        f"reporting. `{command(SCRIPT, device, '--uncontrolled')}` runs the same rounds "
        "with neither and prints the page faults and spreads (it writes no report). "
        f"The process-start figures are medians of {proc_repeats} fresh interpreters per "
        'offset, with neither; the replay skip is timed once per offset. The former "hand lower '
        'bound" row (a safetensors read plus building the model and taking a first step '
        "from scratch, timed apart and added) is gone: that first step allocated Adam's "
        "two moment buffers anew, which a resume loads, so it counted the optimizer state "
        "twice and was no lower bound; the hand-written resume above is timed as one "
        "block."
    )
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
        f"{restore_table}\n\n{resume_table}\n\n{bullets}\n{evicted}\n\n{where}\n\n{how}"
    )


def main() -> None:
    def options(parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument(
            "--uncontrolled",
            action="store_true",
            help="neither pin glibc's allocator nor back free memory by the host before "
            "each block (prints the page faults and spreads; no report)",
        )
        parser.add_argument(
            "--rounds-json",
            type=Path,
            metavar="PATH",
            help="also write every round's figures (times, page faults, residency) there",
        )

    args, device = cli(__doc__, options)
    controlled = not args.uncontrolled
    if args.quick:
        run(
            n=100_000,
            hidden=256,
            layers=2,
            bs=256,
            repeats=2,
            subprocess_repeats=1,
            device=device,
            pin=controlled,
            back=controlled,
            write=False,
            rounds_json=args.rounds_json,
        )
    else:
        run(
            device=device,
            pin=controlled,
            back=controlled,
            write=controlled,
            rounds_json=args.rounds_json,
        )


if __name__ == "__main__":
    main()
