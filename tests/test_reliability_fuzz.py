"""Untrusted input (issue 9): fuzzing of the checkpoint loader, of
``Trainer.load_state_dict``, of the SPEC loader, and of skops payloads.

Nothing may escape but warmfit's documented exceptions, and nothing may execute code.
CI runs a fixed short budget (``max_examples=150``); ``WARMFIT_LONG=1`` runs 3000 per
property. A longer, coverage-guided run uses atheris when it is installed (the suite
never needs it)::

    .venv/bin/python tests/test_reliability_fuzz.py --atheris -atheris_runs=200000
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import warmfit.spec as spec_mod
from conftest import LONG, make_data, make_trainer, require
from warmfit.backends import FRAMEWORKS
from warmfit.checkpoint import (
    SCHEMA_VERSION,
    STATE_FILE,
    TENSOR_FILE,
    read_checkpoint,
    write_checkpoint,
)
from warmfit.errors import CheckpointError, StateMismatchError

#: Mutated settings are reported on load as they should be; not a finding here.
pytestmark = pytest.mark.filterwarnings("ignore:resuming with different settings")

EXAMPLES = 3000 if LONG else 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _write_raw(folder: Path, tensor_bytes: bytes, state: Any = None, doc: Any = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TENSOR_FILE).write_bytes(tensor_bytes)
    if doc is None:
        state = {} if state is None else state
        text = json.dumps(state, ensure_ascii=False, allow_nan=True).encode("utf-8")
        doc = {
            "schema_version": SCHEMA_VERSION,
            "checksum": "xxh3_128",
            "tensors_checksum": xxhash.xxh3_128(tensor_bytes).hexdigest(),
            "tensors_bytes": len(tensor_bytes),
            "state": state,
            "state_checksum": xxhash.xxh3_128(text).hexdigest(),
        }
    (folder / STATE_FILE).write_text(json.dumps(doc, allow_nan=True))


def _load_or_checkpoint_error(folder: Path) -> tuple[dict, dict] | None:
    """read_checkpoint may succeed or raise CheckpointError naming the folder's file;
    anything else escapes (and fails the test)."""
    try:
        return read_checkpoint(folder)
    except CheckpointError as err:
        assert str(err).startswith(str(folder)), str(err)
        return None


def _refused(folder: Path) -> str:
    """read_checkpoint must raise CheckpointError naming the folder's file: its message."""
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(folder)
    assert str(err.value).startswith(str(folder)), str(err.value)
    return str(err.value)


#: safetensors dtype codes and the numpy dtype each stands for (the format's spec, written
#: out here rather than taken from warmfit). A tensor of any other code that loads is
#: not what its header says (numpy has no bfloat16 or float8).
#: dtypes NumPy lacks until a package registers them (ml_dtypes, which Keras imports):
#: with it loaded, the safetensors library reads them as these
EXTENSION_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


def _assert_is_what_the_header_says(data: bytes, tensors: dict[str, np.ndarray]) -> None:
    """The file's own header, read here: every tensor it names and no other, each with
    the header's dtype and shape, holding exactly the bytes of its data_offsets."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    assert sorted(tensors) == sorted(header)
    for name, a in tensors.items():
        info = header[name]
        if info["dtype"] in EXTENSION_DTYPES:  # NumPy has it once ml_dtypes is imported
            assert a.dtype.name == EXTENSION_DTYPES[info["dtype"]], (name, info, a.dtype)
        else:
            assert info["dtype"] in SAFETENSORS_DTYPES, (name, info, a.dtype)
            assert a.dtype == np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), (name, info, a.dtype)
        assert list(a.shape) == info["shape"], (name, info, a.shape)
        start, end = info["data_offsets"]
        assert a.tobytes() == body[start:end], name
        assert a.flags.writeable


# --------------------------------------------------------------------------- tensor file


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_with_a_matching_checksum(data):
    """Refused, or (a valid safetensors file by chance) exactly what its header says."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ck"
        _write_raw(folder, data)
        got = _load_or_checkpoint_error(folder)
        if got is not None:
            _assert_is_what_the_header_says(data, got[0])
            assert got[1] == {}


DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "F8_E4M3",
    "C64",
    "XX",
    "",
    "object",
    "O",
]

entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES) | st.text(max_size=5) | st.integers(),
        "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4)
        | st.lists(st.integers(min_value=0, max_value=6), max_size=3)
        | json_values,
        "data_offsets": st.lists(st.integers(min_value=-5, max_value=2**63), min_size=0, max_size=3)
        | st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list)
        | json_values,
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4),
    body=st.binary(max_size=128),
    pad=st.integers(0, 9),
)
def test_structured_safetensors_headers(header, body, pad):
    """Plausible headers with wrong dtypes, shapes, offsets, overlaps, NaN... either
    load as exactly what the header says (names, dtypes, shapes, bytes) or are a
    CheckpointError."""
    hb = json.dumps(header).encode() + b" " * pad
    data = len(hb).to_bytes(8, "little") + hb + body
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ck"
        _write_raw(folder, data)
        got = _load_or_checkpoint_error(folder)
        if got is not None:
            _assert_is_what_the_header_says(data, got[0])


@st.composite
def valid_files(draw: Any) -> tuple[bytes, bool]:
    """A well-formed safetensors file: 0-4 tensors of any dtype code (those numpy lacks
    too), small shapes, contiguous offsets in any header order, random data, optional
    metadata and padding. Also whether every dtype is one numpy has."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True))
    names = [n for n in names if n != "__metadata__"]
    codes = [
        draw(st.sampled_from([*SAFETENSORS_DTYPES, "BF16", "F8_E4M3", "F8_E5M2"])) for _ in names
    ]
    header: dict[str, Any] = {}
    offset = 0
    for name, code in zip(names, codes, strict=True):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * (
            np.dtype(SAFETENSORS_DTYPES[code]).itemsize
            if code in SAFETENSORS_DTYPES
            else 2
            if code == "BF16"
            else 1
        )
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "np"}
    order = draw(st.permutations(list(header)))
    hb = json.dumps({k: header[k] for k in order}).encode()
    hb += b" " * draw(st.integers(0, 9))
    body = draw(st.binary(min_size=offset, max_size=offset))
    return len(hb).to_bytes(8, "little") + hb + body, all(c in SAFETENSORS_DTYPES for c in codes)


@FUZZ
@given(file=valid_files())
def test_valid_safetensors_files_load_exactly(file):
    """A well-formed file of dtypes numpy has loads, as exactly what its header says;
    one with a dtype numpy lacks (bfloat16, float8) loads exactly too, or is refused."""
    data, numpy_dtypes = file
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ck"
        _write_raw(folder, data)
        got = read_checkpoint(folder) if numpy_dtypes else _load_or_checkpoint_error(folder)
        if got is not None:
            _assert_is_what_the_header_says(data, got[0])


def test_a_valid_header_of_every_dtype_loads_exactly():
    """The exact-load check above is not vacuous: a valid file of each dtype loads, and
    is what its header says."""
    body, header, offset = b"", {}, 0
    for i, (code, dt) in enumerate(SAFETENSORS_DTYPES.items()):
        raw = bytes(range(i, i + 2 * np.dtype(dt).itemsize))
        if code == "BOOL":
            raw = bytes([0, 1])
        header[f"t{i}"] = {"dtype": code, "shape": [2], "data_offsets": [offset, offset + len(raw)]}
        body, offset = body + raw, offset + len(raw)
    hb = json.dumps(header).encode()
    data = len(hb).to_bytes(8, "little") + hb + body
    with tempfile.TemporaryDirectory() as d:
        _write_raw(Path(d) / "ck", data)
        tensors, _ = read_checkpoint(Path(d) / "ck")
    assert len(tensors) == len(SAFETENSORS_DTYPES)
    _assert_is_what_the_header_says(data, tensors)


@FUZZ
@given(doc=json_values)
def test_random_json_as_state_file(doc):
    """No JSON value but a checkpoint's own envelope (with the tensor file's checksum)
    is a state.json: every one is refused."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ck"
        write_checkpoint(folder, {"a": np.arange(3)}, {})
        (folder / STATE_FILE).write_text(json.dumps(doc, allow_nan=True))
        _refused(folder)


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(
            ["schema_version", "checksum", "tensors_checksum", "tensors_bytes", "state", "x"]
        ),
        json_values,
    )
)
def test_random_envelopes(fields):
    """Refused, or (the edit kept the envelope valid) exactly the checkpoint written."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ck"
        write_checkpoint(folder, {"a": np.arange(3)}, {})
        doc = json.loads((folder / STATE_FILE).read_text())
        doc.update(fields)
        (folder / STATE_FILE).write_text(json.dumps(doc, allow_nan=True))
        got = _load_or_checkpoint_error(folder)
        if got is not None:
            tensors, state = got
            assert sorted(tensors) == ["a"]
            a = tensors["a"]
            assert a.dtype == np.arange(3).dtype and a.tobytes() == np.arange(3).tobytes()
            assert state == {}


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_state_file(raw):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ck"
        write_checkpoint(folder, {"a": np.arange(3)}, {})
        (folder / STATE_FILE).write_bytes(raw)
        _refused(folder)


class _Marker:
    path = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_of_every_protocol_are_refused_and_run_nothing(tmp_path, protocol):
    _Marker.path = str(tmp_path / "pwned")
    folder = tmp_path / "ck"
    _write_raw(folder, pickle.dumps({"w": _Marker()}, protocol=protocol))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- Trainer state


X, Y = make_data(64)
FIT = {"epochs": 1, "validation_split": 0.25}  # the call good_state's trainer made


@pytest.fixture(scope="module")
def good_state() -> dict:
    t = make_trainer()
    t.fit(X, Y, **FIT)
    return t.state_dict()


@pytest.fixture(scope="module")
def mid_epoch_state() -> dict:
    """Two steps into the first epoch: a partial epoch's loss sums and offset in use."""
    t = make_trainer()
    t.fit(X, Y, steps=2, validation_split=0.25)
    return t.state_dict()


