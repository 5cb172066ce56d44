"""The benchmarks still run: each one's core function on a tiny configuration.

No time is asserted (tests never assert timings), only that each returns its figures;
``write=False`` keeps BENCHMARKS.md untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_checkpoint
import bench_data_path
import bench_memory
import bench_resume
from _report import REPORT


@pytest.fixture(autouse=True)
def report_untouched():
    before = REPORT.read_bytes() if REPORT.exists() else None
    yield
    after = REPORT.read_bytes() if REPORT.exists() else None
    assert after == before, "a smoke run rewrote BENCHMARKS.md"


def test_checkpoint_benchmark_runs():
    r = bench_checkpoint.run(width=64, layers=2, repeats=1, write=False)
    for key in ("t_floor", "t_background", "t_torch.save", "t_raw", "stall_ratio"):
        assert r[key] > 0
    assert r["frac_raw_write_checkpoint"] > 0


def test_resume_benchmark_runs():
    r = bench_resume.run(
        n=2000, d=4, hidden=16, layers=1, bs=20, repeats=1, subprocess_repeats=0, write=False
    )
    for key in ("t_warmfit 1%", "t_warmfit 99%", "t_safetensors read", "offset_ratio"):
        assert r[key] > 0


def test_data_path_benchmark_runs():
    r = bench_data_path.run(n=512, repeats=1, write=False)
    assert r["speedup_warmfit"] > 0 and r["t_DataLoader"] > 0


def test_memory_benchmark_runs():
    r = bench_memory.run(n=256, d=4, hidden=16, layers=1, steps=2, repeats=1, write=False)
    assert r["ratio_fit"] > 0 and r["snapshot_bytes"] > 0
