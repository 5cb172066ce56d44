"""Exact JSON for the plain-Python part of a framework's state.

Optimizer parameter groups, an optimizer's scalar slots and an LR scheduler's
``state_dict()`` are nested Python values, and a resume is exact only if every one of
them comes back as it was: ``MultiStepLR`` keeps its milestones in a ``Counter`` with
int keys (JSON would give string keys, and the rate would never decay again), Adam's
``betas`` is a tuple, a learning rate may be a tensor. :func:`encode` turns such a value
into JSON that :func:`decode` turns back into an equal value *of the same types*; a
value it cannot keep exactly (a function, an arbitrary object) is refused by name, never
stored as its ``repr()``.

Plain JSON values (str, int, float — NaN and infinities included —, bool, None, lists,
dicts with str keys) are written as they are, so state written before this module
existed decodes unchanged. Everything else is a one-key dict whose key starts with
``$``: ``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` (non-str keys, or a key
that starts with ``$``), ``{"$counter": [[key, count], ...]}``, ``{"$tensor": {...}}``
(dtype, shape, device, values), ``{"$numpy": {...}}`` (a NumPy scalar).

Owns: the encoding. Does not own: where the encoded values live in a checkpoint
(:mod:`warmfit.checkpoint`).
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import numpy as np

__all__ = ["decode", "encode"]


def encode(value: Any, where: str) -> Any:
    """``value`` as JSON that :func:`decode` gives back exactly (types included).

    Raises ``TypeError`` naming ``where`` (and the path inside it) for a value that
    cannot be kept exactly."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int or type(value) is float:
        return value
    if isinstance(value, collections.Counter):
        return {"$counter": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if type(value) is dict:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
        return {
            "$dict": [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]
        }
    if type(value) is list:
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"$tuple": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"$numpy": {"dtype": value.dtype.str, "value": value.item()}}
    torch = sys.modules.get("torch")  # never imported here: a tensor means torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
        return {"$tensor": _tensor(torch, value, where)}
    raise TypeError(
        f"{where} holds {_kind(value)}, which warmfit cannot save exactly (it stores plain "
        "numbers, strings, lists, tuples, dicts, Counters, NumPy scalars and tensors). "
        "Keep such objects out of the optimizer's and the scheduler's state_dict() (e.g. "
        "a LambdaLR of a plain function, whose state torch leaves out), or use a warmfit "
        "schedule (warmfit.schedules)."
    )


def decode(value: Any) -> Any:
    """The value :func:`encode` encoded."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "$tuple":
            return tuple(decode(v) for v in body)
        if tag == "$dict":
            return {decode(k): decode(v) for k, v in body}
        if tag == "$counter":
            return collections.Counter({decode(k): decode(v) for k, v in body})
        if tag == "$numpy":
            return np.array(body["value"], dtype=np.dtype(body["dtype"]))[()]
        if tag == "$tensor":
            return _from_tensor(body)
    return {k: decode(v) for k, v in value.items()}


def _tensor(torch: Any, t: Any, where: str) -> dict[str, Any]:
    if t.layout != torch.strided or t.is_quantized or t.requires_grad:
        raise TypeError(
            f"{where} holds {_kind(t)} (sparse, quantized or requiring grad), which "
            "warmfit cannot save exactly in the state's JSON part."
        )
    if t.numel() > 4096:
        raise TypeError(
            f"{where} holds a tensor of {t.numel()} elements in the optimizer's or the "
            "scheduler's plain state; warmfit keeps only small tensors there (a tensor "
            "slot of a parameter is saved with the tensors)."
        )
    cpu = t.detach().cpu()
    if cpu.is_complex():
        values: Any = torch.view_as_real(cpu.resolve_conj()).tolist()
    elif cpu.dtype.is_floating_point and cpu.dtype.itemsize == 1:  # float8: exact as float32
        values = cpu.float().tolist()
    else:
        values = cpu.tolist()
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "device": str(t.device),
        "values": values,  # JSON floats are exact (NaN and infinities included)
    }


def _from_tensor(body: dict[str, Any]) -> Any:
    import torch

    dtype = getattr(torch, body["dtype"])
    values = body["values"]
    if dtype.is_complex:
        real = torch.tensor(values, dtype=torch.empty(0, dtype=dtype).real.dtype)
        t = torch.view_as_complex(real.reshape(*body["shape"], 2).contiguous())
    elif dtype.is_floating_point and dtype.itemsize == 1:
        t = torch.tensor(values, dtype=torch.float32).to(dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    t = t.reshape(body["shape"])
    device = torch.device(body["device"])
    if device.type != "cpu" and (device.type != "cuda" or torch.cuda.is_available()):
        t = t.to(device)
    return t


def _kind(value: Any) -> str:
    kind = f"a {type(value).__module__}.{type(value).__qualname__}"
    name = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(name, str):
        return f"{kind} ({getattr(value, '__module__', None)}.{name})"
    text = repr(value)
    return f"{kind} ({text[:60]}{'...' if len(text) > 60 else ''})"