WHERE = ["epoch end", "mid-epoch"]


def _state(request: pytest.FixtureRequest, where: str) -> dict:
    return request.getfixturevalue("good_state" if where == "epoch end" else "mid_epoch_state")


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list) and len(obj) < 8:
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(sd: dict, path: tuple, action: str, value: Any) -> None:
    parent = sd
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if action == "delete":
        del parent[key]
    else:
        parent[key] = value


def _json(value: Any) -> str:
    """Exact, typed: 1 and 1.0, 0.0 and -0.0, True and 1 differ; NaN equals NaN."""
    return json.dumps(value, sort_keys=True, allow_nan=True)


def _assert_tensors_are(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, a in expected.items():
        b = np.asarray(got[name])
        assert (b.dtype, b.shape) == (a.dtype, a.shape), name
        assert b.tobytes() == np.ascontiguousarray(a).tobytes(), name


def _assert_unchanged(t: Any, before: dict) -> None:
    """The trainer's whole state is ``before``, byte for byte."""
    now = t.state_dict()
    _assert_tensors_are(now["tensors"], before["tensors"])
    assert sorted(now["state"]) == sorted(before["state"])
    for key, value in before["state"].items():
        assert _json(now["state"][key]) == _json(value), key


#: What a Trainer takes from a state as it is, so after an accepted load its own
#: state_dict() holds exactly these entries of the state given. The others are compared
#: with the Trainer's own (settings, version, the schedule's description: a difference is
#: a warning, then a refused continue) or decoded into the optimizer and the schedule.
RESTORED = ("counters", "rng", "epoch_partial", "history", "ledger", "callbacks", "data", "call")

#: How a continue call refuses, before anything changes, to go on from a state that is
#: not its call's: a setting (StateMismatchError), or the data or the cursor (ValueError,
#: starting with these words).
CONTINUE_REFUSALS = (
    "The data of this 'continue' call has shape ",
    "validation_split=0.25 differs ",
    "Cannot resume at sample ",
)


def _load_then_continue(sd: dict) -> str:
    """What load_state_dict and a continue call may do with a mutated state, and nothing
    else: refuse it at load with StateMismatchError, changing nothing; or take it, and
    then hold exactly its tensors and RESTORED entries, and the next continue call
    trains or refuses as documented, changing nothing."""
    t = make_trainer()
    before = t.state_dict()
    try:
        t.load_state_dict(sd)
    except StateMismatchError:
        _assert_unchanged(t, before)
        return "refused at load"
    loaded = t.state_dict()
    _assert_tensors_are(loaded["tensors"], sd["tensors"])
    for key in RESTORED:
        assert _json(loaded["state"].get(key)) == _json(sd["state"].get(key)), key
    try:
        t.fit(X, Y, **FIT)
    except StateMismatchError:
        pass
    except ValueError as err:  # anything else (KeyError, TypeError, ...) fails the test
        if not str(err).startswith(CONTINUE_REFUSALS):
            raise
    else:
        return "trained"
    _assert_unchanged(t, loaded)
    return "refused by continue"


# Mutations taken today that should be refused: each is an xfail(strict=True) test below,
# which fails once the bug is fixed; then drop its line here, so the fuzzing covers it.
def _known_bug(sd: dict, path: tuple, action: str) -> str | None:
    if path[:3] == ("backend", "optimizer", "param_groups") and path[-1:] == ("amsgrad",):
        return "test_malformed_optimizer_hyperparameters_are_refused_at_load"
    return None


@pytest.mark.parametrize("where", WHERE)
@FUZZ
@given(data=st.data())
def test_load_state_dict_with_malformed_states(request, where, data):
    sd = copy.deepcopy(_state(request, where))
    paths = [p for p in _paths(sd["state"]) if p]
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["delete", "replace"]))
    value = data.draw(json_values)
    _mutate(sd["state"], path, action, value)
    assume(_known_bug(sd, path, action) is None)
    _load_then_continue(sd)


