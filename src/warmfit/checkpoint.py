"""Checkpoints on disk: the format, atomic writes, integrity, the run directory, saving
in the background.

This module owns:

- the checkpoint folder: ``tensors.safetensors`` (every array, written by our own
  streaming safetensors writer so a save never holds the whole file in memory) and
  ``state.json`` (everything else, with :data:`SCHEMA_VERSION`, the size and the
  XXH3-128 checksum of the tensor file, and the checksum of the state itself);
- atomic writes: a checkpoint is written to ``.tmp-*``, fsync'd, then renamed into
  place; pointer and index files are replaced with ``os.replace``;
- integrity on load: every problem is a :class:`~warmfit.errors.CheckpointError` that
  names the file and what is wrong. **Loading never unpickles**;
- the run directory (:class:`RunDir`): the ``LATEST`` pointer, retention (per run: the
  last k and the best), the lock against a second writer (released also when the
  ``RunDir`` is dropped), falling back to the newest intact checkpoint;
- saving in the background (:class:`AsyncWriter`, :class:`SnapshotBuffers`).

It does not own what goes into a checkpoint (the state manifest, ``state.py``) nor
when to save (the Trainer). It imports only the standard library, numpy, safetensors
and xxhash.

The checksums detect damage (a torn write, a flipped bit, a truncated copy, an edit),
not tampering: whoever can rewrite the file can rewrite its checksum too, so a
cryptographic hash would buy nothing and cost its speed. Safety against a hostile file
comes from never unpickling. XXH3-128 runs at ~15 GB/s on one core, SHA-256 at
~1.5 GB/s, which bounded resume (schema 1 used SHA-256 and is still read).

Layout of a run directory::

    <root>/lock                          fcntl.flock'd; JSON {pid, host, started}
    <root>/checkpoints/ckpt-00000007-run000-step-000000001000/{tensors.safetensors, state.json}
    <root>/checkpoints/LATEST            text: the name of the newest checkpoint folder
    <root>/checkpoints/index.json        step and metric of each checkpoint (for retention)
    <root>/checkpoints/.tmp-* .trash-*   in-progress writes and deletions, never checkpoints

The commit point of :meth:`RunDir.save` is the replacement of ``LATEST``: a process
killed at any instant leaves either the previous state or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import math
import numbers
import os
import queue
import re
import secrets
import shutil
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from safetensors import safe_open

from warmfit.errors import CheckpointError, RunDirLockedError, WarmfitError, invalid_param

__all__ = [
    "LATEST",
    "SCHEMA_VERSION",
    "STATE_FILE",
    "TENSOR_FILE",
    "AsyncWriter",
    "CheckpointExistsError",
    "CheckpointWriteError",
    "RunDir",
    "SaveFailedError",
    "SnapshotBuffers",
    "UnsupportedSchemaError",
    "inspect_checkpoint",
    "read_checkpoint",
    "read_state",
    "snapshot_state",
    "verify_run_dir",
    "write_checkpoint",
]

SCHEMA_VERSION: int = 2
TENSOR_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
LATEST = "LATEST"
INDEX_FILE = "index.json"
LOCK_FILE = "lock"
CHECKPOINTS_DIR = "checkpoints"

# numpy kind + itemsize -> safetensors dtype name. Nothing else is written.
_CODES: dict[str, str] = {
    "b1": "BOOL",
    "u1": "U8",
    "i1": "I8",
    "i2": "I16",
    "i4": "I32",
    "i8": "I64",
    "u2": "U16",
    "u4": "U32",
    "u8": "U64",
    "f2": "F16",
    "f4": "F32",
    "f8": "F64",
}
_NUMPY_NAMES: dict[str, str] = {code: np.dtype(k).name for k, code in _CODES.items()}
_ITEMSIZES: dict[str, int] = {code: int(k[1]) for k, code in _CODES.items()}
_METADATA_KEY = "__metadata__"
# The checksum each schema version records, and the state.json fields that hold it.
CHECKSUM = "xxh3_128"
_HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHECKSUM_FIELDS: dict[int, tuple[str, str, str]] = {
    # version: (algorithm, field of the tensor file's checksum, field of the state's)
    1: ("sha256", "tensors_sha256", "state_sha256"),
    2: (CHECKSUM, "tensors_checksum", "state_checksum"),
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_NAME_RE = re.compile(r"ckpt-(\d{8,})-run(\d{3,})-step-(\d{12,})")


class CheckpointExistsError(WarmfitError, FileExistsError):
    """:func:`write_checkpoint` was asked to write over an existing path without
    ``overwrite=True``."""


class CheckpointWriteError(CheckpointError):
    """A save failed (full disk, I/O error, failing fsync). Nothing was changed: the
    previous checkpoint and ``LATEST`` are intact. ``errno`` is the cause's errno."""

    def __init__(self, path: object, problem: str, errno_: int | None = None) -> None:
        super().__init__(path, problem)
        self.errno = errno_


class UnsupportedSchemaError(CheckpointError):
    """A checkpoint's schema version is not one this warmfit reads."""


class SaveFailedError(WarmfitError):
    """A background save failed; raised at the next :meth:`AsyncWriter.submit` or
    :meth:`AsyncWriter.wait`. The cause is chained (``__cause__``)."""


# --------------------------------------------------------------------------- writing


