"""Tests of warmfit.checkpoint on real files: format, integrity messages, run directory,
lock, failure injection, background writer."""

from __future__ import annotations

import copy
import errno
import gc
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import xxhash
from safetensors.numpy import load_file

import warmfit
from conftest import make_data, make_trainer
from warmfit import checkpoint as ck
from warmfit.background import AsyncWriter, SaveFailedError, SnapshotBuffers
from warmfit.checkpoint import (
    SCHEMA_VERSION,
    STATE_FILE,
    TENSOR_FILE,
    CheckpointExistsError,
    CheckpointWriteError,
    UnsupportedSchemaError,
    inspect_checkpoint,
    read_checkpoint,
    snapshot_state,
    write_checkpoint,
)
from warmfit.errors import CheckpointError, RunDirLockedError, WarmfitError
from warmfit.rundir import LATEST, RunDir, verify_checkpoints, verify_run_dir

DTYPES = [
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
    np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64,
]  # fmt: skip


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for dt in DTYPES:
        name = np.dtype(dt).name
        if np.dtype(dt).kind == "f":
            full = rng.standard_normal((3, 5)).astype(dt)
            full[0, :3] = [np.nan, np.inf, -0.0]
        elif np.dtype(dt).kind == "b":
            full = rng.integers(0, 2, (3, 5)).astype(bool)
        else:
            info = np.iinfo(dt)
            full = rng.integers(info.min, info.max, (3, 5), dtype=dt, endpoint=True)
        out[f"{name}/matrix"] = full
        out[f"{name}/scalar"] = full[1:2, 1:2].reshape(())
        out[f"{name}/numpy-scalar"] = full[2, 2]
        out[f"{name}/empty"] = np.zeros((0, 4), dtype=dt)
    out["strided"] = np.arange(40, dtype=np.float32).reshape(5, 8)[::2, ::3]
    out["fortran"] = np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4))
    out["big-endian"] = np.arange(4, dtype=">f8")
    out['é unicode name "quoted"'] = np.array([7], dtype=np.int32)
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, a in want.items():
        b = got[name]
        assert b.shape == a.shape, name
        assert b.dtype == a.dtype.newbyteorder("="), name
        assert np.array_equal(b, a, equal_nan=a.dtype.kind == "f"), name
        # bit-exact, including NaN payloads and -0.0
        assert np.ascontiguousarray(a.astype(b.dtype)).tobytes() == b.tobytes(), name


STATE = {"step": 3, "history": [{"loss": 0.5}, {"loss": float("inf")}], "name": "ü", "x": None}


def save(path: Path, **kwargs: object) -> Path:
    return write_checkpoint(path, {"w": np.arange(1000, dtype=np.float32)}, STATE, **kwargs)


# --------------------------------------------------------------------------- format


