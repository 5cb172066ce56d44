"""The torch backend's data: what ``fit``, ``evaluate`` and ``predict`` are given, as
batches on the device.

Owns: what the torch backend accepts — arrays and tensors, **structures** of them (a
dict, tuple or list, nested, with the same number of rows in every leaf), map-style
Datasets whose items are such structures — and what it refuses (streams, leaves that
are not numbers, leaves of different lengths); moving in-memory data to the device
once; cutting it into batches by index, one O(1) ``index_select`` per leaf and step; the
DataLoader path of a Dataset (warmfit's batch sampler from the cursor on, each sample's
randomness seeded from (seed, epoch, index)); the data's fingerprint; how a structure
reaches the model (``model(**x)`` for a dict, ``model(*x)`` for a tuple or list) and the
refusal of one its ``forward`` cannot take; joining the outputs of ``predict``.

Does not own: the data order and the cursor (:mod:`warmfit.data`), the training step and
the probes that run the model (:mod:`warmfit.backends.torch`).

Two readings of a list, as in the libraries they come from: ``fit``'s ``x`` follows
NumPy (nested lists of numbers are one array; a tuple or list whose first element is an
array, a tensor or a structure is a structure), a Dataset's item follows torch's
``default_collate`` (every tuple, list and dict is a structure).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import numbers
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import epoch_batches, fingerprint, shard
from ..state import derive_seed
from .base import leaf_rows

#: A tensor (a leaf), or a dict, tuple or list of trees.
Tree = Any

ITEMS = (
    "A Dataset given to warmfit must yield (x, y) pairs or x alone, each a tensor, a NumPy "
    "array or a number"
)
SUPPORTED = (
    "arrays or tensors, a dict, tuple or list of them (nested; the same number of rows in "
    "each), or a map-style torch Dataset (__getitem__ and __len__)"
)


class TensorData:
    """In-memory data placed on the device: ``x`` and optional ``y``, each a tensor or a
    structure of tensors with the same number of rows. ``plain``: both are tensors."""

    def __init__(self, x: Tree, y: Tree | None) -> None:
        self.x, self.y = x, y
        self.plain = torch.is_tensor(x) and (y is None or torch.is_tensor(y))
        self.n = len(x) if torch.is_tensor(x) else first_leaf(x).shape[0]

    def __len__(self) -> int:
        return self.n


class DatasetData:
    """A map-style ``torch.utils.data.Dataset`` read through a DataLoader. ``probe``: its
    item 0 as the fingerprint read it (None until then), which the checks reuse."""

    def __init__(self, dataset: torch.utils.data.Dataset, probe: Any = None) -> None:
        self.dataset, self.probe = dataset, probe

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


# -- structures ---------------------------------------------------------------------------
def is_structure(x: Any) -> bool:
    """Whether ``fit``'s ``x`` (or ``y``) is a structure of arrays rather than one
    array-like: a dict, or a tuple or list whose first element is an array, a tensor or a
    structure (nested lists of numbers are one array, as for NumPy)."""
    if isinstance(x, Mapping):
        return True
    if isinstance(x, (tuple, list)) and len(x):
        head = x[0]
        return torch.is_tensor(head) or isinstance(head, np.ndarray) or is_structure(head)
    return False


def leaves(tree: Tree, root: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of every leaf, a dict's keys in sorted order: ``x['ids']``,
    ``x[0][1]``. Every tuple, list and dict is a structure here."""
    if isinstance(tree, Mapping):
        return [leaf for k in sorted(tree, key=str) for leaf in leaves(tree[k], f"{root}[{k!r}]")]
    if isinstance(tree, (tuple, list)):
        return [leaf for i, v in enumerate(tree) for leaf in leaves(v, f"{root}[{i}]")]
    return [(root, tree)]


def first_leaf(tree: Tree) -> Any:
    return leaves(tree, "")[0][1]


