"""Shared by the benchmarks: the device option, timing side by side, and rewriting a
section of BENCHMARKS.md.

Each benchmark owns one section per device, delimited by HTML comments, and rewrites
only its rows with the command and machine that produced them. A run with
``--device cuda`` writes its own section, named with a ``-cuda`` suffix and placed right
after the CPU one, so the CPU rows stay. The paragraph between the ``gpu`` markers near
the top of BENCHMARKS.md says which GPU sections exist; it is rewritten with every
section.

On CUDA, kernels run asynchronously: every timed block ends with :func:`sync` (and
:func:`interleaved` synchronises before starting the clock too), so a time covers the
work it launched and nothing launched before it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "BENCHMARKS.md"

#: Benchmarks with a ``--device cuda`` variant, as (section, title) in report order.
GPU_SECTIONS = (
    ("step-overhead", "step overhead"),
    ("data-path", "in-memory data"),
    ("checkpoint", "checkpoint stall and write throughput"),
    ("resume", "resume"),
    ("memory", "memory"),
)


def machine() -> str:
    """The machine, and how busy it was: the load average when the run ended (1, 5
    and 15 minutes) — the cores are shared with other work, which is what makes single
    times move between runs."""
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    text = f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"
    with contextlib.suppress(OSError, AttributeError):
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        text += f"; load average {load} (1, 5, 15 min) as the run ended"
    return text


# -- device ----------------------------------------------------------------------------
def cli(
    doc: str | None, add_options: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, torch.device]:
    """A benchmark's command line: ``--quick`` (a tiny smoke run that writes no report),
    ``--device {cpu,cuda}`` (default cpu: where the model and the in-memory data live)
    and what ``add_options`` adds. Returns the arguments and the device."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no report")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model and data live (cuda: the GPU variant, its own section)",
    )
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args()
    return args, resolve_device(args.device)


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; exits with a clear message when CUDA was asked for and
    this torch build or machine has none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name}: torch {torch.__version__} sees no CUDA device on this machine"
        )
    return device


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (``torch.cuda.synchronize``); a no-op on
    the CPU, where every op has finished when it returns."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section(name: str, device: torch.device | str) -> str:
    """The BENCHMARKS.md section for ``name`` on ``device``: ``name`` on the CPU (the
    figures published so far), ``name-cuda`` on a GPU."""
    kind = torch.device(device).type
    return name if kind == "cpu" else f"{name}-{kind}"


def device_label(device: torch.device | str) -> str:
    """For section titles: ``CPU``, or ``CUDA, <GPU name>``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "CPU"
    return f"CUDA, {torch.cuda.get_device_name(device)}"


#: The interpreter the printed commands name: the project's virtual environment.
PYTHON = ".venv/bin/python"


def command(script: str, device: torch.device | str, *extra: str) -> str:
    """The command line that reproduces a section, run from the repository root:
    ``.venv/bin/python benchmarks/<script>`` plus ``--device cuda`` off the CPU, plus
    any non-default options."""
    parts = [f"{PYTHON} benchmarks/{script}"]
    if torch.device(device).type != "cpu":
        parts.append(f"--device {torch.device(device).type}")
    parts.extend(extra)
    return " ".join(parts)


# -- timing ----------------------------------------------------------------------------
def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Run each function ``repeats`` times, alternating, so drift hits all equally,
    after one warm-up call each. On CUDA each timed call is bracketed by :func:`sync`."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def paired_verdict(r: dict[str, float], target: float) -> str:
    """Whether the paired ratios (``r["ratio_q1"]``, ``r["ratio_q3"]``: their quartiles)
    meet ``target``: all of their middle half below it, all above it, or straddling it
    (too close to call on these cores)."""
    if r["ratio_q3"] <= target:
        return f"≤ {target:.2f}×: met"
    if r["ratio_q1"] > target:
        return f"≤ {target:.2f}×: missed"
    return f"≤ {target:.2f}×: within the noise"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(num: list[float], den: list[float]) -> list[float]:
    """The ratios ``num[i] / den[i]`` of two variants timed in the same round."""
    return [a / b for a, b in zip(num, den, strict=True)]


def quartiles(xs: list[float]) -> tuple[float, float]:
    """The first and third quartiles of ``xs`` (the middle half of the rounds lies
    between them); with fewer than 4 values, the smallest and the largest."""
    if len(xs) < 4:
        return min(xs), max(xs)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


# -- BENCHMARKS.md ---------------------------------------------------------------------
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _block(name: str) -> re.Pattern[str]:
    start, end = _markers(name)
    return re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)


def gpu_status(text: str) -> str:
    """The paragraph saying which GPU variants have run (from the sections in ``text``)."""
    done = [title for name, title in GPU_SECTIONS if f"<!-- {name}-cuda:start -->" in text]
    todo = [title for name, title in GPU_SECTIONS if title not in done]
    how = (
        "**GPU variants.** Every benchmark here has a GPU variant: the same code with the "
        "model and the in-memory data on the GPU and every timed block ended by "
        "`torch.cuda.synchronize()`. `benchmarks/run_all.sh` runs them after the CPU ones "
        "when `torch.cuda.is_available()` (`--cuda-only` for the GPU ones alone), or one at "
        "a time: `.venv/bin/python benchmarks/bench_<name>.py --device cuda`. Each writes its "
        "own section (`<name>-cuda`) after the CPU one, whose rows stay as they are."
    )
    if not done:
        return how + " They have not been run yet: no GPU has been lent to the sessions so far."
    status = f" Run so far: {', '.join(done)} (each section names its command and machine)"
    return how + status + (f"; not yet: {', '.join(todo)}." if todo else ".")


def write_section(name: str, body: str, command: str) -> None:
    """Replace the section ``name`` of BENCHMARKS.md (created if missing: a ``-cuda``
    section right after its CPU section, any other at the end), and refresh the GPU
    status paragraph."""
    text = (
        REPORT.read_text()
        if REPORT.exists()
        else "# Benchmarks\n\nFigures written by the scripts in `benchmarks/`; each section "
        "says how it was produced.\n"
    )
    start, end = _markers(name)
    block = f"{start}\n{body.rstrip()}\n\n_Command: `{command}` — machine: {machine()}._\n{end}"
    pattern = _block(name)
    base = name.rsplit("-cuda", 1)[0] if name.endswith("-cuda") else None
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif base is not None and _markers(base)[1] in text:
        after = _markers(base)[1]
        text = text.replace(after, f"{after}\n\n{block}", 1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    gpu = _block("gpu")
    if gpu.search(text):
        g_start, g_end = _markers("gpu")
        text = gpu.sub(lambda _: f"{g_start}\n{gpu_status(text)}\n{g_end}", text)
    REPORT.write_text(text)