@pytest.mark.parametrize("where", WHERE)
def test_an_unchanged_state_loads_and_trains(request, where):
    """The properties' accepting branch is reachable and checked."""
    assert _load_then_continue(copy.deepcopy(_state(request, where))) == "trained"


def test_a_failed_load_state_dict_changes_nothing(good_state):
    sd = copy.deepcopy(good_state)
    del sd["state"]["history"]
    t = make_trainer()
    t.fit(X[:32], Y[:32], epochs=1)  # a trainer with a state of its own to lose
    before = t.state_dict()
    with pytest.raises(StateMismatchError, match="^the state is incomplete or malformed: "):
        t.load_state_dict(sd)
    _assert_unchanged(t, before)


def _mutate_tensor(sd: dict, name: str, action: str) -> None:
    a = sd["tensors"][name]
    if action == "delete":
        del sd["tensors"][name]
    elif action == "reshape":
        sd["tensors"][name] = np.zeros((a.size + 1,), dtype=a.dtype)
    elif action == "retype":
        sd["tensors"][name] = a.astype(np.float64 if a.dtype != np.float64 else np.int8)
    elif action == "extra":
        sd["tensors"]["model/extra"] = np.zeros(3, dtype=np.float32)
    else:
        sd["tensors"][name] = np.zeros((0,), dtype=a.dtype)