def write_checkpoint(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    state: dict,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically and durably; return ``path``.

    ``tensors`` maps any ``str`` (except ``"__metadata__"``, which safetensors reserves)
    to a numpy array (or numpy scalar, stored 0-d) of dtype bool, (u)int8/16/32/64 or
    float16/32/64, any shape including 0-d and empty. Arrays are written bit-exactly,
    little-endian, in C order.

    ``state`` must be JSON data: dicts with ``str`` keys, lists, tuples (read back as
    lists), str, int, float (NaN and infinities are kept), bool and None. Anything else
    raises :class:`TypeError` naming the key path (e.g. ``state['history'][3]``),
    before anything touches the disk.

    The folder is written as ``<parent>/.tmp-<name>-<pid>-<random>/``: the tensor file
    is streamed one array at a time (memory stays at most one array's contiguous copy)
    while its checksum is computed; then ``state.json``; both files and the folder are
    fsync'd, the folder is renamed to ``path`` and the parent is fsync'd.

    If ``path`` exists: :class:`CheckpointExistsError`, unless ``overwrite=True``, in
    which case the old folder is moved aside, the new one renamed in, and the old one
    deleted (a crash in between leaves the old one as ``.trash-*``).

    Any failure (full disk, I/O error, failing fsync) raises
    :class:`CheckpointWriteError` naming the cause, removes the temporary folder, and
    leaves whatever was at ``path`` before in place.
    """
    path = Path(path)
    entries = _prepare_tensors(tensors)
    _check_json(state, "")
    try:
        state_tail = json.dumps(state, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError) as exc:  # pragma: no cover - _check_json catches these
        raise TypeError(f"state is not JSON-serialisable: {exc}") from exc
    if os.path.lexists(path) and not overwrite:
        raise CheckpointExistsError(
            f"{path} already exists. Pass overwrite=True to replace it, or choose another path."
        )

    parent = path.parent
    tmp = parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
        digest, nbytes = _write_tensor_file(tmp / TENSOR_FILE, entries)
        head = json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "checksum": CHECKSUM,
                "tensors_checksum": digest,
                "tensors_bytes": nbytes,
                "state_checksum": _state_checksum(state_tail, CHECKSUM),
            }
        )
        # Splice the state in rather than dumping one dict, so 'state' stays last.
        text = head[:-1] + ', "state": ' + state_tail + "}\n"
        _write_durably(tmp / STATE_FILE, text.encode("utf-8"))
        _fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise

    aside: Path | None = None
    try:
        if os.path.lexists(path):
            aside = parent / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(path, aside)
        os.rename(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(aside, path)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise

    try:
        _fsync_dir(parent)
    except BaseException as exc:
        # The rename may not be durable; the caller is told the save failed, so the
        # new folder must not survive as if it had succeeded.
        with contextlib.suppress(OSError):
            _remove_dir(path)
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, path)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return path


def _write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(
        path,
        f"not written: {exc}. Nothing was changed; the previous checkpoint is intact.",
        exc.errno,
    )


def _prepare_tensors(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, str, tuple, Any]]:
    """Validate; return ``(name, code, shape, little-endian contiguous array)`` in the
    order safetensors itself uses (largest itemsize first, then name), which keeps each
    array aligned to its itemsize in the file."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to numpy arrays. Got {type(tensors)}.")
    entries = []
    for name, a in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str. Got {name!r} ({type(name).__name__}).")
        if name == _METADATA_KEY:
            raise ValueError(f"the tensor name {name!r} is reserved by the safetensors format.")
        if isinstance(a, np.generic):  # a numpy scalar: stored as a 0-d array
            a = np.asarray(a)
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"tensor {name!r} must be a numpy array. Got {type(a).__module__}."
                f"{type(a).__qualname__}; convert it with np.asarray() (or .numpy() for a "
                "CPU tensor) first."
            )
        code = _CODES.get(f"{a.dtype.kind}{a.dtype.itemsize}")
        if code is None:
            raise TypeError(
                f"tensor {name!r} has dtype {a.dtype}, which checkpoints do not store. "
                "Expected one of: " + ", ".join(_NUMPY_NAMES.values()) + ". Convert it (e.g. "
                "bfloat16 to float32, or raw bytes viewed as uint8)."
            )
        little = a.dtype.newbyteorder("<")
        flat = np.ascontiguousarray(a.astype(little, copy=False)).reshape(-1)
        entries.append((name, code, tuple(int(d) for d in a.shape), flat))
    entries.sort(key=lambda e: (-_ITEMSIZES[e[1]], e[0]))
    return entries


def _write_tensor_file(file: Path, entries: list[tuple[str, str, tuple, Any]]) -> tuple[str, int]:
    """Stream the safetensors format: 8-byte little-endian header length, JSON header
    padded with spaces to a multiple of 8, then the raw bytes of each array."""
    header: dict[str, Any] = {_METADATA_KEY: {"format": "np", "writer": "warmfit"}}
    offset = 0
    for name, code, shape, flat in entries:
        end = offset + flat.nbytes
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset += flat.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    chunks = [len(hb).to_bytes(8, "little") + hb]
    chunks += [memoryview(flat.view(np.uint8)) for _, _, _, flat in entries]
    hasher = _Hasher(CHECKSUM, 8 + len(hb) + offset)
    try:
        with open(file, "xb", buffering=0) as f:
            for chunk in chunks:
                for start in range(0, len(chunk), _IO_CHUNK):
                    hasher.update(chunk[start : start + _IO_CHUNK])
                _write_all(f, chunk)
            os.fsync(f.fileno())
    finally:
        digest = hasher.hexdigest()
    return digest, 8 + len(hb) + offset


_IO_CHUNK = 64 << 20  # bytes per os.write / readinto call on the large paths
_THREAD_HASH_BYTES = 16 << 20  # below this, hashing in line beats starting a thread


