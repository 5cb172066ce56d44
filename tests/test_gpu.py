"""GPU-only checks (skipped where no CUDA device exists; CI has none).

Run them on a machine with a GPU: ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import MLP, assert_same_state, make_data, make_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_no_per_step_host_sync():
    """A step never waits for the device: losses stay there and are read at the epoch's
    end. With 50 steps, a per-step sync would show 50 times or more."""
    x, y = make_data(800)
    t = make_trainer(device="cuda", schedule=None)
    t.fit(x, y, epochs=1)  # warm-up: allocations, cuBLAS handles
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(x, y, epochs=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert t.global_step == 100 and len(syncs) < 10, [str(w.message) for w in syncs[:5]]


def test_split_equals_straight_on_gpu_with_deterministic_algorithms():
    x, y = make_data(400)
    a = make_trainer(device="cuda", deterministic=True, model=lambda: MLP(p=0.2))
    a.fit(x, y, epochs=3)
    b = make_trainer(device="cuda", deterministic=True, model=lambda: MLP(p=0.2))
    b.fit(x, y, epochs=1)
    b.fit(x, y, epochs=2)
    assert_same_state(a, b)  # weights, optimizer, CUDA and CPU streams, counters, history


def _sync_warnings(fn) -> int:
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_background_snapshot_copies_into_pinned_buffers_with_one_sync(tmp_path):
    """A save copies the state into pinned, reused host buffers with non-blocking copies
    and one synchronisation, where ``.cpu()`` per tensor synchronises once per tensor."""
    x, y = make_data(400)
    t = make_trainer(device="cuda", run_dir=tmp_path / "run", checkpoint_every=5)
    t.fit(x, y, epochs=1)
    backend = t._backend
    assert backend._snapshot is not None and backend._snapshot.pinned  # fit's saves
    n = len(backend.state_tensors())
    assert _sync_warnings(backend.state_tensors) >= n  # the control: one per tensor
    assert _sync_warnings(backend.snapshot_tensors) <= 1
    snapshot, live = backend.snapshot_tensors(), backend.state_tensors()
    assert sorted(snapshot) == sorted(live)
    for name, arr in live.items():  # byte for byte
        assert (snapshot[name].dtype, snapshot[name].shape) == (arr.dtype, arr.shape), name
        assert snapshot[name].tobytes() == arr.tobytes(), name


def test_a_gpu_run_resumed_from_its_background_checkpoint_is_bit_exact(tmp_path):
    x, y = make_data(400)
    straight = make_trainer(device="cuda", deterministic=True, model=lambda: MLP(p=0.2))
    straight.fit(x, y, epochs=3)
    first = make_trainer(
        device="cuda", deterministic=True, model=lambda: MLP(p=0.2), run_dir=tmp_path / "r"
    )
    first.fit(x, y, epochs=2)
    first.close()
    resumed = make_trainer(
        device="cuda", deterministic=True, model=lambda: MLP(p=0.2), run_dir=tmp_path / "r"
    )
    resumed.fit(x, y, epochs=1)
    assert_same_state(straight, resumed)
    resumed.close()