@pytest.mark.parametrize("where", WHERE)
@FUZZ
@given(data=st.data())
def test_load_state_dict_with_malformed_tensors(request, where, data):
    """Tensors: missing, extra, reshaped, retyped, emptied arrays (model weights,
    optimizer slots, RNG state, the validation rows): refused at load with
    StateMismatchError, or taken exactly as given and trained from."""
    sd = copy.deepcopy(_state(request, where))
    name = data.draw(st.sampled_from(sorted(sd["tensors"])))
    action = data.draw(st.sampled_from(["delete", "reshape", "retype", "extra", "empty"]))
    # Known bugs: test_an_optimizer_slot_missing_is_refused_at_load (exp_avg, exp_avg_sq)
    # and test_a_state_missing_an_optimizer_step_is_refused_before_anything_changes.
    assume(not (action == "delete" and name.startswith("optim/")))
    _mutate_tensor(sd, name, action)
    _load_then_continue(sd)


@pytest.mark.parametrize(
    "name, value",
    [
        ("rng/torch_cpu", np.zeros(7, dtype=np.uint8)),
        ("optim/0/exp_avg", np.zeros(3, dtype=np.float32)),
    ],
)
def test_load_state_dict_rng_and_slot_errors(good_state, name, value):
    """A wrong-sized RNG state or Adam slot is refused at load (it used to be taken, and
    fail later inside fit), and the trainer is left as it was."""
    sd = copy.deepcopy(good_state)
    sd["tensors"][name] = value
    t = make_trainer()
    before = t.state_dict()
    with pytest.raises(StateMismatchError):
        t.load_state_dict(sd)
    _assert_unchanged(t, before)


# -- bugs the strict properties above found (accepted at load, then a raw error in fit or
# a silently other state); each fails ("XPASS strict") the moment it is fixed.

def _refused_at_load(sd: dict) -> None:
    t = make_trainer()
    before = t.state_dict()
    with pytest.raises(StateMismatchError):
        t.load_state_dict(sd)
    _assert_unchanged(t, before)


@pytest.mark.parametrize("name", ["optim/0/exp_avg", "optim/3/exp_avg_sq"])
def test_an_optimizer_slot_missing_is_refused_at_load(good_state, name):
    """Was taken, and the next fit died with a raw KeyError naming the slot; refused."""
    sd = copy.deepcopy(good_state)
    del sd["tensors"][name]
    _refused_at_load(sd)