class _Hasher:
    """A checksum fed chunk by chunk while the caller reads or writes them. For a large
    file the chunks are hashed in a second thread (xxhash, like file I/O, releases the
    GIL), so hashing hides behind the I/O; for a small one, in line. The caller must
    not change a chunk it has passed in until :meth:`hexdigest` has returned."""

    def __init__(self, algorithm: str, nbytes: int) -> None:
        self._hash = _HASHES[algorithm]()
        self._pending: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        if nbytes >= _THREAD_HASH_BYTES:
            self._pending = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="warmfit-checksum")
            self._thread.start()

    def _run(self) -> None:
        assert self._pending is not None
        while (chunk := self._pending.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: Any) -> None:
        if self._pending is None:
            self._hash.update(chunk)
        else:
            self._pending.put(chunk)

    def hexdigest(self) -> str:
        """The checksum of every chunk passed in (waits for the thread; call it once,
        also on the error path, so the thread always ends)."""
        if self._thread is not None:
            self._pending.put(None)  # type: ignore[union-attr]
            self._thread.join()
            self._thread = None
        return self._hash.hexdigest()


def _write_all(f: Any, data: Any) -> None:
    """Write all of ``data`` to the unbuffered file ``f`` (whose writes may be short)."""
    view = memoryview(data)
    while view:
        n = f.write(view[:_IO_CHUNK])
        view = view[n:]


def _check_json(obj: object, where: str, seen: tuple[int, ...] = ()) -> None:
    """Refuse what JSON cannot bring back as it was, naming the key path."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in seen:
            raise TypeError(f"state{where} contains itself (a circular reference).")
        seen = (*seen, id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"state{where} has the key {key!r} of type {type(key).__name__}; keys "
                        "in the state must be str (JSON would turn it into a string, so it "
                        "would not come back as saved). Convert the key with str()."
                    )
                _check_json(value, f"{where}[{key!r}]", seen)
        else:
            for i, value in enumerate(obj):
                _check_json(value, f"{where}[{i}]", seen)
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    hint = (
        "put arrays in the tensors mapping"
        if isinstance(obj, np.ndarray)
        else "convert it with .item()"
        if isinstance(obj, np.generic)
        else "convert it to plain JSON data (dict, list, str, int, float, bool, None)"
    )
    raise TypeError(f"state{where or ' itself'} is a {kind}, which JSON cannot hold; {hint}.")


def _write_durably(file: Path, data: bytes) -> None:
    with open(file, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _replace_durably(file: Path, data: bytes) -> None:
    """Replace ``file`` atomically: write a sibling temp file, fsync, ``os.replace``,
    fsync the directory."""
    tmp = file.parent / f".tmp-{file.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_durably(tmp, data)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(file.parent)


def _remove_dir(path: Path) -> None:
    """Delete a folder so that a half-deleted one never looks like a checkpoint:
    rename it to ``.trash-*`` first. Raises OSError if the rename fails."""
    if not os.path.lexists(path):
        return
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Load ``(tensors, state)`` from a checkpoint folder. Never unpickles.

    Checks, in order, each failure a :class:`~warmfit.errors.CheckpointError` naming
    the file and the problem: the folder exists; ``state.json`` and
    ``tensors.safetensors`` exist; ``state.json`` is valid JSON, an object, with a
    schema version this warmfit reads (1 or :data:`SCHEMA_VERSION`; another raises
    :class:`UnsupportedSchemaError`, and a newer one says to upgrade warmfit) and a
    state matching its own checksum; the tensor file has the recorded size (else
    "truncated"); its header is a valid safetensors header (parsed by safetensors
    itself, which executes nothing: a pickle posing as the tensor file is refused);
    its checksum matches (only when ``verify``; computed in a second thread while
    the arrays are read, so the file is read once). A damaged file is reported as a
    checksum mismatch whether the damage is in the header or the data.

    Returned arrays are writable, native numpy arrays owned by the caller.
    """
    folder = Path(path)
    doc = _read_state_doc(folder)
    tfile = _check_tensor_file(folder, doc, verify=False)
    try:
        header = _read_header(tfile)
    except CheckpointError:
        # A damaged file is a checksum mismatch first, as if hashed before parsing.
        if verify and _file_checksum(tfile, doc["checksum"]) != doc["tensors_checksum"]:
            raise CheckpointError(tfile, "checksum mismatch: the file is damaged") from None
        raise
    fast = _read_tensor_data(tfile, header, doc["checksum"] if verify else None)
    if fast is not None:
        tensors, digest = fast
        if verify and digest != doc["tensors_checksum"]:
            raise CheckpointError(tfile, "checksum mismatch: the file is damaged")
        return tensors, doc["state"]
    # A dtype this reader does not map itself: hash, then let safetensors convert.
    _check_tensor_file(folder, doc, verify=verify)
    names = list(header)
    tensors = {}
    try:
        with safe_open(str(tfile), framework="numpy") as f:
            for name in names:
                a = f.get_tensor(name)
                tensors[name] = a if a.flags.writeable else a.copy()
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error type, TypeError, OSError...
        raise CheckpointError(tfile, f"not a safetensors file: {exc}") from exc
    return tensors, doc["state"]