def tree_map(fn: Any, tree: Tree) -> Tree:
    """``tree`` with ``fn`` applied to every leaf (a dict stays a dict, a named tuple its
    type)."""
    if torch.is_tensor(tree):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        parts = [tree_map(fn, v) for v in tree]
        return type(tree)(*parts) if hasattr(tree, "_fields") else tuple(parts)
    if isinstance(tree, list):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def take(tree: Tree, idx: torch.Tensor) -> Tree:
    """The rows ``idx`` of every leaf: ``index_select`` (``x[idx]`` without the
    advanced-indexing machinery, the same bits) for a contiguous leaf; a strided or
    channels-last leaf keeps ``x[idx]``, which keeps its layout."""
    return tree_map(lambda t: t.index_select(0, idx) if t.is_contiguous() else t[idx], tree)


def pick(tree: Tree, idx: torch.Tensor) -> Tree:
    """``x[idx]`` of every leaf (advanced indexing: a new tensor of those rows)."""
    return tree_map(lambda t: t[idx], tree)


def rows_of(tree: Tree, start: int, stop: int) -> Tree:
    return tree_map(lambda t: t[start:stop], tree)


def to_device(tree: Tree, device: torch.device, non_blocking: bool = False) -> Tree:
    return tree_map(
        lambda t: t.to(device, non_blocking=non_blocking) if torch.is_tensor(t) else t, tree
    )


def count_rows(tree: Tree) -> int:
    return len(tree) if torch.is_tensor(tree) else len(first_leaf(tree))


def describe(tree: Tree) -> str:
    """Shapes and dtypes, for a message: ``(64, 8) torch.float32``, ``{'ids': (64, 16)
    torch.int64, 'mask': ...}``."""
    if torch.is_tensor(tree):
        return f"{tuple(tree.shape)} {tree.dtype}"
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        inner = ", ".join(describe(v) for v in tree)
        return f"({inner})" if isinstance(tree, tuple) else f"[{inner}]"
    return type(tree).__name__


def kind_of(obj: Any) -> str:
    """What ``obj`` is, for an error message: "dict with keys ['x', 'y']", "tuple of 3
    (Tensor of dtype torch.float32, int, float)"."""
    name = type(obj).__name__
    if isinstance(obj, Mapping):
        return f"{name} with keys {list(obj)[:8]}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(kind_of(o) for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"{name} of {len(obj)} ({inner})"
    if isinstance(obj, (np.ndarray, np.generic)) or torch.is_tensor(obj):
        return f"{name} of dtype {obj.dtype}"
    return name


def compose(xb: Tree, yb: Tree | None) -> Tree:
    """The batch as the data yields it, for a ``step=``: x alone, or (x, y)."""
    return xb if yb is None else (xb, yb)


# -- in-memory data ---------------------------------------------------------------------
def refuse_stream(x: Any) -> None:
    """A ``ValueError`` saying what is supported for data warmfit cannot index: an
    IterableDataset (with or without ``__len__``), a generator or iterator, a DataLoader."""
    if isinstance(x, torch.utils.data.DataLoader):
        raise ValueError(
            "x is a torch DataLoader. warmfit builds the loader itself (its batch sampler "
            "starts at the cursor, so a resume reads nothing twice): pass its dataset, "
            "x=loader.dataset, with Trainer(batch_size=..., num_workers=...). Supported: "
            f"{SUPPORTED}."
        )
    if isinstance(x, (torch.utils.data.IterableDataset, Iterator)):
        dataset = isinstance(x, torch.utils.data.Dataset)
        what = "a torch IterableDataset" if dataset else "an iterator"
        raise ValueError(
            f"x is {what} ({type(x).__name__}), a stream: warmfit needs data it can "
            "index, so that an epoch is a permutation of known rows and a resume starts at "
            f"any sample without replaying the ones before. Supported: {SUPPORTED}. For a "
            "stream, fit each chunk you read as arrays with fit(chunk_x, chunk_y, "
            "new_data=True, epochs=1)."
        )


def as_tensor(a: Any, name: str, device: torch.device) -> torch.Tensor:
    if torch.is_tensor(a):
        t = a
    else:
        arr = np.asarray(a)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise TypeError(
                f"{name} must be numeric (a numpy array or torch tensor). Got dtype {arr.dtype}."
            )
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        # np.ascontiguousarray would turn a 0-d array into shape (1,): keep scalars 0-d.
        t = torch.from_numpy(np.ascontiguousarray(arr) if arr.ndim else arr.copy())
    return t.to(device)