@pytest.mark.parametrize(
    "params", [[0, False, 2, 3], [1, 0, 2, 3], [0, 1, 2, 3.0]], ids=["a-bool", "swapped", "a-float"]
)
def test_optimizer_group_params_that_would_misplace_the_slots_are_refused(good_state, params):
    """Found by the long run: ``params`` [0, False, 2, 3] was taken, and torch (which maps
    the saved slots to parameters by these indices; False == 0) gave parameter 1 the
    slots of parameter 0, silently."""
    sd = copy.deepcopy(good_state)
    assert sd["state"]["backend"]["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    sd["state"]["backend"]["optimizer"]["param_groups"][0]["params"] = params
    _refused_at_load(sd)


@pytest.mark.parametrize("name", ["optim/0/step", "optim/1/step"])
def test_a_state_missing_an_optimizer_step_is_refused_before_anything_changes(good_state, name):
    """Was refused only after the model's weights were replaced (half-loaded); refused
    before anything changes now."""
    sd = copy.deepcopy(good_state)
    del sd["tensors"][name]
    _refused_at_load(sd)


@pytest.mark.parametrize(
    "key, value",
    [
        ("betas", [0.9]),
        ("betas", None),
        ("amsgrad", True),  # a flag of the right kind, without the slot AMSGrad needs
        ("eps", "x"),
        ("weight_decay", None),
    ],
    ids=["betas-one", "betas-deleted", "amsgrad-without-its-slot", "eps-str", "weight_decay-None"],
)
def test_malformed_optimizer_hyperparameters_are_refused_at_load(good_state, key, value):
    """Were taken, and the next fit died inside torch (ValueError, KeyError, TypeError);
    each is refused as a value of the wrong kind now, and amsgrad=True without the
    max_exp_avg_sq slot it needs (a flag of the right kind) as an inconsistent state."""
    sd = copy.deepcopy(good_state)
    group = sd["state"]["backend"]["optimizer"]["param_groups"][0]
    if value is None and key == "betas":
        del group[key]
    else:
        group[key] = value
    _refused_at_load(sd)


@pytest.mark.parametrize(
    "key, value",
    [("history", [[]]), ("ledger", {}), ("ledger", [[["call", 0]]]), ("callbacks", {})],
    ids=["history-row-a-list", "ledger-a-dict", "ledger-row-pairs", "callbacks-a-dict"],
)
def test_records_that_are_not_lists_of_dicts_are_refused_at_load(good_state, key, value):
    """Was taken and converted (``dict(row)``: [] became {}, pairs a dict, {} a list);
    refused since the fifth session."""
    sd = copy.deepcopy(good_state)
    sd["state"][key] = value
    _refused_at_load(sd)


def test_a_history_row_without_its_segment_is_refused_at_load(good_state):
    """Was taken, and the next fit died with a raw KeyError: 'segment'; refused now."""
    sd = copy.deepcopy(good_state)
    del sd["state"]["history"][0]["segment"]
    _refused_at_load(sd)


@pytest.mark.parametrize(
    "rows", [[], [-1], [0, 0], [1000]], ids=["empty", "negative", "twice", "out-of-range"]
)
def test_validation_rows_that_no_split_gives_are_refused(good_state, rows):
    """``data/val_rows`` was taken as any 1-D integer array (empty: the continue call
    silently trained on every row and validated on none; -1 or a repeated row: silently
    another split; out of range: a raw IndexError inside fit); refused at load now."""
    sd = copy.deepcopy(good_state)
    sd["tensors"]["data/val_rows"] = np.array(rows, dtype=np.int64)
    _refused_at_load(sd)


# --------------------------------------------------------------------------- SPEC loader

SPEC_KEYS = list(spec_mod.KEYS)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _toml_string(v: str) -> str:
    """A TOML basic string of ``v`` (JSON's escapes, non-ASCII as it is: TOML has no
    surrogate pairs; a lone surrogate stays escaped, which TOML refuses)."""
    surrogates = any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    # JSON leaves DEL (U+007F) as it is; TOML allows it only escaped.
    return json.dumps(v, ensure_ascii=surrogates).replace("\x7f", "\\u007f")


toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["a:b", "os:system", "builtins:eval", "x", "", ":", "a.b:c.d", "cpu"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda c: (
        st.lists(c, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=6), c, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    doc=st.dictionaries(st.sampled_from([*SPEC_KEYS, "unknown", "Model"]), toml_values, max_size=8)
)
def test_load_spec_with_random_documents(tmp_path, doc):
    """Any TOML document: load_spec raises SpecError or returns a Spec of exactly that
    document; it imports nothing (importing happens only when building)."""
    f = tmp_path / "spec.toml"
    f.write_text("\n".join(f"{k} = {_toml_value(v)}" for k, v in doc.items()) + "\n")
    before = set(sys.modules)
    _spec_or_spec_error(f)
    assert set(sys.modules) - before == set()


def _spec_or_spec_error(f: Path) -> None:
    """load_spec raises SpecError naming the file, or returns the file's own document."""
    try:
        spec = spec_mod.load_spec(f)
    except spec_mod.SpecError as err:
        assert str(err).startswith(f"spec {f}: "), str(err)
        return
    assert spec.path == f
    assert repr(spec.raw) == repr(tomllib.loads(f.read_text(encoding="utf-8")))
    assert set(spec.raw) <= set(SPEC_KEYS)
    assert {k for k, (required, _) in spec_mod.KEYS.items() if required} <= set(spec.raw)


_names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=8)
_refs = st.sampled_from(["m:f", "pkg.mod:make_model", "a.b:c.d", "models:Net.build"])

#: A valid value of each spec key, from the descriptions in warmfit.spec.KEYS.
VALID_SPEC_VALUES = {
    "model": _refs,
    "data": _refs,
    "optimizer": _refs,
    "loss": st.sampled_from(["cross_entropy", "mse", "losses:focal"]),
    "schedule": _refs,
    "batch_size": st.integers(1, 2**40),
    "seed": st.integers(0, 2**40),
    "epochs": st.integers(1, 2**40),
    "metrics": st.lists(st.sampled_from(["accuracy", "m:f"]), max_size=2),
    "callbacks": st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["EarlyStopping", "OverfittingMonitor", "m:Cb"])},
            optional={"patience": st.integers(0, 9)},
        ),
        max_size=2,
    ),
    "checkpoint_every": st.integers(1, 2**40),
    "keep_last": st.integers(1, 2**40),
    "validation_split": st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    "run_dir": _names,
    "device": _names,
    "deterministic": st.booleans(),
    "monitor": _names,
    "monitor_mode": st.sampled_from(["min", "max"]),
    "verbose": st.integers(0, 2**40),
    "step": _refs,
    "framework": st.sampled_from(FRAMEWORKS),
    "estimators_per_round": st.integers(1, 2**40),
    "precision": st.sampled_from(["32", "bf16", "fp16"]),
    "accumulate": st.integers(1, 2**40),
    "clip_grad_norm": st.one_of(
        st.integers(1, 2**40), st.floats(0.0, 1e9, exclude_min=True, allow_nan=False)
    ),
    "ema": st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    "ema_warmup": st.booleans(),
}