def _read_tensor_data(
    tfile: Path, header: dict[str, dict[str, Any]], algorithm: str | None
) -> tuple[dict[str, np.ndarray], str | None] | None:
    """Read every array of a checked tensor file in one sequential pass, straight into
    fresh arrays, computing the file's checksum with ``algorithm`` (None: no checksum)
    in a second thread as the bytes arrive: one read of the file instead of a hashing
    pass then a copying pass. Returns None, having read nothing, for a layout it does
    not handle itself (a dtype numpy lacks, non-contiguous offsets), which the caller
    reads with safetensors."""
    layout = []
    pos = 0
    for name, info in header.items():
        code = info["dtype"]
        start, end = info["data_offsets"]
        if code not in _NUMPY_NAMES or start != pos:
            return None
        layout.append((name, np.dtype(_NUMPY_NAMES[code]).newbyteorder("<"), info["shape"], end))
        pos = end
    hasher = None if algorithm is None else _Hasher(algorithm, tfile.stat().st_size)
    digest = None
    tensors: dict[str, np.ndarray] = {}
    try:
        with open(tfile, "rb", buffering=0) as f:
            prefix = f.read(8)
            head = prefix + f.read(int.from_bytes(prefix, "little"))
            if hasher is not None:
                hasher.update(head)
            start = 0
            for name, dtype, shape, end in layout:
                buf = np.empty(end - start, dtype=np.uint8)
                view = memoryview(buf)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done : done + _IO_CHUNK])
                    if not n:
                        raise CheckpointError(tfile, f"truncated while reading {name!r}")
                    if hasher is not None:
                        hasher.update(view[done : done + n])
                    done += n
                a = buf.view(dtype).reshape(shape)
                tensors[name] = a if dtype.isnative else a.astype(dtype.newbyteorder("="))
                start = end
    except OSError as exc:
        raise CheckpointError(tfile, f"unreadable: {exc}") from exc
    finally:
        if hasher is not None:
            digest = hasher.hexdigest()
    return tensors, digest


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Summarise a checkpoint without loading its arrays (for ``warmfit inspect``).

    Returns ``{"path", "schema_version", "checksum", "tensors_bytes", "checksum_ok",
    "tensors", "state_keys"}`` where ``checksum`` names the algorithm, ``tensors``
    maps each name to ``(dtype, shape, nbytes)`` (numpy dtype name, or the
    safetensors code for dtypes numpy lacks) and ``state_keys`` lists the state
    dict's top-level keys. A checksum mismatch is
    reported as ``checksum_ok=False``; every other problem raises
    :class:`~warmfit.errors.CheckpointError`.
    """
    folder = Path(path)
    doc = _read_state_doc(folder)
    tfile = _check_tensor_file(folder, doc, verify=False)
    checksum_ok = _file_checksum(tfile, doc["checksum"]) == doc["tensors_checksum"]
    header = _read_header(tfile)
    summary: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, info in header.items():
        code, shape = info["dtype"], tuple(info["shape"])
        start, end = info["data_offsets"]
        summary[name] = (_NUMPY_NAMES.get(code, code), shape, end - start)
    return {
        "path": str(folder),
        "schema_version": doc["schema_version"],
        "checksum": doc["checksum"],
        "tensors_bytes": doc["tensors_bytes"],
        "checksum_ok": checksum_ok,
        "tensors": summary,
        "state_keys": list(doc["state"]),
    }


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (``state.json`` checked, tensors not read)."""
    return _read_state_doc(Path(path))["state"]


def _read_state_doc(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(folder, "missing: no checkpoint folder here")
    sfile = folder / STATE_FILE
    tfile = folder / TENSOR_FILE
    for file in (sfile, tfile):
        if file.is_symlink():
            raise CheckpointError(
                file, "is a symbolic link; refusing to follow it out of the checkpoint folder"
            )
    if not sfile.is_file():
        raise CheckpointError(sfile, "missing")
    if not tfile.is_file():
        raise CheckpointError(tfile, "missing")
    try:
        text = sfile.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(sfile, f"not valid JSON: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(sfile, f"unreadable: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(sfile, f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(
            sfile, f"not a warmfit state file: a JSON {type(doc).__name__}, expected an object"
        )
    version = doc.get("schema_version")
    if type(version) is not int:
        raise CheckpointError(
            sfile, f"not a warmfit state file: schema_version is {version!r}, expected an integer"
        )
    if version > SCHEMA_VERSION:
        raise UnsupportedSchemaError(
            sfile,
            f"unknown schema version {version}: written by a newer warmfit (schema "
            f"{version}; this warmfit reads {SCHEMA_VERSION}); upgrade warmfit",
        )
    if version not in _CHECKSUM_FIELDS:
        raise UnsupportedSchemaError(sfile, f"unknown schema version {version}")
    algorithm, tensors_field, state_field = _CHECKSUM_FIELDS[version]
    fields: tuple[tuple[str, type], ...] = ((tensors_field, str), ("tensors_bytes", int))
    if version >= 2:
        fields += (("checksum", str),)
    for key, kind in (*fields, (state_field, str), ("state", dict)):
        if key not in doc:
            raise CheckpointError(sfile, f"not a warmfit state file: missing field {key!r}")
        if type(doc[key]) is not kind:
            raise CheckpointError(
                sfile,
                f"not a warmfit state file: {key} is a {type(doc[key]).__name__}, "
                f"expected {kind.__name__}",
            )
    if version >= 2 and doc["checksum"] != algorithm:
        raise CheckpointError(
            sfile,
            f"not a warmfit state file: checksum is {doc['checksum']!r}, expected {algorithm!r}",
        )
    # The state's own checksum: an edit that keeps the JSON valid is still caught.
    text = json.dumps(doc["state"], ensure_ascii=False, allow_nan=True)
    if _state_checksum(text, algorithm) != doc[state_field]:
        raise CheckpointError(sfile, "checksum mismatch: the state was damaged or edited")
    # Readers see one shape whatever the version.
    doc["checksum"], doc["tensors_checksum"] = algorithm, doc[tensors_field]
    return doc


def _state_checksum(text: str, algorithm: str) -> str:
    """Checksum of the state as ``json.dumps`` writes it (a parsed state dumps back to
    the same text: floats round-trip, key order is kept)."""
    return _HASHES[algorithm](text.encode("utf-8")).hexdigest()


def _check_tensor_file(folder: Path, doc: dict[str, Any], *, verify: bool) -> Path:
    tfile = folder / TENSOR_FILE
    size = tfile.stat().st_size
    expected = doc["tensors_bytes"]
    if size < expected:
        raise CheckpointError(tfile, f"truncated: {size} bytes, expected {expected}")
    if size != expected:
        raise CheckpointError(tfile, f"wrong size: {size} bytes, expected {expected}")
    if verify and _file_checksum(tfile, doc["checksum"]) != doc["tensors_checksum"]:
        raise CheckpointError(tfile, "checksum mismatch: the file is damaged")
    return tfile


def _file_checksum(file: Path, algorithm: str) -> str:
    hash_ = _HASHES[algorithm]()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hash_.update(view[:n])
    return hash_.hexdigest()


def _read_header(tfile: Path) -> dict[str, dict[str, Any]]:
    """Read and check the safetensors header ourselves (for precise messages); return
    the tensor entries in file order. safetensors then checks it again on open."""
    size = tfile.stat().st_size
    with open(tfile, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(tfile, f"not a safetensors file: only {size} bytes")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                tfile, f"not a safetensors file: header length {n} does not fit a {size}-byte file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(tfile, f"not a safetensors file: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(tfile, "not a safetensors file: header is not a JSON object")
    header.pop(_METADATA_KEY, None)
    for name, info in header.items():
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int for o in info["data_offsets"])
        )
        if not ok:
            raise CheckpointError(tfile, f"not a safetensors file: bad header entry {name!r}")
    _open_with_safetensors(tfile)  # offsets, sizes, dtypes: safetensors' own validation
    return dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))


