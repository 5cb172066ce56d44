"""Every tensor of the state round-trips with its dtype and shape, bit for bit, or is
refused by name before it is stored lossily (issue 15, item 1).

The bug this guards: optimizer slots were read back without their recorded dtype, so a
pure bfloat16 model's AdamW moments (stored as int16 bits) came back as the integers
those bits spell (0.00144 read as 15040.0) and training went on without a word.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import warmfit
from conftest import make_data
from warmfit.check import compare_states
from warmfit.checkpoint import read_checkpoint

FLOAT8 = [
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n)
]
#: every dtype a training state can hold that a checkpoint must keep exactly
BUFFER_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, *FLOAT8,
    torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
]  # fmt: skip


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class Net(nn.Module):
    """A small MLP in ``dtype``, with one buffer of every dtype of BUFFER_DTYPES."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
        self.net.to(dtype)
        g = torch.Generator().manual_seed(3)
        for i, dt in enumerate(BUFFER_DTYPES):
            raw = torch.randn(5, generator=g, dtype=torch.float64) * 40
            if dt.is_complex:
                value = torch.complex(raw, -raw).to(dt)
            elif dt == torch.bool:
                value = raw > 0
            elif dt.is_floating_point:
                value = raw.to(dt)
            else:
                value = raw.abs().to(torch.int64).to(dt)
            self.register_buffer(f"b{i}", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype)).float()


def _trainer(dtype: torch.dtype, **kwargs) -> warmfit.Trainer:
    return warmfit.Trainer(
        Net(dtype),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, eps=1e-4),
        loss="cross_entropy",
        batch_size=16,
        seed=5,
        verbose=0,
        **kwargs,
    )


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str
)
def test_every_tensor_round_trips_through_a_checkpoint(tmp_path, dtype):
    x, y = make_data(96)
    trainer = _trainer(dtype)
    trainer.fit(x, y, epochs=1)
    trainer.save(tmp_path / "ckpt")
    tensors, state = read_checkpoint(tmp_path / "ckpt")
    assert any(k.startswith("optim/") for k in tensors)  # the slots are part of it
    loaded = _trainer(dtype)
    loaded.load_state_dict({"tensors": tensors, "state": state})
    # Compared as torch sees them: every weight, buffer and optimizer slot has its dtype,
    # shape and bits back (the slots' dtype is the model's: bfloat16 moments included).
    a, b = trainer._backend._state_torch(), loaded._backend._state_torch()
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert _bits(a[name]) == _bits(b[name]), name
    slots = [b[k] for k in b if k.startswith("optim/") and k.endswith("exp_avg")]
    assert slots and all(s.dtype == dtype for s in slots)
    # ... and training goes on exactly as it would have
    trainer.fit(x, y, epochs=1)
    loaded.fit(x, y, epochs=1)
    assert compare_states(trainer.state_dict(), loaded.state_dict()) == []


def test_buffers_of_every_dtype_keep_their_values():
    x, y = make_data(32)
    trainer = _trainer(torch.float32)
    trainer.fit(x, y, epochs=1)
    loaded = _trainer(torch.float32)
    for buf in loaded.model.buffers():  # make sure the load is what restores them
        buf.zero_() if buf.dtype != torch.bool else buf.fill_(False)
    loaded.load_state_dict(trainer.state_dict())
    for (name, a), b in zip(trainer.model.named_buffers(), loaded.model.buffers(), strict=True):
        assert a.dtype == b.dtype and _bits(a) == _bits(b), name


class ComplexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(8, 3, dtype=torch.complex64, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.complex64) @ self.w).abs()


def test_complex_parameters_and_their_adam_slots_round_trip(tmp_path):
    x, y = make_data(64)
    settings = dict(
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        loss="cross_entropy", batch_size=16, seed=2, verbose=0,
    )  # fmt: skip
    straight = warmfit.Trainer(ComplexNet(), **settings)
    straight.fit(x, y, epochs=2)
    split = warmfit.Trainer(ComplexNet(), **settings)
    split.fit(x, y, epochs=1)
    split.save(tmp_path / "ckpt")  # through the file: complex as real pairs
    resumed = warmfit.Trainer.load(tmp_path / "ckpt", ComplexNet(), **settings)
    slot = resumed._backend._state_torch()["optim/0/exp_avg"]
    assert slot.dtype == torch.complex64
    resumed.fit(x, y, epochs=1)
    assert compare_states(straight.state_dict(), resumed.state_dict()) == []


def test_a_tensor_no_checkpoint_can_hold_is_refused_by_name():
    model = Net()
    model.register_buffer("sparse", torch.eye(3).to_sparse())
    with pytest.raises(TypeError) as err:
        _trainer(torch.float32).__class__(
            model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss="cross_entropy"
        )
    assert str(err.value) == (
        "The training state entry 'model/sparse' cannot be saved exactly: its layout is "
        "torch.sparse_coo (only dense tensors are stored); convert it with .to_dense(). "
        "warmfit stores every tensor of the state bit for bit or refuses it."
    )


BF16_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import warmfit
from conftest import make_data
from torch import nn

def model():
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3)).to(torch.bfloat16)

def loss(out, y):
    return nn.functional.cross_entropy(out.float(), y)

x, y = make_data(160)
t = warmfit.Trainer(
    model, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), loss=loss,
    batch_size=16, seed=11, verbose=0, run_dir=sys.argv[1],
)
t.fit(torch.from_numpy(x).to(torch.bfloat16), y, until_epoch=int(sys.argv[2]))
t.save(sys.argv[3])
t.close()
"""


def test_pure_bf16_adamw_resumed_in_a_new_process_equals_straight(tmp_path):
    """The user's report: model.to(torch.bfloat16), AdamW, a run_dir, a new process."""
    script = tmp_path / "bf16.py"
    script.write_text(BF16_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(run_dir: str, until: int, out: str) -> None:
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / run_dir), str(until), str(tmp_path / out)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr

    run("straight", 3, "straight.ckpt")
    run("split", 1, "first.ckpt")
    run("split", 3, "split.ckpt")  # a new process resumes from the run dir
    a, b = read_checkpoint(tmp_path / "straight.ckpt"), read_checkpoint(tmp_path / "split.ckpt")
    assert compare_states({"tensors": a[0], "state": a[1]}, {"tensors": b[0], "state": b[1]}) == []
    moments = [k for k in a[0] if k.endswith("exp_avg")]
    assert moments and a[1]["backend"]["tensor_dtypes"][moments[0]] == "torch.bfloat16"
    assert np.array_equal(a[0][moments[0]], b[0][moments[0]])