@FUZZ
@given(data=st.data())
def test_load_spec_with_a_valid_document_and_one_change(tmp_path, data):
    """A valid spec (its required keys and some optional ones) loads as exactly that
    document. Changed in one place (a key given a random value, removed, or an unknown
    key added), it loads as exactly the changed document or is a SpecError naming that
    key."""
    assert set(VALID_SPEC_VALUES) == set(SPEC_KEYS)
    keys = [k for k in SPEC_KEYS if spec_mod.KEYS[k][0]]
    keys += data.draw(st.lists(st.sampled_from(SPEC_KEYS), unique=True, max_size=8))
    doc = {k: data.draw(VALID_SPEC_VALUES[k]) for k in dict.fromkeys(keys)}
    change = data.draw(st.sampled_from(["none", "value", "remove", "unknown"]))
    key = data.draw(st.sampled_from(sorted(doc)))
    if change == "value":
        doc[key] = data.draw(toml_values)
    elif change == "remove":
        del doc[key]
    elif change == "unknown":
        key = data.draw(st.sampled_from(["Model", "epoch", "lr", "x"]))
        doc[key] = data.draw(toml_values)
    f = tmp_path / "spec.toml"
    f.write_text("\n".join(f"{k} = {_toml_value(v)}" for k, v in doc.items()) + "\n")
    try:
        spec = spec_mod.load_spec(f)
    except spec_mod.SpecError as err:
        assert change != "none", str(err)
        assert str(err).startswith(f"spec {f}: "), str(err)
        named = f"unknown key {key!r}" if change == "unknown" else f"{key!r} "
        assert named in str(err), (change, key, str(err))
        if change == "remove":  # only a required key's absence is an error
            assert spec_mod.KEYS[key][0], str(err)
        return
    assert change != "unknown" and (change != "remove" or not spec_mod.KEYS[key][0])
    assert repr(spec.raw) == repr(tomllib.loads(f.read_text(encoding="utf-8")))
    assert set(spec.raw) <= set(SPEC_KEYS)


@FUZZ
@given(text=st.text(max_size=200))
def test_load_spec_with_random_text(tmp_path, text):
    f = tmp_path / "spec.toml"
    f.write_text(text, encoding="utf-8")
    _spec_or_spec_error(f)


def test_load_spec_with_binary_file(tmp_path):
    f = tmp_path / "spec.toml"
    f.write_bytes(b'model = "\xff\xfe"\n')
    with pytest.raises(spec_mod.SpecError, match="not valid TOML"):
        spec_mod.load_spec(f)