def _open_with_safetensors(tfile: Path) -> None:
    try:
        with safe_open(str(tfile), framework="numpy"):
            pass
    except Exception as exc:
        raise CheckpointError(tfile, f"not a safetensors file: {exc}") from exc


# --------------------------------------------------------------------------- run directory


def _name_number(path: Path, group: int) -> int:
    m = _NAME_RE.fullmatch(path.name)
    assert m is not None  # only called on names checkpoints() accepted
    return int(m.group(group))


def _sort_key(path: Path) -> int:
    """Save order: the sequence number every checkpoint name starts with."""
    return _name_number(path, 1)


def _run_of(path: Path) -> int:
    """The run (``counters.run``: 0, then +1 at each ``restart``) a checkpoint is of."""
    return _name_number(path, 2)


def _release_lock(fd: int, owner_pid: int) -> None:
    """Drop a run directory's lock: clear the holder's record, unlock, close the
    descriptor. Run by :meth:`RunDir.unlock`, or by the finalizer when the ``RunDir`` is
    garbage-collected or the interpreter exits. The owner unlocks explicitly: a forked
    child (a DataLoader worker, a multiprocessing pool) shares the open file, and
    closing alone would leave the lock held until every child exits. In a forked child
    it only closes the child's descriptor."""
    try:
        if os.getpid() == owner_pid:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunDir:
    """A run directory: checkpoint folders, the ``LATEST`` pointer, retention, a lock.

    Checkpoints live in ``<root>/checkpoints/ckpt-<seq>-run<run>-step-<global_step>``,
    where ``seq`` counts saves, so name order is save order — also across a restart
    (steps start again at 0 in a new run) and a rewind (training goes on from an
    earlier step). ``LATEST`` (in the same folder) holds the name of the last
    checkpoint saved and is replaced atomically; it is the commit point of
    :meth:`save`. "Newest" means "saved last" for retention and for the fallback of
    :meth:`latest`.

    Retention after each save applies within each run (the ``run<run>`` part of the
    name): every run keeps its ``keep_last`` newest checkpoints (``None``: all), plus
    its one with the best metric when ``keep_best`` (lowest for ``monitor_mode="min"``,
    highest for ``"max"``; the earliest wins a tie). So a ``restart`` never deletes the
    previous run: a finished run keeps its last ``keep_last`` and its best for good.
    The one ``LATEST`` names is never deleted. Metrics are recorded in ``index.json``.
    "Best" is per run too (:meth:`best`): metrics of different runs are not compared.

    The lock (:meth:`lock`, or ``with RunDir(...)``) is an ``fcntl.flock`` on
    ``<root>/lock``: the kernel drops it when its process dies, so a crashed or killed
    run never leaves a stale lock. Within a process it is released by :meth:`unlock`,
    or, failing that, when the ``RunDir`` is garbage-collected or the interpreter
    exits (a ``weakref.finalize``), so a ``RunDir`` (or a Trainer holding one) that is
    dropped without being closed does not keep it. A copy or a pickle of a ``RunDir``
    does not hold the lock. :meth:`save` and :meth:`clean_temporary` require it;
    reading does not.

    ``LATEST`` or a checkpoint folder that leads outside ``<root>/checkpoints`` (``..``,
    an absolute path, a symbolic link) is refused with
    :class:`~warmfit.errors.CheckpointError`.

    Constructing a ``RunDir`` touches nothing on disk.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        keep_last: int | None = 3,
        keep_best: bool = True,
        monitor_mode: str = "min",
    ) -> None:
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise invalid_param("keep_last", "RunDir", "an int >= 1 or None", keep_last)
        if monitor_mode not in ("min", "max"):
            raise invalid_param("monitor_mode", "RunDir", ("min", "max"), monitor_mode)
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor_mode = monitor_mode
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._lock_release: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The lock belongs to this object: a copy (or a pickle) starts unlocked.
        return {**self.__dict__, "_lock_fd": None, "_lock_depth": 0, "_lock_release": None}

    def __repr__(self) -> str:
        return (
            f"RunDir({str(self.root)!r}, keep_last={self.keep_last}, "
            f"keep_best={self.keep_best}, monitor_mode={self.monitor_mode!r})"
        )

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def latest_file(self) -> Path:
        return self.checkpoints_dir / LATEST

    @property
    def index_file(self) -> Path:
        return self.checkpoints_dir / INDEX_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock_fd is not None

    # -- lock ---------------------------------------------------------------------

    def lock(self) -> None:
        """Take the exclusive lock on the run directory (re-entrant for this object).

        Raises :class:`~warmfit.errors.RunDirLockedError` naming the holder's pid and
        host if another live process holds it. If the holder is this process, an
        unreachable ``RunDir`` (a dropped Trainer in a reference cycle) not yet
        collected may hold it: one ``gc.collect()`` releases such a lock, then the lock
        is tried again; if another ``RunDir`` of this process still holds it, the error
        says so and how to close it.
        """
        if self._lock_fd is not None:
            self._lock_depth += 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _try_flock(fd):
                pid, host = self._lock_holder(fd)
                if pid != os.getpid() or host != socket.gethostname():
                    raise RunDirLockedError(self.root, pid, host)
                gc.collect()
                if not _try_flock(fd):
                    raise RunDirLockedError(self.root, pid, host, this_process=True)
        except BaseException:
            os.close(fd)
            raise
        try:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            # Not fsync'd: the flock is the lock, and this text only names the holder
            # for the error message of a second taker (a crash drops both anyway).
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the flock
            raise
        self._lock_fd = fd
        self._lock_depth = 1
        self._lock_release = weakref.finalize(self, _release_lock, fd, os.getpid())

    @staticmethod
    def _lock_holder(fd: int) -> tuple[int, str]:
        # The holder writes its pid right after taking the lock: retry briefly.
        for _ in range(20):
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode())
                return int(info["pid"]), str(info.get("host", ""))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                time.sleep(0.01)
        return 0, ""

    def unlock(self) -> None:
        """Release one level of the lock; the last level releases it. No-op when not
        held. The lock file stays (deleting it would race with a new taker)."""
        if self._lock_fd is None:
            return
        self._lock_depth -= 1
        if self._lock_depth > 0:
            return
        release, self._lock_release, self._lock_fd = self._lock_release, None, None
        if release is not None:
            release()

    def __enter__(self) -> RunDir:
        self.lock()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()

    def _require_lock(self, what: str) -> None:
        if self._lock_fd is None:
            raise WarmfitError(
                f"RunDir.{what} needs the run directory's lock: call lock() first or use "
                f"'with RunDir({str(self.root)!r}) as run_dir:'."
            )

    # -- listing --------------------------------------------------------------------

    def _safe_checkpoints_dir(self) -> Path:
        cdir = self.checkpoints_dir
        if cdir.is_symlink():
            raise CheckpointError(
                cdir, "is a symbolic link; refusing to follow it out of the run directory"
            )
        return cdir

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest (lowest step) first. Temporary and
        half-deleted folders (``.tmp-*``, ``.trash-*``), files and symbolic links are
        not checkpoints."""
        cdir = self._safe_checkpoints_dir()
        if not cdir.is_dir():
            return []
        found = [
            Path(entry.path)
            for entry in os.scandir(cdir)
            if _NAME_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
        return sorted(found, key=_sort_key)

    def _inside(self, name: str, source: Path) -> Path:
        """``checkpoints_dir / name``, refusing anything that leads outside it."""
        cdir = self._safe_checkpoints_dir()
        if (
            not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or "\0" in name
            or os.path.isabs(name)
        ):
            raise CheckpointError(
                source,
                f"points outside the run directory: {name!r}; it must name a "
                f"checkpoint folder inside {cdir}",
            )
        target = cdir / name
        if target.is_symlink() or not target.resolve().is_relative_to(cdir.resolve()):
            raise CheckpointError(
                source,
                f"points outside the run directory: {name!r} is a symbolic link "
                f"(to {os.path.realpath(target)})",
            )
        return target

    def _read_latest_name(self) -> str | None:
        file = self.latest_file
        if file.is_symlink():
            raise CheckpointError(file, "is a symbolic link; refusing to follow it")
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(file, f"unreadable: {exc}") from exc
        # Bytes that are no text (a damaged file) name no checkpoint: latest() then falls
        # back to the newest checkpoint folder with a warning.
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return "<not UTF-8 text>"
        return "<contains NUL bytes>" if "\0" in text else text

    def latest(self) -> Path | None:
        """The checkpoint ``LATEST`` names; if it names no existing checkpoint folder
        (warns), the newest in :meth:`checkpoints`; None if there is none. Raises
        :class:`~warmfit.errors.CheckpointError` if ``LATEST`` leads outside the run
        directory."""
        name = self._read_latest_name()
        if name:
            target = self._inside(name, self.latest_file)
            if _NAME_RE.fullmatch(name) and target.is_dir():
                return target
        found = self.checkpoints()
        if name is not None and found:
            warnings.warn(
                f"{self.latest_file} names {name!r}, which is not a checkpoint folder; "
                f"using the newest checkpoint, {found[-1].name}",
                stacklevel=2,
            )
        return found[-1] if found else None

    def best(self, *, run: int | None = None) -> Path | None:
        """The checkpoint of run ``run`` with the best recorded metric (see the class
        docstring), or None if no existing checkpoint of that run has one. ``run=None``:
        the run of :meth:`latest` (the current one). Metrics of different runs are not
        compared: each run is its own training from scratch."""
        if run is not None and (
            isinstance(run, bool) or not isinstance(run, numbers.Integral) or run < 0
        ):
            raise invalid_param("run", "RunDir.best", "an int >= 0 or None", run)
        if run is None:
            latest = self.latest()
            if latest is None:
                return None
            run = _run_of(latest)
        found = [p for p in self.checkpoints() if _run_of(p) == run]
        return self._best_of(found, self._read_index())

    def _best_of(self, paths: list[Path], index: dict[str, dict[str, Any]]) -> Path | None:
        sign = 1.0 if self.monitor_mode == "min" else -1.0
        scored = []
        for path in paths:
            metric = index.get(path.name, {}).get("metric")
            if isinstance(metric, (int, float)) and math.isfinite(metric):
                scored.append((sign * metric, _sort_key(path), path))
        return min(scored)[2] if scored else None

    # -- loading --------------------------------------------------------------------

    def load_latest(self) -> tuple[Path, dict[str, np.ndarray], dict] | None:
        """Load the newest intact checkpoint: :meth:`latest`, then older ones.

        Each damaged one is skipped with a warning (``skipping damaged checkpoint
        <path>: <file>: <problem>``). Returns ``(path, tensors, state)``; None if there
        are no checkpoints. Raises :class:`~warmfit.errors.CheckpointError` listing
        every problem if all are damaged, and :class:`UnsupportedSchemaError` at once
        for a checkpoint written by a newer warmfit (falling back past it would
        silently lose progress; upgrade instead).
        """
        first = self.latest()
        if first is None:
            return None
        key = _sort_key(first)
        older = [p for p in reversed(self.checkpoints()) if _sort_key(p) < key]
        problems = []
        for path in [first, *older]:
            try:
                tensors, state = read_checkpoint(path)
            except UnsupportedSchemaError as exc:
                if "newer" in exc.problem:
                    raise
                problem = f"{Path(exc.path).name}: {exc.problem}"
            except CheckpointError as exc:
                problem = f"{Path(exc.path).name}: {exc.problem}"
            else:
                return path, tensors, state
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
            problems.append(f"{path.name} ({problem})")
        raise CheckpointError(self.checkpoints_dir, "no intact checkpoint: " + "; ".join(problems))

    # -- saving ---------------------------------------------------------------------

    def save(
        self,
        tensors: Mapping[str, np.ndarray],
        state: dict,
        *,
        step: int,
        metric: float | None = None,
        run: int = 0,
    ) -> Path:
        """Write a checkpoint for global step ``step``, point ``LATEST`` at it, then
        apply retention; return its path. Requires the lock.

        ``metric`` (lower is better for ``monitor_mode="min"``) ranks checkpoints for
        ``keep_best``; None or non-finite means unranked.

        If writing the checkpoint, the index or ``LATEST`` fails,
        :class:`CheckpointWriteError` is raised and nothing changed: ``LATEST`` and the
        previous checkpoints are as before and the new folder is removed. A failure
        while deleting old checkpoints only warns: the save itself succeeded.
        """
        self._require_lock("save")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise invalid_param("step", "RunDir.save", "an int >= 0", step)
        if metric is not None and (
            isinstance(metric, bool) or not isinstance(metric, numbers.Real)
        ):
            raise invalid_param("metric", "RunDir.save", "a float or None", metric)
        step = int(step)
        metric = None if metric is None or not math.isfinite(metric) else float(metric)
        cdir = self._safe_checkpoints_dir()
        found = self.checkpoints()
        seq = _sort_key(found[-1]) + 1 if found else 1
        name = f"ckpt-{seq:08d}-run{int(run):03d}-step-{step:012d}"
        while os.path.lexists(cdir / name):  # a leftover of a failed deletion
            seq += 1
            name = f"ckpt-{seq:08d}-run{int(run):03d}-step-{step:012d}"
        path = write_checkpoint(cdir / name, tensors, state)

        previous = self._read_latest_raw()
        index = self._read_index()
        index[name] = {
            "step": step,
            "metric": metric,
        }
        try:
            self._write_index(index)
            _replace_durably(self.latest_file, (name + "\n").encode())
        except BaseException as exc:
            self._roll_back_latest(previous)
            with contextlib.suppress(OSError):
                _remove_dir(path)
            if isinstance(exc, OSError):
                raise _write_error(path, exc) from exc
            raise
        self._apply_retention(path)
        return path

    def _read_latest_raw(self) -> bytes | None:
        try:
            return self.latest_file.read_bytes()
        except FileNotFoundError:
            return None

    def _roll_back_latest(self, previous: bytes | None) -> None:
        try:
            if self._read_latest_raw() == previous:
                return
            if previous is None:
                os.unlink(self.latest_file)
                _fsync_dir(self.checkpoints_dir)
            else:
                _replace_durably(self.latest_file, previous)
        except OSError as exc:
            warnings.warn(f"could not restore {self.latest_file}: {exc}", stacklevel=3)

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.index_file.read_text(encoding="utf-8"))
            entries = doc["checkpoints"]
            if isinstance(entries, dict):
                return {k: v for k, v in entries.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        warnings.warn(
            f"{self.index_file} is damaged; checkpoint metrics are forgotten", stacklevel=3
        )
        return {}

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        doc = {"schema_version": SCHEMA_VERSION, "checkpoints": index}
        _replace_durably(self.index_file, (json.dumps(doc, indent=1) + "\n").encode())

    def _apply_retention(self, latest: Path) -> None:
        """Per run: the ``keep_last`` newest and the best; and the one just saved."""
        found = self.checkpoints()
        index = self._read_index()
        runs: dict[int, list[Path]] = {}
        for path in found:
            runs.setdefault(_run_of(path), []).append(path)
        keep = {latest}
        for paths in runs.values():
            keep.update(paths if self.keep_last is None else paths[-self.keep_last :])
            best = self._best_of(paths, index) if self.keep_best else None
            if best is not None:
                keep.add(best)
        try:
            for path in found:
                if path not in keep:
                    _remove_dir(path)
            names = {p.name for p in found if p in keep}
            if set(index) - names:
                self._write_index({k: v for k, v in index.items() if k in names})
        except OSError as exc:
            warnings.warn(
                f"checkpoint {latest} was saved, but deleting old checkpoints failed: {exc}",
                stacklevel=3,
            )

    def clean_temporary(self) -> None:
        """Remove leftover ``.tmp-*`` and ``.trash-*`` entries of interrupted saves and
        deletions. Requires the lock (so no save of ours is in progress)."""
        self._require_lock("clean_temporary")
        for folder in (self.root, self.checkpoints_dir):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for entry in os.scandir(folder):
                if entry.name.startswith((".tmp-", ".trash-")):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)