def test_round_trip_every_dtype_bit_exact(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = write_checkpoint(tmp_path / "ck", tensors, STATE)
    assert path == tmp_path / "ck"
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp folder left
    got, state = read_checkpoint(path)
    assert_same(got, tensors)
    assert all(a.flags.writeable for a in got.values())
    assert json.dumps(state, sort_keys=True) == json.dumps(STATE, sort_keys=True)


def test_files_are_readable_by_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = write_checkpoint(tmp_path / "ck", tensors, {})
    assert_same(load_file(str(path / TENSOR_FILE)), tensors)
    raw = (path / TENSOR_FILE).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    # every array starts at a multiple of its itemsize (as safetensors' own writer does)
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % np.dtype(tensors[name].dtype).itemsize == 0
    doc = json.loads((path / STATE_FILE).read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["tensors_bytes"] == len(raw)


def test_state_keeps_tuples_as_lists_and_nan(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ck", {}, {"betas": (0.9, 0.999), "best": float("nan")})
    tensors, state = read_checkpoint(path)
    assert tensors == {}
    assert state["betas"] == [0.9, 0.999]
    assert np.isnan(state["best"])


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"o": {"lr": np.float32(0.1)}}, r"state\['o'\]\['lr'\] is a numpy.float32.*\.item\(\)"),
        ({"o": {0: {"step": 1}}}, r"state\['o'\] has the key 0 of type int; keys .* must be str"),
        ({"h": [1, {2}]}, r"state\['h'\]\[1\] is a builtins.set"),
        ({"a": np.zeros(3)}, r"put arrays in the tensors mapping"),
    ],
)
def test_state_that_json_cannot_hold_names_the_key(
    tmp_path: Path, state: dict, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        write_checkpoint(tmp_path / "ck", {}, state)
    assert os.listdir(tmp_path) == []  # refused before touching the disk


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ({"c": np.zeros(2, np.complex64)}, TypeError, "dtype complex64, which checkpoints do not"),
        ({"l": [1, 2]}, TypeError, "must be a numpy array. Got builtins.list"),
        ({"__metadata__": np.zeros(1)}, ValueError, "reserved by the safetensors format"),
        ({1: np.zeros(1)}, TypeError, "tensor names must be str"),
    ],
)
def test_bad_tensors_are_refused(tmp_path: Path, tensors: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        write_checkpoint(tmp_path / "ck", tensors, {})
    assert os.listdir(tmp_path) == []


def test_existing_path_needs_overwrite(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ck", {"a": np.zeros(1)}, {"v": 1})
    with pytest.raises(CheckpointExistsError, match=r"already exists\. Pass overwrite=True"):
        write_checkpoint(path, {"a": np.ones(1)}, {"v": 2})
    write_checkpoint(path, {"a": np.ones(1)}, {"v": 2}, overwrite=True)
    tensors, state = read_checkpoint(path)
    assert state == {"v": 2} and tensors["a"][0] == 1.0
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# --------------------------------------------------------------------------- integrity


def test_truncated_tensor_file(tmp_path: Path) -> None:
    path = save(tmp_path / "ck")
    tfile = path / TENSOR_FILE
    full = tfile.read_bytes()
    for cut in (0, 5, 8, 60, len(full) // 2, len(full) - 1):
        tfile.write_bytes(full[:cut])
        for verify in (True, False):
            with pytest.raises(CheckpointError) as info:
                read_checkpoint(path, verify=verify)
            assert str(info.value) == f"{tfile}: truncated: {cut} bytes, expected {len(full)}"
            assert info.value.path == str(tfile)


def test_extra_bytes_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "ck")
    tfile = path / TENSOR_FILE
    size = tfile.stat().st_size
    with open(tfile, "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(CheckpointError, match=f"wrong size: {size + 3} bytes, expected {size}"):
        read_checkpoint(path)


def flip_bit(file: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 1 << bit
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_bit_is_a_checksum_mismatch(tmp_path: Path, where: str) -> None:
    path = save(tmp_path / "ck")
    tfile = path / TENSOR_FILE
    n = int.from_bytes(tfile.read_bytes()[:8], "little")
    flip_bit(tfile, 8 + n + 1234 if where == "data" else 8, bit=0)  # header: '{' -> 'z'
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value) == f"{tfile}: checksum mismatch: the file is damaged"
    if where == "header":  # without the checksum, the parser still refuses it
        with pytest.raises(CheckpointError, match="not a safetensors file: header is not JSON"):
            read_checkpoint(path, verify=False)
    else:  # without the checksum a data flip goes unnoticed: that is what verify is for
        tensors, _ = read_checkpoint(path, verify=False)
        assert not np.array_equal(tensors["w"], np.arange(1000, dtype=np.float32))


@pytest.mark.parametrize("missing", [STATE_FILE, TENSOR_FILE])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    path = save(tmp_path / "ck")
    (path / missing).unlink()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value) == f"{path / missing}: missing"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing: no checkpoint folder here"):
        read_checkpoint(tmp_path / "nope")


def rewrite_state(path: Path, **changes: object) -> None:
    doc = json.loads((path / STATE_FILE).read_text())
    doc.update(changes)
    (path / STATE_FILE).write_text(json.dumps(doc))


def test_invalid_json(tmp_path: Path) -> None:
    path = save(tmp_path / "ck")
    (path / STATE_FILE).write_text('{"schema_version": 1, "state": {')
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path / STATE_FILE}: not valid JSON: Expecting")


def test_unknown_schema_versions(tmp_path: Path) -> None:
    path = save(tmp_path / "ck")
    sfile = path / STATE_FILE
    rewrite_state(path, schema_version=7)
    with pytest.raises(UnsupportedSchemaError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"{sfile}: unknown schema version 7: written by a newer warmfit (schema 7; this "
        f"warmfit reads {SCHEMA_VERSION}); upgrade warmfit"
    )
    rewrite_state(path, schema_version=0)
    with pytest.raises(UnsupportedSchemaError, match=r"unknown schema version 0$"):
        read_checkpoint(path)
    rewrite_state(path, schema_version="1")
    with pytest.raises(CheckpointError, match="schema_version is '1', expected an integer"):
        read_checkpoint(path)


def as_schema_1(path: Path) -> None:
    """Rewrite a checkpoint's state.json the way schema 1 wrote it (SHA-256 checksums)."""
    doc = json.loads((path / STATE_FILE).read_text())
    text = json.dumps(doc["state"], ensure_ascii=False, allow_nan=True)
    tensors = (path / TENSOR_FILE).read_bytes()
    old = {
        "schema_version": 1,
        "tensors_sha256": hashlib.sha256(tensors).hexdigest(),
        "tensors_bytes": len(tensors),
        "state_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "state": doc["state"],
    }
    (path / STATE_FILE).write_text(json.dumps(old))


def test_schema_1_checkpoints_are_still_read_and_verified(tmp_path: Path) -> None:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = write_checkpoint(tmp_path / "ck", tensors, {"counters": {"step": 3}})
    as_schema_1(path)
    loaded, state = read_checkpoint(path)
    assert np.array_equal(loaded["w"], tensors["w"])
    assert state == {"counters": {"step": 3}}
    info = inspect_checkpoint(path)
    assert (info["schema_version"], info["checksum"], info["checksum_ok"]) == (1, "sha256", True)
    flip_bit(path / TENSOR_FILE, (path / TENSOR_FILE).stat().st_size - 1)
    with pytest.raises(CheckpointError, match="checksum mismatch: the file is damaged"):
        read_checkpoint(path)
    rewrite_state(path, state={"counters": {"step": 4}})
    with pytest.raises(CheckpointError, match="checksum mismatch: the state was damaged"):
        read_checkpoint(path)


def test_state_file_fields_are_checked(tmp_path: Path) -> None:
    path = save(tmp_path / "ck")
    rewrite_state(path, state=[1])
    with pytest.raises(CheckpointError, match="state is a list, expected dict"):
        read_checkpoint(path)
    (path / STATE_FILE).write_text("[]")
    with pytest.raises(CheckpointError, match="a JSON list, expected an object"):
        read_checkpoint(path)


class WritesMarker:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("verify", [True, False])
def test_pickle_posing_as_tensor_file_is_refused(tmp_path: Path, verify: bool) -> None:
    marker = tmp_path / "pwned"
    path = save(tmp_path / "ck")
    payload = pickle.dumps({"w": WritesMarker(marker)})
    (path / TENSOR_FILE).write_bytes(payload)
    rewrite_state(
        path, tensors_checksum=xxhash.xxh3_128(payload).hexdigest(), tensors_bytes=len(payload)
    )
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, verify=verify)
    assert info.value.path == str(path / TENSOR_FILE)
    assert info.value.problem.startswith("not a safetensors file: ")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        inspect_checkpoint(path)
    assert not marker.exists()
    # Sanity: the payload really is dangerous.
    pickle.loads(payload)
    assert marker.exists()


