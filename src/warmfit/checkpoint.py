"""Checkpoints on disk: the format, atomic writes, integrity.

This module owns:

- the checkpoint folder: ``tensors.safetensors`` (every array, written by our own
  streaming safetensors writer so a save never holds the whole file in memory) and
  ``state.json`` (everything else, with :data:`SCHEMA_VERSION`, the size and the
  XXH3-128 checksum of the tensor file, and the checksum of the state itself);
- atomic writes: a checkpoint is written to ``.tmp-*``, fsync'd, then renamed into
  place; small files (the run directory's pointer and index) are replaced with
  ``os.replace`` (:func:`replace_durably`);
- integrity on load: every problem is a :class:`~warmfit.errors.CheckpointError` that
  names the file and what is wrong. **Loading never unpickles**.

It does not own the run directory (``LATEST``, retention, the lock:
:mod:`warmfit.rundir`), saving in the background (:mod:`warmfit.background`), what
goes into a checkpoint (the state manifest, ``state.py``) nor when to save (the
Trainer). It imports only the standard library, numpy, safetensors and xxhash.

The checksums detect damage (a torn write, a flipped bit, a truncated copy, an edit),
not tampering: whoever can rewrite the file can rewrite its checksum too, so a
cryptographic hash would buy nothing and cost its speed. Safety against a hostile file
comes from never unpickling. XXH3-128 runs at ~15 GB/s on one core, SHA-256 at
~1.5 GB/s, which bounded resume (schema 1 used SHA-256 and is still read).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import secrets
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from safetensors import safe_open

from warmfit.errors import CheckpointError, WarmfitError

__all__ = [
    "SCHEMA_VERSION",
    "STATE_FILE",
    "TENSOR_FILE",
    "CheckpointExistsError",
    "CheckpointWriteError",
    "UnsupportedSchemaError",
    "fsync_dir",
    "inspect_checkpoint",
    "read_checkpoint",
    "read_state",
    "remove_checkpoint_dir",
    "replace_durably",
    "snapshot_state",
    "verify_checkpoint",
    "write_checkpoint",
]

SCHEMA_VERSION: int = 2
TENSOR_FILE = "tensors.safetensors"
STATE_FILE = "state.json"

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
_HASHES: dict[str, Callable[..., Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHECKSUM_FIELDS: dict[int, tuple[str, str, str]] = {
    # version: (algorithm, field of the tensor file's checksum, field of the state's)
    1: ("sha256", "tensors_sha256", "state_sha256"),
    2: (CHECKSUM, "tensors_checksum", "state_checksum"),
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class CheckpointExistsError(WarmfitError, FileExistsError):
    """:func:`write_checkpoint` was asked to write over an existing path without
    ``overwrite=True``."""


class CheckpointWriteError(CheckpointError):
    """A save failed (full disk, I/O error, failing fsync). Nothing was changed: the
    previous checkpoint and ``LATEST`` are intact. ``errno`` is the cause's errno."""

    def __init__(self, path: object, problem: str, errno_: int | None = None) -> None:
        super().__init__(path, problem)
        self.errno = errno_

    @classmethod
    def from_os_error(cls, path: object, exc: OSError) -> CheckpointWriteError:
        return cls(
            path,
            f"not written: {exc}. Nothing was changed; the previous checkpoint is intact.",
            exc.errno,
        )


class UnsupportedSchemaError(CheckpointError):
    """A checkpoint's schema version is not one this warmfit reads."""


# --------------------------------------------------------------------------- writing


def write_checkpoint(
    path: str | os.PathLike[str],
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
        fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointWriteError.from_os_error(path, exc) from exc
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
            raise CheckpointWriteError.from_os_error(path, exc) from exc
        raise

    try:
        fsync_dir(parent)
    except BaseException as exc:
        # The rename may not be durable; the caller is told the save failed, so the
        # new folder must not survive as if it had succeeded.
        with contextlib.suppress(OSError):
            remove_checkpoint_dir(path)
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, path)
        if isinstance(exc, OSError):
            raise CheckpointWriteError.from_os_error(path, exc) from exc
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return path


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
    chunks: list[bytes | memoryview] = [len(hb).to_bytes(8, "little") + hb]
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


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def replace_durably(file: Path, data: bytes) -> None:
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
    fsync_dir(file.parent)


def remove_checkpoint_dir(path: Path) -> None:
    """Delete a folder so that a half-deleted one never looks like a checkpoint:
    rename it to ``.trash-*`` first. Raises OSError if the rename fails."""
    if not os.path.lexists(path):
        return
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def snapshot_state(state: dict) -> dict:
    """A deep copy of ``state`` made of fresh plain containers, exactly as
    :func:`read_checkpoint` will return it (tuples become lists). Raises
    :class:`TypeError` naming the key path, like :func:`write_checkpoint`.

    Call it on the training thread before handing ``state`` to
    :class:`~warmfit.background.AsyncWriter`: the writer thread serialises ``state``
    while training goes on, so any list or dict training still mutates (history,
    ledger) must not be shared with it.
    """
    _check_json(state, "")
    return json.loads(json.dumps(state, allow_nan=True))