def verify_run_dir(root: str | Path) -> list[tuple[Path, str | None]]:
    """Every checkpoint of the run directory at ``root``, oldest first, with its
    problem (``"<file>: <problem>"``) or None if intact. Reads every byte; loads no
    arrays; needs no lock."""
    report: list[tuple[Path, str | None]] = []
    for path in RunDir(root).checkpoints():
        try:
            doc = _read_state_doc(path)
            _read_header(_check_tensor_file(path, doc, verify=True))
        except CheckpointError as exc:
            report.append((path, f"{Path(exc.path).name}: {exc.problem}"))
        else:
            report.append((path, None))
    return report


# --------------------------------------------------------------------------- background


class SnapshotBuffers:
    """Reused host buffers that make background saving safe.

    :meth:`copy` copies each array into a buffer of the same dtype and shape,
    allocated on first use (and again if the dtype or shape changes), so the training
    thread pays one memcpy per array per save and the writer thread reads data that
    training no longer touches.

    The returned arrays *are* the buffers: the next :meth:`copy` overwrites them. So
    the order for each save is: :meth:`AsyncWriter.wait` (or ``submit``, which waits)
    for the previous save, *then* ``copy``, then ``submit``::

        writer.wait()
        snapshot = buffers.copy(arrays)
        writer.submit(run_dir.save, snapshot, snapshot_state(state), step=step)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def copy(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy ``arrays`` (anything ``np.asarray`` accepts) into the buffers; return
        ``{name: buffer}``. Buffers of names no longer present are freed."""
        out: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            a = np.asarray(value)
            buf = self._buffers.get(name)
            if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
                buf = np.empty(a.shape, dtype=a.dtype)
            np.copyto(buf, a, casting="no")
            out[name] = buf
        self._buffers = dict(out)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for b in self._buffers.values())


