"""Corruption of a run directory (issue 9): every damage is detected by
``read_checkpoint`` with a clear error, and the Trainer's auto-resume falls back to the
newest intact checkpoint with a warning. Zero silent wrong loads.

The run directory holds two checkpoints, A (step 6) and B (step 12, ``LATEST``); each
case damages B (or the pointers) in a copy. ``test_checkpoint.py`` holds the unit tests
of single cases; this battery sweeps them (every sixteenth of the file, many bit flips,
every field of ``state.json``) and checks the Trainer's fallback for each.
``WARMFIT_LONG=1`` flips 400 bits per region instead of 8.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import warmfit
from conftest import LONG, assert_same_state, make_data, make_trainer
from warmfit.checkpoint import (
    SCHEMA_VERSION,
    STATE_FILE,
    TENSOR_FILE,
    UnsupportedSchemaError,
    read_checkpoint,
    write_checkpoint,
)
from warmfit.errors import CheckpointError
from warmfit.rundir import RunDir, verify_run_dir

X, Y = make_data(96)  # 6 steps per epoch


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "run"
    with make_trainer(run_dir=root, keep_last=5) as t:
        t.fit(X, Y, epochs=1)
        t.fit(X, Y, epochs=1)
    return root


@pytest.fixture
def run(tmp_path: Path, pristine: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def ckpts(run: Path) -> tuple[Path, Path]:
    a, b = RunDir(run).checkpoints()
    return a, b


def assert_read_fails(path: Path, fragment: str, error: type = CheckpointError) -> str:
    with pytest.raises(error) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert fragment in msg, msg
    return msg


def assert_trainer_falls_back(run: Path) -> None:
    """Auto-resume skips the damaged newest checkpoint with a warning and loads A, whose
    tensors are then in the trainer bit for bit."""
    a, _ = ckpts(run)
    expected, _ = read_checkpoint(a)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*ckpt-00000002"):
        t = make_trainer(run_dir=run, keep_last=5)
    try:
        assert t.global_step == 6
        now = t.state_dict()["tensors"]
        for k, v in expected.items():
            assert torch.equal(torch.from_numpy(now[k]), torch.from_numpy(v)), k
    finally:
        t.close()


# --------------------------------------------------------------------------- tensor file


@pytest.mark.parametrize("sixteenth", range(16))
def test_truncation_at_each_sixteenth(run, sixteenth):
    _, b = ckpts(run)
    f = b / TENSOR_FILE
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size * sixteenth // 16)
    msg = assert_read_fails(b, "truncated: ")
    assert msg.startswith(f"{f}: truncated: {size * sixteenth // 16} bytes, expected {size}")
    assert [p.name for p, why in verify_run_dir(run) if why] == [b.name]
    assert_trainer_falls_back(run)


FLIPS = 400 if LONG else 8


def _header_len(f: Path) -> int:
    return 8 + int.from_bytes(f.read_bytes()[:8], "little")


@pytest.mark.parametrize("region", ["header", "data"])
def test_random_bit_flips_are_checksum_mismatches(run, region):
    _, b = ckpts(run)
    f = b / TENSOR_FILE
    original = f.read_bytes()
    hlen = _header_len(f)
    rng = random.Random(f"flip-{region}")
    for _ in range(FLIPS):
        pos = rng.randrange(0, hlen) if region == "header" else rng.randrange(hlen, len(original))
        damaged = bytearray(original)
        damaged[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(damaged))
        assert_read_fails(b, "checksum mismatch: the file is damaged")
    print(f"\nCORRUPTION bitflips region={region} flips={FLIPS} detected={FLIPS}")
    assert_trainer_falls_back(run)


def test_bit_flips_without_verify_are_caught_only_when_structural(run):
    """read_checkpoint(verify=False) skips the checksum (a documented speed option; the
    Trainer and ``warmfit verify`` always verify). A flip that breaks the header's
    structure is still refused, as safetensors parses it; one that keeps it a valid
    header (here a letter of a tensor's name) and any flip in the data load without a
    word, and only the checksum tells."""
    _, b = ckpts(run)
    f = b / TENSOR_FILE
    original = f.read_bytes()
    saved, _ = read_checkpoint(b)

    def flipped(pos: int, bit: int = 0) -> None:
        damaged = bytearray(original)
        damaged[pos] ^= 1 << bit
        f.write_bytes(bytes(damaged))

    flipped(4)  # the header length: now 2**32 more, too large for the file
    with pytest.raises(CheckpointError, match="not a safetensors file: header length"):
        read_checkpoint(b, verify=False)
    flipped(original.index(b'"rng/torch_cpu"') + 5)  # "rng/torch_cpu" -> "rng/uorch_cpu"
    tensors, _ = read_checkpoint(b, verify=False)
    assert sorted(tensors) == sorted({*saved} - {"rng/torch_cpu"} | {"rng/uorch_cpu"})
    assert_read_fails(b, "checksum mismatch: the file is damaged")
    hlen = _header_len(f)
    flipped(hlen + 3)  # the fourth byte of the data: in the tensor stored first
    header = json.loads(original[8:hlen])
    header.pop("__metadata__", None)
    first = next(k for k, v in header.items() if v["data_offsets"][0] <= 3 < v["data_offsets"][1])
    tensors, _ = read_checkpoint(b, verify=False)
    assert [k for k in saved if tensors[k].tobytes() != saved[k].tobytes()] == [first]
    start, end = header[first]["data_offsets"]
    assert tensors[first].tobytes() == f.read_bytes()[hlen + start : hlen + end]
    assert_read_fails(b, "checksum mismatch: the file is damaged")


@pytest.mark.parametrize("missing", [STATE_FILE, TENSOR_FILE, "both"])
def test_missing_files(run, missing):
    _, b = ckpts(run)
    names = [STATE_FILE, TENSOR_FILE] if missing == "both" else [missing]
    for name in names:
        (b / name).unlink()
    assert_read_fails(b, f"{b / names[0]}: missing")
    assert_trainer_falls_back(run)


def test_pickle_posing_as_the_tensor_file_with_a_matching_checksum(run, tmp_path):
    """Even with state.json updated to the pickle's size and checksum, nothing runs."""
    import xxhash

    _, b = ckpts(run)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({"x": Evil()})
    (b / TENSOR_FILE).write_bytes(payload)
    doc = json.loads((b / STATE_FILE).read_text())
    doc["tensors_checksum"] = xxhash.xxh3_128(payload).hexdigest()
    doc["tensors_bytes"] = len(payload)
    (b / STATE_FILE).write_text(json.dumps(doc))
    assert_read_fails(b, "not a safetensors file")
    assert_trainer_falls_back(run)
    assert not marker.exists()


# --------------------------------------------------------------------------- state.json


def _edit(b: Path, fn) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads((b / STATE_FILE).read_text())
    fn(doc)
    (b / STATE_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("case", "edit", "fragment"),
    [
        ("schema 0", lambda d: d.update(schema_version=0), "unknown schema version 0"),
        ("schema str", lambda d: d.update(schema_version="1"), "schema_version is '1'"),
        ("schema missing", lambda d: d.pop("schema_version"), "schema_version is None"),
        ("checksum edited", lambda d: d.update(tensors_checksum="0" * 32), "checksum mismatch"),
        ("checksum int", lambda d: d.update(tensors_checksum=5), "tensors_checksum is a int"),
        ("algorithm", lambda d: d.update(checksum="md5"), "checksum is 'md5', expected 'xxh3_128'"),
        ("no algorithm", lambda d: d.pop("checksum"), "missing field 'checksum'"),
        ("bytes +1", lambda d: d.update(tensors_bytes=d["tensors_bytes"] + 1), "truncated"),
        ("bytes -1", lambda d: d.update(tensors_bytes=d["tensors_bytes"] - 1), "wrong size"),
        ("bytes huge", lambda d: d.update(tensors_bytes=10**40), "truncated"),
        ("bytes float", lambda d: d.update(tensors_bytes=1.0), "tensors_bytes is a float"),
        ("state list", lambda d: d.update(state=[]), "state is a list"),
        ("state missing", lambda d: d.pop("state"), "missing field 'state'"),
        ("empty object", lambda d: d.clear(), "schema_version is None"),
    ],
)
def test_edited_state_file_envelope(run, case, edit, fragment):
    _, b = ckpts(run)
    _edit(b, edit)
    assert_read_fails(b, fragment)
    assert_trainer_falls_back(run)


def test_state_file_not_json_or_not_utf8(run):
    _, b = ckpts(run)
    (b / STATE_FILE).write_bytes(b"\xff\xfe{")
    assert_read_fails(b, "not valid JSON: not UTF-8 text")
    assert_trainer_falls_back(run)


def test_newer_schema_is_not_skipped(run):
    _, b = ckpts(run)
    _edit(b, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    assert_read_fails(b, "upgrade warmfit", UnsupportedSchemaError)
    with pytest.raises(UnsupportedSchemaError, match="written by a newer warmfit"):
        make_trainer(run_dir=run)


def _set(path: tuple, value: Any):  # type: ignore[no-untyped-def]
    def fn(doc: dict) -> None:
        d = doc["state"]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return fn


def _del(path: tuple):  # type: ignore[no-untyped-def]
    def fn(doc: dict) -> None:
        d = doc["state"]
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return fn


#: Edits that keep state.json valid JSON and its envelope intact. What the Trainer did
#: with each before the fix (see RELIABILITY.md): "silent" = loaded without a word.
STATE_EDITS = {
    "global_step +1 (silent)": _set(("counters", "global_step"), 13),
    "global_step 10**30 (silent)": _set(("counters", "global_step"), 10**30),
    "offset 10**12 (silent)": _set(("counters", "offset"), 10**12),
    "global_step str": _set(("counters", "global_step"), "5"),
    "epoch -1": _set(("counters", "epoch"), -1),
    "counters list": _set(("counters",), [1]),
    "history missing (KeyError)": _del(("history",)),
    "history str (silent)": _set(("history",), "x"),
    "rng missing (KeyError)": _del(("rng",)),
    "rng host garbage (silent)": _set(("rng", "host"), {"python": [1, 2], "numpy": 3}),
    "ledger missing (KeyError)": _del(("ledger",)),
    "ledger int (TypeError)": _set(("ledger",), 5),
    "epoch_partial missing (KeyError)": _del(("epoch_partial",)),
    "epoch_partial bad (KeyError)": _set(("epoch_partial",), {"loss_sum": "a"}),
    "schedule null (AttributeError)": _set(("schedule",), None),
    "schedule unknown kind": _set(("schedule",), {"config": {"kind": "bogus"}}),
    "optimizer scalars bad (ValueError from torch)": _set(
        ("backend", "optimizer", "scalars"), {"0": {"step": "x"}}
    ),
    "callbacks str": _set(("callbacks",), "x"),
    "data 7 (silent)": _set(("data",), 7),
    "settings 5 (TypeError)": _set(("settings",), 5),
    "loss value changed (silent)": _set(("epoch_partial", "loss_sum"), 123.0),
    "ledger record changed (silent)": _set(("ledger", 0, "mode"), "warm"),
}


@pytest.mark.parametrize("case", list(STATE_EDITS))
def test_edited_state_values_are_detected_and_skipped(run, case):
    _, b = ckpts(run)
    _edit(b, STATE_EDITS[case])
    msg = assert_read_fails(b, f"{b / STATE_FILE}: ")
    assert msg == f"{b / STATE_FILE}: checksum mismatch: the state was damaged or edited"
    assert_trainer_falls_back(run)


def test_single_bit_flips_in_state_json_are_all_detected(run):
    _, b = ckpts(run)
    f = b / STATE_FILE
    original = f.read_bytes()
    digits = [i for i, c in enumerate(original) if chr(c).isdigit()]
    rng = random.Random("state-flip")
    silent = []
    for pos in rng.sample(digits, 40):
        damaged = bytearray(original)
        damaged[pos] ^= 1  # '0'<->'1', '2'<->'3', ...: still valid JSON
        f.write_bytes(bytes(damaged))
        try:
            read_checkpoint(b)
        except CheckpointError:
            continue
        silent.append(pos)
    assert silent == []


# --------------------------------------------------------------------------- pointers


@pytest.mark.parametrize(
    "content", ["../../etc", "/etc", "..", "ckpt-00000001-run000-step-000000000006/../../x"]
)
def test_latest_pointing_outside_stops_the_trainer(run, content):
    (run / "checkpoints" / "LATEST").write_text(content)
    with pytest.raises(CheckpointError, match="points outside the run directory"):
        make_trainer(run_dir=run)


def test_latest_as_a_symlink_stops_the_trainer(run, tmp_path):
    latest = run / "checkpoints" / "LATEST"
    outside = tmp_path / "elsewhere"
    outside.write_text("ckpt-00000001-run000-step-000000000006\n")
    latest.unlink()
    latest.symlink_to(outside)
    with pytest.raises(CheckpointError, match="LATEST: is a symbolic link; refusing to follow it"):
        make_trainer(run_dir=run)


def test_checkpoint_folder_symlinked_from_outside_is_never_loaded(run, tmp_path):
    """A newer-looking checkpoint folder that is a symlink to a (valid) checkpoint
    elsewhere is not a checkpoint: resume ignores it; LATEST naming it is refused."""
    a, b = ckpts(run)
    foreign = tmp_path / "foreign"
    with make_trainer(seed=99) as t:
        t.fit(X, Y, epochs=3)
        t.save(foreign)
    link = run / "checkpoints" / "ckpt-00000009-run000-step-000000000018"
    link.symlink_to(foreign, target_is_directory=True)
    assert RunDir(run).checkpoints() == [a, b]
    with make_trainer(run_dir=run, keep_last=5) as t:
        assert t.global_step == 12
    (run / "checkpoints" / "LATEST").write_text(link.name)
    with pytest.raises(CheckpointError, match="points outside the run directory"):
        make_trainer(run_dir=run)


def test_checkpoints_dir_as_a_symlink_is_refused(run, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(run / "checkpoints", moved)
    (run / "checkpoints").symlink_to(moved, target_is_directory=True)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        make_trainer(run_dir=run)


@pytest.mark.parametrize("name", [TENSOR_FILE, STATE_FILE])
def test_file_symlinked_out_of_the_checkpoint_is_refused(run, tmp_path, name):
    _, b = ckpts(run)
    outside = tmp_path / f"outside-{name}"
    shutil.move(b / name, outside)
    (b / name).symlink_to(outside)
    assert_read_fails(b, "symbolic link")
    assert_trainer_falls_back(run)


def test_latest_naming_garbage_falls_back_with_a_warning(run):
    (run / "checkpoints" / "LATEST").write_text("hello")
    with pytest.warns(UserWarning, match="names 'hello', which is not a checkpoint folder"):
        t = make_trainer(run_dir=run, keep_last=5)
    assert t.global_step == 12
    t.close()


def test_latest_with_binary_garbage_falls_back_with_a_warning(run):
    (run / "checkpoints" / "LATEST").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.warns(UserWarning, match="which is not a checkpoint folder"):
        t = make_trainer(run_dir=run, keep_last=5)
    assert t.global_step == 12
    t.close()


def test_missing_latest_uses_the_newest_folder(run):
    (run / "checkpoints" / "LATEST").unlink()
    with make_trainer(run_dir=run, keep_last=5) as t:
        assert t.global_step == 12


def test_damaged_index_only_forgets_metrics(run):
    (run / "checkpoints" / "index.json").write_text("{not json")
    with make_trainer(run_dir=run, keep_last=5) as t:
        assert t.global_step == 12
        with pytest.warns(UserWarning, match="index.json is damaged"):
            t.fit(X, Y, epochs=1)


def test_every_checkpoint_damaged_lists_every_problem(run):
    a, b = ckpts(run)
    (a / STATE_FILE).unlink()
    with open(b / TENSOR_FILE, "r+b") as f:
        f.truncate(100)
    with (
        pytest.warns(UserWarning, match="skipping damaged checkpoint"),
        pytest.raises(CheckpointError) as err,
    ):
        make_trainer(run_dir=run)
    msg = str(err.value)
    assert msg.startswith(f"{run / 'checkpoints'}: no intact checkpoint: ")
    assert f"{b.name} (tensors.safetensors: truncated: 100 bytes" in msg
    assert f"{a.name} (state.json: missing)" in msg


def test_verify_cli_reports_each_damaged_checkpoint(run):
    import subprocess
    import sys

    a, b = ckpts(run)
    with open(b / TENSOR_FILE, "r+b") as f:
        f.truncate(10)
    proc = subprocess.run(
        [sys.executable, "-m", "warmfit", "verify", str(run)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert f"DAMAGED  {b}: tensors.safetensors: truncated: 10 bytes" in proc.stdout
    assert f"ok       {a}" in proc.stdout
    assert "2 checkpoints, 1 damaged" in proc.stdout


def test_loaded_arrays_match_what_was_saved(pristine):
    """The control: an undamaged run dir loads B and equals a straight run."""
    ref = make_trainer()
    ref.fit(X, Y, epochs=1)
    ref.fit(X, Y, epochs=1)
    with make_trainer(run_dir=pristine, keep_last=5) as t:
        assert t.global_step == 12
        assert_same_state(t, ref)
    summary = warmfit.checkpoint.inspect_checkpoint(ckpts(pristine)[1])
    assert summary["checksum_ok"] is True and summary["counters"]["global_step"] == 12


@pytest.mark.parametrize(
    "case",
    [
        "settings 5 (TypeError)",
        "history missing (KeyError)",
        "schedule null (AttributeError)",
        "ledger int (TypeError)",
        "counters list",
        "rng host garbage (silent)",
    ],
)
def test_malformed_state_with_valid_checksums_is_a_state_mismatch(run, case):
    """Rewritten through write_checkpoint (so every checksum matches, as a buggy or
    hostile writer would): the Trainer refuses it with StateMismatchError, unchanged."""
    _, b = ckpts(run)
    tensors, state = read_checkpoint(b)
    doc = {"state": state}
    STATE_EDITS[case](doc)
    write_checkpoint(b, tensors, doc["state"], overwrite=True)
    with pytest.raises(warmfit.StateMismatchError):
        make_trainer(run_dir=run)