def test_inspect_checkpoint(tmp_path: Path) -> None:
    tensors = {"w": np.zeros((2, 3), np.float16), "rng": np.zeros(5, np.uint8), "s": np.array(1.0)}
    path = write_checkpoint(tmp_path / "ck", tensors, {"model": {}, "counters": {"step": 1}})
    summary = inspect_checkpoint(path)
    assert summary["schema_version"] == SCHEMA_VERSION
    assert summary["checksum"] == "xxh3_128"
    assert summary["checksum_ok"] is True
    assert summary["tensors"] == {
        "w": ("float16", (2, 3), 12),
        "rng": ("uint8", (5,), 5),
        "s": ("float64", (), 8),
    }
    assert summary["state_keys"] == ["model", "counters"]
    assert (summary["version"], summary["counters"]) == (None, {"step": 1})
    tfile = path / TENSOR_FILE
    flip_bit(tfile, tfile.stat().st_size - 1)
    assert inspect_checkpoint(path)["checksum_ok"] is False


def test_inspect_shows_a_trainers_counters_and_version(tmp_path: Path) -> None:
    x, y = make_data(n=48)
    with make_trainer(run_dir=tmp_path) as trainer:
        trainer.fit(x, y, epochs=1)
        summary = inspect_checkpoint(trainer.run_dir.latest())
    assert summary["version"] == {"warmfit": warmfit.__version__, "framework": "torch"}
    assert summary["counters"] == {
        "epoch": 1, "offset": 0, "global_step": 3, "samples_seen": 48, "fit_calls": 1,
        "run": 0, "schedule_origin": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("step", "gone"),
    [
        ("_check_tensor_file", "missing"),
        ("_file_checksum", "missing"),
        ("_read_header", "missing"),
        ("_file_checksum", "a directory"),
        ("_read_header", "a directory"),
    ],
)
def test_a_tensor_file_gone_while_being_read_is_a_checkpoint_error(
    tmp_path: Path, step: str, gone: str
) -> None:
    """verify reads a folder that retention may delete meanwhile: every read of the tensor
    file turns an OSError into a CheckpointError naming the file."""
    path = save(tmp_path / "ck")
    doc = ck._read_state_doc(path)
    tfile = path / TENSOR_FILE
    tfile.unlink()
    if gone == "a directory":
        tfile.mkdir()
    read = {
        "_check_tensor_file": lambda: ck._check_tensor_file(path, doc, verify=True),
        "_file_checksum": lambda: ck._file_checksum(tfile, doc["checksum"]),
        "_read_header": lambda: ck._read_header(tfile),
    }[step]
    with pytest.raises(CheckpointError) as info:
        read()
    problem = "missing" if gone == "missing" else "unreadable: Is a directory"
    assert str(info.value) == f"{tfile}: {problem}"


# --------------------------------------------------------------------------- run directory


def step_tensors(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full(16, step, dtype=np.int64)}


def nm(path: Path) -> str:
    """A checkpoint folder's name without its save-sequence and run prefix."""
    return re.sub(r"^ckpt-\d{8}-run\d{3}-", "", path.name)


def names(paths: list[Path]) -> list[str]:
    return [nm(p) for p in paths]


