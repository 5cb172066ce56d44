"""Data order and position: what warmfit owns about *which* samples a step sees.

Owns: the epoch permutation (a pure function of ``(seed, epoch)``), the cursor
(``epoch``, ``offset`` into that epoch's permutation, in samples), cutting one epoch
into global batches from any offset in O(1), sharding a global batch across ranks,
the fixed validation split and the data fingerprint.

Does not own: moving rows onto a device or into a framework's tensors (backends do
that with the index arrays produced here) nor any random stream that training draws
from (see :mod:`warmfit.state`).

Nothing here replays or skips batches: a resume at offset ``k`` starts the epoch's
permutation at ``k`` directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import xxhash

#: Separates warmfit's data-order stream from every other stream derived from the seed.
_ORDER_STREAM = 0x0DA7A
_SPLIT_STREAM = 0x5E1EC7
#: Arrays up to this many bytes are hashed completely; larger ones by a strided sample.
FINGERPRINT_FULL_BYTES = 64 << 20


@dataclass(frozen=True)
class Cursor:
    """Where training stands: ``epoch`` (epochs completed so far) and ``offset``, the
    number of samples of epoch ``epoch``'s permutation already trained on.

    ``offset == 0`` is an epoch boundary. The cursor is stored, never inferred.
    """

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def epoch_permutation(seed: int, epoch: int, n: int, *, shuffle: bool = True) -> np.ndarray:
    """The order of ``n`` samples in ``epoch``: a pure function of ``(seed, epoch, n)``.

    Uses NumPy's PCG64 seeded by ``SeedSequence([seed, epoch, stream])``, so epoch 1000
    costs the same as epoch 0 and nothing depends on earlier epochs having run.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _ORDER_STREAM])))
    return rng.permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``n`` samples; the last batch may be smaller."""
    return -(-n // batch_size)


def epoch_batches(order: np.ndarray, batch_size: int, offset: int = 0) -> Iterator[np.ndarray]:
    """Global batches of ``order`` starting at sample ``offset``: slices, never copies.

    ``offset`` must lie on a batch boundary of this batch size (checked by the caller
    through :func:`check_offset`).
    """
    for start in range(offset, len(order), batch_size):
        yield order[start : start + batch_size]


def check_offset(offset: int, batch_size: int, n: int) -> None:
    """Refuse a resume offset that does not fall on a batch boundary."""
    if offset % batch_size and offset != n:
        raise ValueError(
            f"Cannot resume at sample {offset} of the epoch with batch_size={batch_size}: the "
            "offset is not on a batch boundary, so the next batches would differ from an "
            "uninterrupted run. Resume with the batch size the checkpoint was written with, "
            "or finish the epoch first."
        )


def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of a global batch: contiguous, as even as possible.

    The global batch is the same at every world size; only its split changes.
    """
    if world_size == 1:
        return batch
    bounds = np.linspace(0, len(batch), world_size + 1).astype(np.int64)
    return batch[bounds[rank] : bounds[rank + 1]]


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (train, validation) split of ``n`` rows: a pure function of (n, fraction, seed).

    Both index arrays are sorted, so the training rows keep their relative order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"The 'validation_split' parameter of Trainer.fit must be a float in (0, 1). "
            f"Got {fraction!r} instead."
        )
    n_val = round(n * fraction)
    if n_val == 0 or n_val == n:
        raise ValueError(
            f"validation_split={fraction} of {n} samples leaves "
            f"{'no validation' if n_val == 0 else 'no training'} samples. Choose a fraction "
            "that leaves at least one sample on each side."
        )
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_STREAM])))
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def fingerprint(*arrays: np.ndarray | None, names: Sequence[str] = ()) -> str:
    """A short content hash of the training data (shape, dtype and bytes).

    Arrays up to :data:`FINGERPRINT_FULL_BYTES` are hashed whole; larger ones by 4096
    evenly spaced rows plus the first and last row, which catches any reordering,
    resampling or preprocessing change in practice at a fixed cost. ``names``: the
    paths of a structure's leaves (``x['ids']``), hashed first, so that renaming a key
    changes the fingerprint; without them the hash is that of the arrays alone.
    """
    h = xxhash.xxh3_128()
    if names:
        h.update("\x00".join(names).encode())
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        if a.nbytes <= FINGERPRINT_FULL_BYTES or a.ndim == 0:
            h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
        else:
            rows = np.unique(np.linspace(0, len(a) - 1, 4096).astype(np.int64))
            h.update(np.ascontiguousarray(a[rows]).view(np.uint8).reshape(-1).data)
    return h.hexdigest()[:24]