def snapshot_state(state: dict) -> dict:
    """A deep copy of ``state`` made of fresh plain containers, exactly as
    :func:`read_checkpoint` will return it (tuples become lists). Raises
    :class:`TypeError` naming the key path, like :func:`write_checkpoint`.

    Call it on the training thread before handing ``state`` to :class:`AsyncWriter`:
    the writer thread serialises ``state`` while training goes on, so any list or dict
    training still mutates (history, ledger) must not be shared with it.
    """
    _check_json(state, "")
    return json.loads(json.dumps(state, allow_nan=True))


class AsyncWriter:
    """Runs saves in the background, one at a time.

    :meth:`submit` first waits for the previous save; if that save failed it raises
    :class:`SaveFailedError` ("previous checkpoint save failed: <cause>", the cause
    chained) *instead of* starting the new one. :meth:`wait` blocks until idle and
    raises a pending failure the same way. Each failure is raised once.

    Each save runs in its own non-daemon thread: a save in flight when the program
    ends is completed, not cut off (a daemon thread would be killed mid-write, losing
    the last checkpoint; a long-lived non-daemon worker would keep a crashed program
    from exiting). Use from one thread (the training thread).
    """

    def __init__(self, name: str = "warmfit-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def busy(self) -> bool:
        """Whether a save is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Wait for the previous save (raising its failure, if any), then run
        ``fn(*args, **kwargs)`` in the background."""
        if self._closed:
            raise WarmfitError("AsyncWriter.submit after close(); create a new AsyncWriter.")
        self.wait()

        def run() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name=self.name, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until no save is running; raise :class:`SaveFailedError` if the last
        one failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            detail = (
                str(error)
                if isinstance(error, OSError | WarmfitError)
                else (f"{type(error).__name__}: {error}")
            )
            raise SaveFailedError(f"previous checkpoint save failed: {detail}") from error

    def close(self) -> None:
        """Wait for the save in flight, then refuse further submits. Raises a pending
        failure like :meth:`wait`."""
        self._closed = True
        self.wait()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