def test_save_names_latest_and_retention(tmp_path: Path) -> None:
    with RunDir(tmp_path, keep_last=2) as run:
        assert run.latest() is None and run.load_latest() is None and run.best() is None
        for step, metric in [(10, 5.0), (20, 1.0), (30, 4.0), (40, 3.0), (50, 6.0)]:
            run.save(step_tensors(step), {"step": step}, step=step, metric=metric)
        # last 2 + the best (step 20, lowest metric)
        assert names(run.checkpoints()) == [f"step-{s:012d}" for s in (20, 40, 50)]
        assert nm(run.best()) == "step-000000000020"
        assert (run.checkpoints_dir / LATEST).read_text() == run.checkpoints()[-1].name + "\n"
        path, tensors, state = run.load_latest()
        assert nm(path) == "step-000000000050" and state == {"step": 50}
        assert tensors["w"][0] == 50
        index = json.loads(run.index_file.read_text())["checkpoints"]
        assert sorted(index) == [p.name for p in run.checkpoints()]
        assert not [n for n in os.listdir(run.checkpoints_dir) if n.startswith(".")]


def test_retention_max_mode_and_keep_best_off(tmp_path: Path) -> None:
    with RunDir(tmp_path / "max", keep_last=1, monitor_mode="max") as run:
        for step, metric in [(1, 0.5), (2, 0.9), (3, 0.7), (4, None)]:
            run.save(step_tensors(step), {}, step=step, metric=metric)
        assert names(run.checkpoints()) == ["step-000000000002", "step-000000000004"]
    with RunDir(tmp_path / "numpy", keep_last=1) as run:  # numpy scalars are fine
        for step, metric in [(1, 0.1), (2, 0.9)]:
            run.save(step_tensors(step), {}, step=np.int64(step), metric=np.float32(metric))
        assert names(run.checkpoints()) == ["step-000000000001", "step-000000000002"]
        with pytest.raises(ValueError, match=r"'metric' parameter of RunDir\.save"):
            run.save({}, {}, step=3, metric="low")
    with RunDir(tmp_path / "nobest", keep_last=1, keep_best=False) as run:
        for step, metric in [(1, 0.1), (2, 0.9)]:
            run.save(step_tensors(step), {}, step=step, metric=metric)
        assert names(run.checkpoints()) == ["step-000000000002"]


def test_retention_never_deletes_latest(tmp_path: Path) -> None:
    with RunDir(tmp_path, keep_last=2, keep_best=False) as run:
        for step in (10, 20, 30):
            run.save(step_tensors(step), {}, step=step)
        run.save(step_tensors(5), {}, step=5)  # e.g. after a rewind: LATEST is not the highest
        assert nm(run.latest()) == "step-000000000005"
        assert names(run.checkpoints()) == [f"step-{s:012d}" for s in (30, 5)]  # save order


def runs_and_steps(paths: list[Path]) -> list[tuple[int, int]]:
    """``(run, step)`` of each checkpoint, from its name ``ckpt-<seq>-run<r>-step-<s>``."""
    found = [re.fullmatch(r"ckpt-\d+-run(\d+)-step-(\d+)", p.name) for p in paths]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


def test_retention_is_per_run_and_keeps_finished_runs(tmp_path: Path) -> None:
    """A restart (run 1, steps from 0 again) never deletes run 0: each run keeps its
    last keep_last and its best, and "best" is per run."""
    run0 = [(10, 5.0), (20, 1.0), (30, 4.0), (40, 3.0)]
    run1 = [(5, 0.5), (10, 2.0), (15, 3.0), (20, 2.5), (25, None)]
    with RunDir(tmp_path, keep_last=2) as run:
        for step, metric in run0:
            run.save(step_tensors(step), {}, step=step, metric=metric, run=0)
        assert nm(run.best()) == "step-000000000020"
        for step, metric in run1:
            run.save(step_tensors(step), {}, step=step, metric=metric, run=1)
            # run 0 is finished: its last two and its best stay, whatever run 1 does
            assert runs_and_steps(run.checkpoints())[:3] == [(0, 20), (0, 30), (0, 40)]
        assert runs_and_steps(run.checkpoints()) == [
            (0, 20), (0, 30), (0, 40), (1, 5), (1, 20), (1, 25)
        ]  # fmt: skip
        assert runs_and_steps([run.best(), run.best(run=1), run.best(run=0)]) == [
            (1, 5), (1, 5), (0, 20)
        ]  # fmt: skip
        assert run.best(run=2) is None
        with pytest.raises(ValueError, match=r"'run' parameter of RunDir\.best"):
            run.best(run=-1)
        index = json.loads(run.index_file.read_text())["checkpoints"]
        assert sorted(index) == [p.name for p in run.checkpoints()]
        run.save(step_tensors(30), {}, step=30, metric=9.0, run=2)  # a second restart
        assert runs_and_steps(run.checkpoints()) == [
            (0, 20), (0, 30), (0, 40), (1, 5), (1, 20), (1, 25), (2, 30)
        ]  # fmt: skip
        assert runs_and_steps([run.best()]) == [(2, 30)]  # the current run's, not run 1's
    with RunDir(tmp_path / "nobest", keep_last=1, keep_best=False) as run:
        for r, step in [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]:
            run.save(step_tensors(step), {}, step=step, metric=float(step), run=r)
        assert runs_and_steps(run.checkpoints()) == [(0, 2), (1, 3)]