def test_load_spec_names_code_never_runs_it_at_load(tmp_path):
    """'os:system' is only a name until build; building a spec whose model is os:system
    would call it with no argument, which fails before doing anything."""
    f = tmp_path / "spec.toml"
    f.write_text('model = "os:system"\ndata = "os:getcwd"\noptimizer = "os:getpid"\nloss = "mse"\n')
    spec = spec_mod.load_spec(f)
    assert spec.raw["model"] == "os:system"


# --------------------------------------------------------------------------- skops


def test_skops_payload_with_an_untrusted_type_is_refused(tmp_path):
    sio = require("skops.io")  # the sklearn extra: a skip on a bare machine, a failure in CI
    from sklearn.preprocessing import FunctionTransformer

    import warmfit.backends.sklearn as sk

    payload = sio.dumps(FunctionTransformer(func=os.system))
    with pytest.raises(CheckpointError, match=r"untrusted types \['posix.system'\]"):
        sk.loads(payload)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_skops_loader_with_random_bytes(raw):
    """No payload but a skops zip archive can load: random bytes are always refused."""
    require("skops.io")
    import warmfit.backends.sklearn as sk

    with pytest.raises(CheckpointError):
        sk.loads(raw)


def test_sklearn_checkpoint_with_an_untrusted_payload_is_refused_by_the_trainer(tmp_path):
    sio = require("skops.io")
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import FunctionTransformer

    import warmfit
    from warmfit.rundir import RunDir

    x, y = make_data(64)
    run = tmp_path / "run"
    with warmfit.Trainer(SGDClassifier(random_state=0), run_dir=run, verbose=0) as t:
        t.fit(x, y, epochs=1)
    latest = RunDir(run).latest()
    tensors, state = read_checkpoint(latest)
    tensors["model/skops"] = np.frombuffer(
        sio.dumps(FunctionTransformer(func=os.system)), dtype=np.uint8
    )
    write_checkpoint(latest, tensors, state, overwrite=True)
    with pytest.raises(CheckpointError, match="untrusted types"):
        warmfit.Trainer(SGDClassifier(random_state=0), run_dir=run, verbose=0)


# --------------------------------------------------------------------------- atheris


def _atheris_main() -> None:  # pragma: no cover - run by hand, see the module docstring
    import atheris

    for name in [m for m in sys.modules if m == "warmfit" or m.startswith("warmfit.")]:
        del sys.modules[name]  # imported above uninstrumented: import them again, instrumented
    with atheris.instrument_imports(include=["warmfit"]):
        import warmfit.checkpoint as ckpt
        import warmfit.spec as spec
        from warmfit.errors import CheckpointError as Refused

    tmp = Path(tempfile.mkdtemp(prefix="warmfit-atheris-"))
    counts = {"runs": 0, "loaded": 0, "refused": 0}

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        which = fdp.ConsumeIntInRange(0, 2)
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        counts["runs"] += 1
        if which == 0:  # tensor file with a matching checksum
            folder = tmp / "t"
            _write_raw(folder, body)
            target = folder
        elif which == 1:  # state.json bytes
            folder = tmp / "s"
            if not folder.exists():
                ckpt.write_checkpoint(folder, {"a": np.arange(3)}, {})
            (folder / STATE_FILE).write_bytes(body)
            target = folder
        else:  # spec file (UTF-8 text only: binary is a known bug, see above)
            f = tmp / "spec.toml"
            f.write_bytes(body.decode("utf-8", "replace").encode())
            with contextlib.suppress(spec.SpecError):
                spec.load_spec(f)
            return
        try:
            ckpt.read_checkpoint(target)
            counts["loaded"] += 1
        except Refused:
            counts["refused"] += 1
        if counts["runs"] % 20000 == 0:
            print(f"ATHERIS {counts}", flush=True)

    import atexit

    atexit.register(lambda: print(f"ATHERIS final {counts}", flush=True))
    atheris.Setup([a for a in sys.argv if a != "--atheris"], one)
    atheris.Fuzz()


if __name__ == "__main__" and "--atheris" in sys.argv:  # pragma: no cover
    _atheris_main()
