"""The benchmarks still run: each one's core function on a tiny configuration.

No time is asserted (tests never assert timings), only that each returns its figures;
``write=False`` keeps BENCHMARKS.md untouched. Each runs with ``device="cpu"``: the
GPU variants are the same code with only the device and the synchronisations
differing, so this exercises their code path; their report text (which needs a GPU's
name) is rendered here from made-up figures, and the section bookkeeping is checked on
a scratch copy of the report. With a GPU, the ``cuda`` tests run each benchmark tiny on
it too.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _report
import bench_checkpoint
import bench_data_path
import bench_memory
import bench_resume
import bench_step_overhead
import bench_training_step
from _report import REPORT

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


DATA_PATH_KEYS = (
    "steps",
    "t_DataLoader",
    "t_tensor indexing",
    "t_warmfit",
    "t_DataLoader only",
    "t_indexing only",
    "speedup_warmfit",
    "speedup_indexing",
    "speedup_data_only",
)


@pytest.fixture(autouse=True)
def report_untouched():
    before = REPORT.read_bytes() if REPORT.exists() else None
    yield
    after = REPORT.read_bytes() if REPORT.exists() else None
    assert after == before, "a smoke run rewrote BENCHMARKS.md"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Report text as on a GPU, without one: only the GPU's name is asked of CUDA."""
    for mod in (bench_step_overhead, bench_data_path, bench_checkpoint, bench_resume):
        monkeypatch.setattr(mod, "device_label", lambda device: "CUDA, Fake GPU")
    monkeypatch.setattr(bench_memory, "device_label", lambda device: "CUDA, Fake GPU")
    return torch.device("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_benchmark_runs(device):
    r = bench_checkpoint.run(width=64, layers=2, rounds=2, device=device, write=False)
    for key in ("t_floor", "t_background", "t_torch.save", "t_raw", "stall_ratio"):
        assert r[key] > 0
    assert r["frac_raw_write_checkpoint"] > 0
    assert r["frac_raw_min_write_checkpoint"] <= r["frac_raw_write_checkpoint"]
    assert r["frac_raw_write_checkpoint"] <= r["frac_raw_max_write_checkpoint"]
    assert ("t_device copy" in r) == (device == "cuda")
    # warmfit's copy is timed inside its stall, in the same runs: never more than it.
    assert 0 < r["t_copy"] <= r["t_background"]


@pytest.mark.parametrize("device", DEVICES)
def test_resume_benchmark_runs(device):
    r = bench_resume.run(
        n=2000,
        d=4,
        hidden=16,
        layers=1,
        bs=20,
        repeats=2,
        subprocess_repeats=0,
        device=device,
        pin=False,  # pinning glibc's allocator would outlive the test in this process
        idle=0.1,
        write=False,
    )
    for key in ("warmfit 1%: total", "hand 99%: read", "x offset", "x offset step"):
        assert r[key] > 0
    # A part is timed inside its whole, in the same runs: it can never exceed it (the
    # report once showed a hand-written restore faster than the read it contains).
    for block in ("warmfit 99%", "warmfit 99% evicted", "hand 99%", "hand 99% evicted"):
        assert r[f"{block}: read"] <= r[f"{block}: restore"] <= r[f"{block}: total"]
        assert r[f"{block}: build"] <= r[f"{block}: total"]
        assert r[f"{block}: step"] <= r[f"{block}: total"]
    assert r["x hand restore / read"] >= 1 and r["x hand restore / read evicted"] >= 1
    # Residency is measured per block (whether eviction works depends on the file
    # system, which the report states; a file just read is in the page cache).
    for block in ("warmfit 99%", "hand 99%", "raw"):
        assert r[f"{block}: resident min"] == 1.0 or math.isnan(r[f"{block}: resident min"])
        assert f"{block} evicted: resident max" in r and f"{block} evicted: disk_bytes min" in r
    text = bench_resume._body(r, 0, 20, device)
    assert "evicted first" in text and "hand-written resume" in text


@pytest.mark.parametrize("device", DEVICES)
def test_data_path_benchmark_runs(device):
    r = bench_data_path.run(n=512, repeats=1, device=device, write=False)
    assert r["speedup_warmfit"] > 0 and r["t_DataLoader"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_memory_benchmark_runs(device):
    r = bench_memory.run(
        n=256, d=4, hidden=16, layers=1, steps=2, repeats=1, device=device, write=False
    )
    assert r["ratio_fit"] > 0 and r["snapshot_bytes"] > 0
    assert ("cuda_peak_warmfit fit" in r) == (device == "cuda")


def test_training_step_benchmark_runs():
    r = bench_training_step.run(repeats=1, scale=1 / 16, write=False)
    assert r["ratio"] > 0 and r["hand"] > 0 and r["steps"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_step_overhead_benchmark_runs(device):
    r = bench_step_overhead.run(repeats=1, device=device, scale=1 / 64, write=False)
    assert len(r) == len(bench_step_overhead.CASES)
    assert all(c["ratio"] > 0 and c["hand"] > 0 for c in r.values())


def test_gpu_report_text_renders(fake_gpu):
    """Every GPU section's text, from made-up figures: no key or format error waits
    for the first GPU run."""

    class Figures(dict):
        def __missing__(self, key: str) -> float:
            return 1.0

    r = Figures(n=1e6, steps_per_epoch=7813, params=1e8, file_bytes=2**30, state_bytes=2**30)
    rows = ["| case | 1 | 1 | 1 | 1 | 1 | 1 |"]
    texts = [
        bench_step_overhead._body(rows, 21, fake_gpu),
        bench_data_path._body(
            {f"{k}@{bs}": 1.0 for k in DATA_PATH_KEYS for bs in (64, 512)},
            7,
            49152,
            20,
            64,
            3,
            (64, 512),
            fake_gpu,
        ),
        bench_checkpoint._body(r, 10, 4096, 6, fake_gpu),
        bench_resume._body(r, 3, 128, fake_gpu),
        bench_memory._body_cuda(
            r, 3, dict(n=200_000, d=256, steps=8, bs=64, device="cuda"), fake_gpu
        ),
    ]
    for text in texts:
        assert text.startswith("## ") and "Fake GPU" in text
    assert "device-side copy" in texts[2] and "GPU memory" in texts[4]


def test_cpu_report_text_renders():
    """The CPU sections' text, from made-up figures (the resume one is rendered from a
    real run in its own test)."""
    rows = ["| case | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 |"]
    cpu = torch.device("cpu")
    step = bench_step_overhead._body(rows, 21, cpu)
    data = bench_data_path._body(
        {f"{k}@{bs}": 1.0 for k in DATA_PATH_KEYS for bs in (64, 512)},
        7,
        32768,
        20,
        64,
        3,
        (64, 512),
        cpu,
    )
    assert "median of paired ratios" in step and "quartiles" in step
    assert "~16" not in data and "1× faster than the DataLoader's" in data
    fig = {"ratio": 1.0, "ratio_q1": 0.99, "ratio_q3": 1.02}
    assert _report.paired_verdict(fig, 1.03).endswith("met")
    assert _report.paired_verdict(fig, 1.01).endswith("within the noise")
    assert _report.paired_verdict(fig, 0.98).endswith("missed")


def test_report_sections(monkeypatch, tmp_path):
    """A ``-cuda`` section lands right after its CPU section, the CPU one stays, and
    the GPU paragraph says which GPU variants have run."""
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(
        "# Benchmarks\n\n<!-- gpu:start -->\nold\n<!-- gpu:end -->\n\n"
        "<!-- checkpoint:start -->\ncpu rows\n<!-- checkpoint:end -->\n\n"
        "<!-- resume:start -->\nresume rows\n<!-- resume:end -->\n"
    )
    monkeypatch.setattr(_report, "REPORT", report)
    assert _report.section("checkpoint", "cpu") == "checkpoint"
    assert _report.section("checkpoint", torch.device("cuda")) == "checkpoint-cuda"
    assert _report.command("bench_x.py", "cpu") == ".venv/bin/python benchmarks/bench_x.py"
    cmd = _report.command("bench_x.py", "cuda", "--layers 32")
    assert cmd == ".venv/bin/python benchmarks/bench_x.py --device cuda --layers 32"
    _report.sync("cpu")  # a no-op off the GPU

    assert "have not been run yet" in _report.gpu_status(report.read_text())
    _report.write_section("checkpoint-cuda", "gpu rows", "python benchmarks/bench_checkpoint.py")
    text = report.read_text()
    assert "cpu rows" in text and "old" not in text
    assert text.index("checkpoint:end") < text.index("checkpoint-cuda:start")
    assert text.index("checkpoint-cuda:end") < text.index("resume:start")
    assert "Run so far: checkpoint stall and write throughput" in text
    assert "not yet: step overhead" in text

    _report.write_section("checkpoint-cuda", "new gpu rows", "cmd")  # replaced in place
    text = report.read_text()
    assert text.count("checkpoint-cuda:start") == 1 and "new gpu rows" in text


def test_boosting_benchmark_runs():
    import bench_boosting

    r = bench_boosting.run(repeats=1, n=1000, rounds=3, write=False)
    for name in ("XGBoost", "LightGBM"):
        assert r[name]["own"] > 0 and r[name]["warmfit"] > 0 and r[name]["ratio"] > 0
        assert r[name]["ck_bytes"] > 0 and r[name]["ck_round_ms"] > 0