def test_verify_leaves_out_a_checkpoint_retention_deleted_after_the_listing(
    tmp_path: Path,
) -> None:
    """``warmfit verify`` needs no lock: a Trainer may delete an old checkpoint between
    the listing and the read. Such a folder is left out, not reported damaged."""
    with RunDir(tmp_path, keep_last=2) as run:
        for step in (1, 2):
            run.save(step_tensors(step), {}, step=step)
        listing = run.checkpoints()
        flip_bit(listing[1] / TENSOR_FILE, (listing[1] / TENSOR_FILE).stat().st_size - 1)
        run.save(step_tensors(3), {}, step=3)  # retention deletes step 1
        assert not listing[0].exists()
        damaged = "tensors.safetensors: checksum mismatch: the file is damaged"
        assert verify_checkpoints(listing) == [(listing[1], damaged)]
        assert verify_run_dir(tmp_path) == [(listing[1], damaged), (run.checkpoints()[1], None)]


def test_same_step_twice_gets_its_own_folder(tmp_path: Path) -> None:
    with RunDir(tmp_path, keep_last=None) as run:
        for _ in range(3):
            run.save(step_tensors(7), {}, step=7)
        run.save(step_tensors(8), {}, step=8)
        assert names(run.checkpoints()) == [
            "step-000000000007", "step-000000000007", "step-000000000007", "step-000000000008"
        ]  # fmt: skip


def test_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'keep_last' parameter of RunDir must be an int >= 1"):
        RunDir(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match=r"must be one of \{'min', 'max'\}. Got 'minimum'"):
        RunDir(tmp_path, monitor_mode="minimum")
    with RunDir(tmp_path) as run, pytest.raises(ValueError, match="'step' parameter"):
        run.save({}, {}, step=-1)