def as_tree(x: Any, name: str, device: torch.device) -> Tree:
    """``x`` with every leaf a tensor on ``device`` (:func:`as_tensor`, named by its path)."""
    if isinstance(x, Mapping):
        return {k: as_tree(v, f"{name}[{k!r}]", device) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and is_structure(x):
        parts = [as_tree(v, f"{name}[{i}]", device) for i, v in enumerate(x)]
        if hasattr(x, "_fields"):
            return type(x)(*parts)
        return tuple(parts) if isinstance(x, tuple) else parts
    return as_tensor(x, name, device)


def tree_rows(tree: Tree, name: str) -> int:
    """The number of rows of a structure's leaves: a ``ValueError`` naming each leaf and
    its length if they differ, a leaf without a first dimension, or no leaf at all."""
    found = leaves(tree, name)
    if not found:
        raise ValueError(
            f"{name} is an empty {type(tree).__name__}: it holds no arrays to train on. "
            f"Pass {SUPPORTED}."
        )
    return leaf_rows(found, name)


def tensor_fingerprint(data: TensorData) -> tuple[str, list[int]]:
    """(content hash, shape) of in-memory data. Plain arrays as always; a structure's
    leaves in sorted key order, with their paths, and the shape ``[n, *the first leaf's
    other dimensions]``."""
    if data.plain:
        x = (
            data.x.detach().cpu().numpy()
            if data.x.dtype != torch.bfloat16
            else data.x.float().cpu().numpy()
        )
        y = None if data.y is None else data.y.detach().cpu().numpy()
        return fingerprint(x, y), list(data.x.shape)
    named = leaves(data.x, "x") + ([("y", None)] if data.y is None else leaves(data.y, "y"))
    arrays = [None if t is None else _host(t) for _, t in named]
    first = named[0][1]
    return fingerprint(*arrays, names=[p for p, _ in named]), [len(data), *first.shape[1:]]


def _host(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


# -- map-style Datasets --------------------------------------------------------------------
def is_leaf(obj: Any) -> bool:
    """A tensor, a numeric NumPy array or scalar, or a number: what collates to a tensor."""
    if torch.is_tensor(obj):
        return True
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.dtype.kind in "biufc"
    return isinstance(obj, numbers.Number)


def splits(item: Any) -> bool:
    """Whether the default step can split a Dataset item into the model's input and its
    target: a pair is (x, y); a dict, a tensor, an array or a number is x alone."""
    return isinstance(item, Mapping) or is_leaf(item) or (
        isinstance(item, (tuple, list)) and len(item) == 2
    )


def split(batch: Any) -> tuple[Tree, Tree | None]:
    """A collated batch as (x, y-or-None), by the rule of :func:`splits`."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) or torch.is_tensor(batch):
        return batch, None
    raise item_error(batch, "A batch of its items")


def check_item(item: Any, which: str, *, split_it: bool) -> None:
    """Refuse an item training cannot batch: a part that is not numeric, no part at all,
    or (``split_it``: without ``step=``) a structure the default step cannot split."""
    found = leaves(item, "item")
    for path, leaf in found:
        if not is_leaf(leaf):
            raise item_error(item, which, part=(path, leaf))
    if not found or (split_it and not splits(item)):
        raise item_error(item, which)


def item_error(
    item: Any, which: str, *, part: tuple[str, Any] | None = None, forward: str | None = None
) -> ValueError:
    """The one message for a Dataset item (or a batch of them) training cannot take: a
    ``part`` that is not numeric, a ``forward`` that cannot take its x, or else (neither)
    a structure the default step cannot split."""
    if part is not None:
        why = (
            f"Its part {part[0]} is a {type(part[1]).__name__}, which does not batch into a "
            "tensor. Wrap the Dataset so that __getitem__ returns numbers only (text as "
            "token ids, say)."
        )
    elif forward is not None:
        why = (
            "A dict x goes to the model as model(**x), a tuple or list x as model(*x) (a "
            f"dict item is x alone), and {forward}. Wrap the Dataset so that __getitem__ "
            "returns what the forward takes, e.g. `return item['x'], item['y']` for (x, y) "
            "pairs, or pass step=fn(model, batch) -> loss, which calls the model as it wants."
        )
    else:
        why = (
            "Without step=, an item is split into the model's input and its target: a pair "
            "is (x, y); a dict, a tensor, an array or a number is x alone; x and y may be "
            "dicts, tuples or lists of those, nested. Wrap the Dataset so that __getitem__ "
            "returns a pair, e.g. `return (a, b), y`, or pass step=fn(model, batch) -> loss, "
            "which takes items of any structure."
        )
    return ValueError(f"{ITEMS}. {which} is a {kind_of(item)}. {why}")


def dataset_fingerprint(
    data: DatasetData, devices: list[torch.device], *, split_it: bool
) -> tuple[str, list[int]]:
    """(content hash, shape) of a Dataset from three items (first, middle, last), read
    with every stream forked and fixed: an augmenting Dataset gives the same fingerprint
    on every call, and the caller's streams do not move. Their structure is checked now,
    before the call starts; item 0 is kept as ``data.probe``. Items without a dict hash
    as they always did; with one, the paths of their parts are hashed too."""
    ds, n = data.dataset, len(data)
    probes = []
    with isolated_streams(devices, seed=0):
        for i in sorted({0, n // 2, n - 1}):  # prepare refused len 0
            probes.append(ds[i])
            check_item(probes[-1], f"Item {i}", split_it=split_it)
    data.probe = probes[0]
    named = [leaf for p in probes for leaf in leaves(p, "item")]
    arrays = [np.asarray(t.cpu() if torch.is_tensor(t) else t) for _, t in named]
    names = [p for p, _ in named] if any(map(_has_dict, probes)) else ()
    first = arrays[0] if arrays else np.zeros(0)
    return fingerprint(np.asarray(n), *arrays, names=names), [n, *first.shape]


def _has_dict(tree: Any) -> bool:
    if isinstance(tree, Mapping):
        return True
    return isinstance(tree, (tuple, list)) and any(map(_has_dict, tree))


class OrderSampler(torch.utils.data.Sampler):
    """Yields this rank's part of the epoch's global batches from the offset on:
    warmfit's order, O(1) start."""

    def __init__(
        self, order: np.ndarray, offset: int, batch_size: int, rank: int = 0, world: int = 1
    ) -> None:
        self.order, self.offset, self.batch_size = order, offset, batch_size
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for _, rows in self.shards():
            if len(rows):  # an empty shard is not loaded: see TorchBackend._loader_batches
                yield rows.tolist()

    def shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(global batch size, this rank's shard)`` of each global batch, empty shards
        included."""
        for idx in epoch_batches(self.order, self.batch_size, self.offset):
            yield len(idx), shard(idx, self.rank, self.world)

    def __len__(self) -> int:
        return sum(1 for _, rows in self.shards() if len(rows))


class SeededSamples(torch.utils.data.Dataset):
    """A map-style Dataset read so that each sample's randomness is a function of
    (seed, epoch, sample index): Python's, NumPy's and torch's global streams are seeded
    from it right before the sample is read. So a random augmentation draws the same
    numbers whichever process reads the sample — the main process or any DataLoader
    worker, after any resume — and however the epoch is cut into batches or ranks.

    In the main process (``num_workers=0``) the streams are put back after each batch,
    so reading data never moves the trainer's streams. A Dataset with its own
    ``__getitems__`` (it reads a batch at once) is seeded once per batch, from its first
    index: exact for the same batch size and world size.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch
        self.batched = callable(getattr(dataset, "__getitems__", None))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        in_worker = torch.utils.data.get_worker_info() is not None
        with contextlib.nullcontext() if in_worker else isolated_streams([]):
            if self.batched:
                self._seed(indices[0])
                return list(self.dataset.__getitems__(indices))  # type: ignore[attr-defined]
            items = []
            for i in indices:
                self._seed(i)
                items.append(self.dataset[i])
            return items

    def _seed(self, index: int) -> None:
        s = derive_seed(self.seed, "sample", self.epoch, index)
        random.seed(s)
        np.random.seed(s & 0xFFFF_FFFF)
        torch.default_generator.manual_seed(s)


@contextlib.contextmanager
def isolated_streams(devices: list[torch.device], seed: int | None = None) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's global streams (CPU and ``devices``)
    forked: put back as they were afterwards; with ``seed``, seeded to it inside."""
    host = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                for device in devices:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            yield
    finally:
        random.setstate(host[0])
        np.random.set_state(host[1])


# -- the model's side ---------------------------------------------------------------------
def forward_problem(model: nn.Module, inputs: Tree) -> str | None:
    """Why ``model`` cannot take the structure ``inputs`` — ``model(**inputs)`` for a
    dict, ``model(*inputs)`` for a tuple or list — judged from its ``forward``'s
    signature; None if it can (or is not called with a structure, or the signature
    cannot be read)."""
    if not isinstance(inputs, (Mapping, tuple, list)):
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    p = inspect.Parameter
    kinds = {q.kind for q in params}
    variadic = (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    required = [q for q in params if q.default is p.empty and q.kind not in variadic]
    problems = []
    if isinstance(inputs, Mapping):
        named = [q.name for q in params if q.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        extra = [k for k in inputs if k not in named] if p.VAR_KEYWORD not in kinds else []
        if extra:
            problems.append(f"keys without a parameter: {extra}")
        missing = [q.name for q in required if q.name not in inputs or q.name not in named]
        if missing:
            problems.append(f"parameters without a key: {missing}")
    else:
        positional = [q for q in params if q.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(inputs) > len(positional) and p.VAR_POSITIONAL not in kinds:
            n, plural = len(positional), "s" if len(positional) != 1 else ""
            problems.append(f"{len(inputs)} inputs for {n} positional parameter{plural}")
        missing = [q.name for q in required if q not in positional[: len(inputs)]]
        if missing:
            problems.append(f"parameters without an input: {missing}")
    if not problems:
        return None
    return f"{type(model).__name__}.forward takes ({_signature(params)}): {'; '.join(problems)}"


def _signature(params: Sequence[inspect.Parameter]) -> str:
    """A signature's parameters by name, defaults shown when short: ``ids, mask=None``."""
    out = []
    for q in params:
        if q.kind is q.VAR_POSITIONAL:
            out.append(f"*{q.name}")
        elif q.kind is q.VAR_KEYWORD:
            out.append(f"**{q.name}")
        elif q.default is q.empty:
            out.append(q.name)
        else:
            short = q.default is None or isinstance(q.default, (bool, int, float, str))
            out.append(f"{q.name}={q.default!r}" if short else f"{q.name}=...")
    return ", ".join(out)


def join_outputs(outs: list[Any]) -> Any:
    """The per-batch outputs of ``predict`` joined along the rows: tensors concatenated
    (0-dim ones stacked), and a dict, tuple, list, dataclass or plain object of them
    joined part by part (its type kept where it can be rebuilt); None stays None."""
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs) if first.ndim else torch.stack(outs)
    if first is None or isinstance(first, (str, bytes, numbers.Number)):
        return first if all(o == first for o in outs) else list(outs)
    if isinstance(first, Mapping):
        joined = {k: join_outputs([o[k] for o in outs]) for k in first}
        rebuild: Any = type(first)
        with contextlib.suppress(Exception):
            return rebuild(joined)
        return joined
    if isinstance(first, (tuple, list)):
        parts = [join_outputs([o[i] for o in outs]) for i in range(len(first))]
        if hasattr(first, "_fields"):
            return type(first)(*parts)
        return tuple(parts) if isinstance(first, tuple) else parts
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = [f.name for f in dataclasses.fields(first) if f.init]
        return dataclasses.replace(
            first, **{f: join_outputs([getattr(o, f) for o in outs]) for f in fields}
        )
    if hasattr(first, "__dict__"):
        joined_obj = copy.copy(first)
        for k in vars(first):
            setattr(joined_obj, k, join_outputs([getattr(o, k) for o in outs]))
        return joined_obj
    raise TypeError(
        f"predict cannot join the model's outputs ({type(first).__name__}) across batches. "
        "Return a tensor, or a dict, tuple or dataclass of tensors, from the forward."
    )


def call_model(model: Any, inputs: Tree) -> Any:
    """The model on a batch's inputs: ``model(**x)`` for a dict, ``model(*x)`` for a tuple
    or list, ``model(x)`` otherwise. (``TorchBackend.train_step`` writes it out, so that
    the training forward pass is one frame below the step.)"""
    if torch.is_tensor(inputs):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