# --------------------------------------------------------------------------- reading


def read_checkpoint(
    path: str | os.PathLike[str], *, verify: bool = True
) -> tuple[dict[str, np.ndarray], dict]:
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
    hasher = None if algorithm is None else _Hasher(algorithm, _size_of(tfile))
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
                view = buf.data  # memoryview(buf); NumPy types ndarray as a Buffer on 3.12+ only
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


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise a checkpoint without loading its arrays (for ``warmfit inspect``).

    Returns ``{"path", "schema_version", "checksum", "tensors_bytes", "checksum_ok",
    "version", "counters", "tensors", "state_keys"}`` where ``checksum`` names the
    algorithm, ``version`` and ``counters`` are the state's (the warmfit version that
    wrote it; epoch, offset, global_step, run, ...; None when the state has none, as in
    a checkpoint not written by a Trainer), ``tensors`` maps each name to ``(dtype,
    shape, nbytes)`` (numpy dtype name, or the safetensors code for dtypes numpy
    lacks) and ``state_keys`` lists the state dict's top-level keys. A checksum
    mismatch of the tensor file is reported as ``checksum_ok=False``; every other
    problem raises :class:`~warmfit.errors.CheckpointError`.
    """
    folder = Path(path)
    doc = _read_state_doc(folder)
    tfile = _check_tensor_file(folder, doc, verify=False)
    checksum_ok = _file_checksum(tfile, doc["checksum"]) == doc["tensors_checksum"]
    try:
        header = _read_header(tfile)
    except CheckpointError:
        if not checksum_ok:  # a damaged header: a checksum mismatch first, as when reading
            raise CheckpointError(tfile, "checksum mismatch: the file is damaged") from None
        raise
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
        "version": doc["state"].get("version"),
        "counters": doc["state"].get("counters"),
        "tensors": summary,
        "state_keys": list(doc["state"]),
    }


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
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


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Read every byte of the checkpoint folder ``path`` and check it against its
    checksums; load no arrays. Raises :class:`~warmfit.errors.CheckpointError` naming
    the damaged file and the problem."""
    folder = Path(path)
    _read_header(_check_tensor_file(folder, _read_state_doc(folder), verify=True))


def _state_checksum(text: str, algorithm: str) -> str:
    """Checksum of the state as ``json.dumps`` writes it (a parsed state dumps back to
    the same text: floats round-trip, key order is kept)."""
    return _HASHES[algorithm](text.encode("utf-8")).hexdigest()


def _os_problem(exc: OSError) -> str:
    """The problem an OSError of a checkpoint file is, for a :class:`CheckpointError`:
    ``missing`` for a file that is gone (retention may remove a folder while it is
    read), else ``unreadable: <reason>``."""
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return f"unreadable: {exc.strerror or exc}"


def _size_of(file: Path) -> int:
    """The size of ``file``; a missing or unreadable one is a :class:`CheckpointError`."""
    try:
        return file.stat().st_size
    except OSError as exc:
        raise CheckpointError(file, _os_problem(exc)) from exc


def _check_tensor_file(folder: Path, doc: dict[str, Any], *, verify: bool) -> Path:
    tfile = folder / TENSOR_FILE
    size = _size_of(tfile)
    expected = doc["tensors_bytes"]
    if size < expected:
        raise CheckpointError(tfile, f"truncated: {size} bytes, expected {expected}")
    if size != expected:
        raise CheckpointError(tfile, f"wrong size: {size} bytes, expected {expected}")
    if verify and _file_checksum(tfile, doc["checksum"]) != doc["tensors_checksum"]:
        raise CheckpointError(tfile, "checksum mismatch: the file is damaged")
    return tfile


def _file_checksum(file: Path, algorithm: str) -> str:
    """The checksum of ``file``'s bytes; a missing or unreadable file is a
    :class:`CheckpointError`."""
    hash_ = _HASHES[algorithm]()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    try:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                hash_.update(view[:n])
    except OSError as exc:
        raise CheckpointError(file, _os_problem(exc)) from exc
    return hash_.hexdigest()


def _read_header(tfile: Path) -> dict[str, dict[str, Any]]:
    """Read and check the safetensors header ourselves (for precise messages); return
    the tensor entries in file order. safetensors then checks it again on open. A
    missing or unreadable file is a :class:`CheckpointError`."""
    size = _size_of(tfile)
    try:
        with open(tfile, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(tfile, f"not a safetensors file: only {size} bytes")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    tfile,
                    f"not a safetensors file: header length {n} does not fit a {size}-byte file",
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(tfile, _os_problem(exc)) from exc
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
        if not os.path.lexists(tfile):  # removed while being read (retention)
            raise CheckpointError(tfile, "missing") from exc
        raise CheckpointError(tfile, f"not a safetensors file: {exc}") from exc