def test_save_requires_the_lock(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(WarmfitError, match=r"RunDir.save needs the run directory's lock"):
        run.save({}, {}, step=1)
    with pytest.raises(WarmfitError, match="clean_temporary needs"):
        run.clean_temporary()


@pytest.mark.parametrize("content", ["../../etc", "/etc", "..", "step-000000000001/../../x"])
def test_latest_pointing_outside_is_refused(tmp_path: Path, content: str) -> None:
    with RunDir(tmp_path / "run") as run:
        run.save(step_tensors(1), {}, step=1)
        run.latest_file.write_text(content)
        with pytest.raises(CheckpointError, match="points outside the run directory") as info:
            run.latest()
        assert info.value.path == str(run.latest_file)
        with pytest.raises(CheckpointError, match="points outside"):
            run.load_latest()


def test_symlink_leading_outside_is_refused(tmp_path: Path) -> None:
    outside = write_checkpoint(tmp_path / "outside", step_tensors(99), {"evil": True})
    with RunDir(tmp_path / "run") as run:
        run.save(step_tensors(1), {}, step=1)
        link = run.checkpoints_dir / "ckpt-00000099-run000-step-000000000099"
        link.symlink_to(outside, target_is_directory=True)
        assert names(run.checkpoints()) == ["step-000000000001"]  # a link is no checkpoint
        run.latest_file.write_text(link.name)
        with pytest.raises(CheckpointError, match="is a symbolic link"):
            run.latest()
        run.latest_file.unlink()
        run.latest_file.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(CheckpointError, match="LATEST: is a symbolic link"):
            run.latest()


def test_latest_naming_a_missing_folder_falls_back_with_a_warning(tmp_path: Path) -> None:
    with RunDir(tmp_path) as run:
        run.save(step_tensors(1), {}, step=1)
        run.save(step_tensors(2), {}, step=2)
        run.latest_file.write_text("step-000000000777")
        with pytest.warns(UserWarning, match="names 'step-000000000777', which is not a"):
            assert nm(run.latest()) == "step-000000000002"


def test_load_latest_falls_back_to_an_older_intact_checkpoint(tmp_path: Path) -> None:
    with RunDir(tmp_path, keep_last=3) as run:
        for step in (1, 2, 3):
            run.save(step_tensors(step), {"step": step}, step=step)
        newest = run.latest()
        flip_bit(newest / TENSOR_FILE, 100)
        (run.checkpoints()[1] / STATE_FILE).unlink()
        with pytest.warns(UserWarning) as record:
            path, tensors, state = run.load_latest()
        assert nm(path) == "step-000000000001" and state == {"step": 1} and tensors["w"][0] == 1
        messages = [str(w.message) for w in record]
        assert messages == [
            f"skipping damaged checkpoint {newest}: tensors.safetensors: checksum mismatch: "
            "the file is damaged",
            f"skipping damaged checkpoint {run.checkpoints()[1]}: state.json: missing",
        ]
        report = verify_run_dir(tmp_path)
        assert [problem for _, problem in report] == [
            None,
            "state.json: missing",
            "tensors.safetensors: checksum mismatch: the file is damaged",
        ]
        (run.checkpoints()[0] / TENSOR_FILE).write_bytes(b"")
        with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
            run.load_latest()
        assert info.value.problem.startswith(
            "no intact checkpoint: ckpt-00000003-run000-step-000000000003 ("
        )
        assert (
            "ckpt-00000001-run000-step-000000000001 (tensors.safetensors: truncated: 0 bytes"
            in info.value.problem
        )


def test_load_latest_does_not_skip_a_newer_schema(tmp_path: Path) -> None:
    with RunDir(tmp_path) as run:
        run.save(step_tensors(1), {}, step=1)
        run.save(step_tensors(2), {}, step=2)
        rewrite_state(run.latest(), schema_version=SCHEMA_VERSION + 1)
        with pytest.raises(UnsupportedSchemaError, match="upgrade warmfit"):
            run.load_latest()


def test_clean_temporary(tmp_path: Path) -> None:
    with RunDir(tmp_path) as run:
        run.save(step_tensors(1), {}, step=1)
        (run.checkpoints_dir / ".tmp-step-000000000002-1-ab").mkdir()
        (run.checkpoints_dir / ".tmp-step-000000000002-1-ab" / TENSOR_FILE).write_bytes(b"x")
        (run.checkpoints_dir / ".trash-step-000000000000-1-cd").mkdir()
        (run.checkpoints_dir / ".tmp-LATEST-1-ef").write_text("x")
        assert names(run.checkpoints()) == ["step-000000000001"]
        run.clean_temporary()
        assert sorted(os.listdir(run.checkpoints_dir)) == [
            "LATEST", "ckpt-00000001-run000-step-000000000001", "index.json"
        ]  # fmt: skip


# --------------------------------------------------------------------------- lock

HOLD_LOCK = """
import sys, time
from warmfit.rundir import RunDir
run = RunDir(sys.argv[1])
run.lock()
print("locked", flush=True)
time.sleep(60)
"""


def start_lock_holder(root: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(warmfit.__file__).parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_held_by_another_process_then_killed(tmp_path: Path) -> None:
    proc = start_lock_holder(tmp_path)
    try:
        run = RunDir(tmp_path)
        with pytest.raises(RunDirLockedError) as info:
            run.lock()
        assert info.value.pid == proc.pid
        assert f"locked by process {proc.pid}" in str(info.value)
        assert not run.locked
        proc.kill()  # SIGKILL: no cleanup runs in the holder
        proc.wait()
        lock = json.loads(run.lock_file.read_text())
        assert lock["pid"] == proc.pid  # its stale record is still there ...
        run.lock()  # ... yet the lock is free
        assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
        run.unlock()
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_reentrant_per_object_and_exclusive_between_objects(tmp_path: Path) -> None:
    first, second = RunDir(tmp_path), RunDir(tmp_path)
    with first:
        with first:
            with pytest.raises(RunDirLockedError) as info:
                second.lock()
            assert info.value.pid == os.getpid()
        assert first.locked  # still held by the outer 'with'
    assert not first.locked
    with second:
        pass


def test_lock_held_by_this_process_says_so(tmp_path: Path) -> None:
    first, second = RunDir(tmp_path), RunDir(tmp_path)
    with first, pytest.raises(RunDirLockedError) as info:
        second.lock()
    message = str(info.value)
    assert info.value.pid == os.getpid()
    assert f"is locked by this process (pid {os.getpid()})" in message
    assert "close()" in message and "with warmfit.Trainer(" in message and "del " in message
    assert "Wait for it to finish" not in message
    assert not second.locked
    with second:  # free again once the first let go
        pass


def test_lock_is_released_when_the_run_dir_is_dropped(tmp_path: Path) -> None:
    first = RunDir(tmp_path)
    first.lock()
    del first  # never unlocked
    second = RunDir(tmp_path)
    second.lock()
    assert json.loads(second.lock_file.read_text())["pid"] == os.getpid()
    second.unlock()


def test_lock_of_an_unreachable_cycle_is_collected_before_refusing(tmp_path: Path) -> None:
    enabled = gc.isenabled()
    gc.disable()
    try:
        first = RunDir(tmp_path)
        first.lock()
        first.cycle = first  # type: ignore[attr-defined]  # like a dropped Trainer in a cycle
        ref = weakref.ref(first)
        del first
        assert ref() is not None  # not collected yet, so it still holds the lock
        second = RunDir(tmp_path)
        second.lock()  # collects it, which releases its lock, then takes it
        assert ref() is None and second.locked
        second.unlock()
    finally:
        if enabled:
            gc.enable()


def test_collecting_an_unlocked_run_dir_closes_nothing(tmp_path: Path) -> None:
    first = RunDir(tmp_path)
    first.lock()
    first.unlock()  # closes the lock's descriptor, whose number the next open reuses
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        del first
        gc.collect()
        os.fstat(other)  # still open: the release ran once, at unlock()
        with RunDir(tmp_path):
            pass
    finally:
        os.close(other)


def test_copies_of_a_locked_run_dir_do_not_hold_the_lock(tmp_path: Path) -> None:
    with RunDir(tmp_path, keep_last=2) as run:
        for clone in (copy.copy(run), copy.deepcopy(run), pickle.loads(pickle.dumps(run))):
            assert not clone.locked and clone.root == run.root and clone.keep_last == 2
            with pytest.raises(RunDirLockedError, match="locked by this process"):
                clone.lock()
            clone.unlock()  # a no-op: it holds nothing
            del clone
        gc.collect()
        assert run.locked
        run.save(step_tensors(1), {}, step=1)


def test_lock_still_held_at_exit_is_released_cleanly(tmp_path: Path) -> None:
    code = "import sys; from warmfit.rundir import RunDir; RunDir(sys.argv[1]).lock"
    keep = code + "(); run = RunDir(sys.argv[1] + '/kept'); run.lock()"
    env = dict(os.environ, PYTHONPATH=str(Path(warmfit.__file__).parents[1]))
    done = subprocess.run(
        [sys.executable, "-c", keep, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert (done.returncode, done.stderr) == (0, "")
    for root in (tmp_path, tmp_path / "kept"):  # dropped at once; still referenced at exit
        assert (root / "lock").read_text() == ""  # the holder's record was cleared


def test_a_dropped_trainer_releases_its_run_dir(tmp_path: Path) -> None:
    """The reported bug: a helper that builds a Trainer on a run directory, called
    twice in one process (or a notebook cell run again)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype(np.float32), rng.integers(0, 2, 32)

    def train_one_more_epoch() -> int:
        trainer = warmfit.Trainer(
            lambda: torch.nn.Linear(4, 2),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            loss="cross_entropy",
            batch_size=8,
            verbose=0,
            run_dir=tmp_path,
        )
        trainer.fit(x, y, epochs=1)
        return trainer.epoch  # the trainer is dropped here, never closed

    assert train_one_more_epoch() == 1
    assert train_one_more_epoch() == 2  # resumed: the first one's lock was released


# --------------------------------------------------------------------------- failures


class FailingFsync:
    """Replaces os.fsync: the ``fail_at``-th call raises ENOSPC."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)


def prepared_run(root: Path) -> RunDir:
    run = RunDir(root, keep_last=2)
    run.lock()
    for step in (1, 2):
        run.save(step_tensors(step), {"step": step}, step=step, metric=float(step))
    return run


def test_failing_fsync_at_every_point_of_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = FailingFsync(None)
    run = prepared_run(tmp_path / "count")
    monkeypatch.setattr(os, "fsync", counter)
    run.save(step_tensors(3), {"step": 3}, step=3)  # retention deletes step 1 here
    monkeypatch.undo()
    run.unlock()
    total = counter.calls
    assert total >= 7
    outcomes = []
    for n in range(1, total + 1):
        run = prepared_run(tmp_path / f"fail-{n}")
        before = run.latest_file.read_text()
        monkeypatch.setattr(os, "fsync", FailingFsync(n))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                run.save(step_tensors(3), {"step": 3}, step=3)
        except CheckpointWriteError as exc:
            monkeypatch.undo()
            outcomes.append("failed")
            assert "[Errno 28] No space left on device" in str(exc)
            assert "previous checkpoint is intact" in str(exc)
            assert exc.errno == errno.ENOSPC
            assert run.latest_file.read_text() == before
            assert names(run.checkpoints()) == ["step-000000000001", "step-000000000002"]
            path, _, state = run.load_latest()
            assert nm(path) == "step-000000000002" and state == {"step": 2}
        except UserWarning as warning:  # the save committed; deleting old ones failed
            monkeypatch.undo()
            outcomes.append("committed")
            assert "was saved, but deleting old checkpoints failed" in str(warning)
            assert nm(run.latest()) == "step-000000000003"
        else:
            monkeypatch.undo()
            pytest.fail(f"fsync call {n} failed but nobody was told")
        finally:
            monkeypatch.undo()
        leftovers = [e for e in os.listdir(run.checkpoints_dir) if e.startswith(".")]
        assert leftovers == [], (n, leftovers)
        assert all(problem is None for _, problem in verify_run_dir(run.root))
        run.unlock()
    # fsyncs: tensors, state, tmp dir, parent; index (file, dir); LATEST (file, dir) all
    # make the save fail; only the index rewrite after deleting old checkpoints commits.
    assert outcomes == ["failed"] * 8 + ["committed"] * (total - 8), outcomes


def test_failing_write_of_tensor_data_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = prepared_run(tmp_path)

    # fail while streaming tensor bytes: the write path of the tensor file
    real = ck._write_tensor_file

    def failing(file: Path, entries: list) -> tuple[str, int]:
        real(file, entries)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ck, "_write_tensor_file", failing)
    with pytest.raises(CheckpointWriteError, match=r"not written: \[Errno 5\]"):
        run.save(step_tensors(3), {}, step=3)
    assert names(run.checkpoints()) == ["step-000000000001", "step-000000000002"]
    assert [e for e in os.listdir(run.checkpoints_dir) if e.startswith(".")] == []
    run.unlock()


# --------------------------------------------------------------------------- background


def test_async_writer_surfaces_a_worker_error_at_next_submit_and_wait() -> None:
    ran: list[int] = []
    release = threading.Event()

    def fail() -> None:
        release.wait(5)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = AsyncWriter()
    writer.submit(fail)
    assert writer.busy
    release.set()
    with pytest.raises(SaveFailedError) as info:
        writer.submit(ran.append, 1)
    assert str(info.value) == "previous checkpoint save failed: [Errno 28] No space left on device"
    assert isinstance(info.value.__cause__, OSError)
    assert ran == []  # the new save was not started
    writer.submit(ran.append, 2)
    writer.wait()
    assert ran == [2] and not writer.busy

    writer.submit(lambda: 1 / 0)
    with pytest.raises(SaveFailedError, match="failed: ZeroDivisionError: division by zero"):
        writer.wait()
    writer.wait()  # reported once
    writer.close()
    with pytest.raises(WarmfitError, match="after close"):
        writer.submit(ran.append, 3)


def test_async_writer_runs_one_save_at_a_time(tmp_path: Path) -> None:
    buffers = SnapshotBuffers()
    weights = {"w": np.zeros(1000, np.float32)}
    with RunDir(tmp_path, keep_last=None) as run, AsyncWriter() as writer:
        for step in range(1, 6):
            weights["w"] += 1
            writer.wait()  # the previous save no longer reads the buffers
            snapshot = buffers.copy(weights)
            writer.submit(run.save, snapshot, {"step": step}, step=step)
            weights["w"] += 1000  # training goes on; the snapshot is unaffected
        writer.wait()
        for path in run.checkpoints():
            tensors, state = read_checkpoint(path)
            assert tensors["w"][0] == state["step"] + 1000 * (state["step"] - 1)


def test_snapshot_buffers_are_reused() -> None:
    buffers = SnapshotBuffers()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = buffers.copy({"a": a, "b": np.array(1)})
    a += 1
    second = buffers.copy({"a": a})
    assert second["a"] is first["a"]  # same buffer, no new allocation
    assert np.array_equal(second["a"], a) and second["a"] is not a
    assert buffers.nbytes == a.nbytes  # 'b' was dropped
    third = buffers.copy({"a": np.zeros((3, 3), np.float64)})
    assert third["a"] is not first["a"] and third["a"].shape == (3, 3)


def test_snapshot_state_is_a_deep_plain_copy() -> None:
    history = [{"loss": 0.5}]
    state = {"history": history, "betas": (0.9, 0.999), "best": float("nan")}
    snap = snapshot_state(state)
    history.append({"loss": 0.4})  # training goes on
    assert snap["history"] == [{"loss": 0.5}] and snap["betas"] == [0.9, 0.999]
    assert np.isnan(snap["best"])
    with pytest.raises(TypeError, match=r"state\['h'\] is a numpy.int64"):
        snapshot_state({"h": np.int64(1)})


def test_large_files_are_hashed_in_a_second_thread_with_the_same_checksum(tmp_path: Path) -> None:
    """Above ck._THREAD_HASH_BYTES the checksum is computed in a second thread, on
    both the write and the read path; the result is the file's checksum all the same."""
    n = ck._THREAD_HASH_BYTES // 8 + 1024
    tensors = {"w": np.arange(n, dtype=np.float64), "b": np.ones(3, np.float32)}
    path = write_checkpoint(tmp_path / "ck", tensors, {})
    tfile = path / TENSOR_FILE
    assert tfile.stat().st_size > ck._THREAD_HASH_BYTES
    doc = json.loads((path / STATE_FILE).read_text())
    assert doc["tensors_checksum"] == xxhash.xxh3_128(tfile.read_bytes()).hexdigest()
    loaded, _ = read_checkpoint(path)
    assert np.array_equal(loaded["w"], tensors["w"])
    flip_bit(tfile, tfile.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="checksum mismatch: the file is damaged"):
        read_checkpoint(path)


def test_unlock_releases_the_lock_that_a_forked_child_shares(tmp_path: Path) -> None:
    """A child forked while the lock is held (a multiprocessing pool, DataLoader workers)
    shares the locked open file: unlock() must still release it, not wait for the child."""
    import multiprocessing

    run = RunDir(tmp_path)
    run.lock()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(os.getpid) != os.getpid()  # the child is alive
        run.unlock()
        other = RunDir(tmp_path)
        other.lock()  # raised RunDirLockedError while the child lived
        other.unlock()
