"""What happens around the user's forward and loss in one optimizer step (torch).

The step is ``zero_grad`` -> for each of ``accumulate`` micro-batches: forward and loss
under :class:`Precision`'s autocast, backward of the loss weighted by the micro-batch's
share of the global batch (scaled by fp16's :class:`GradScaler <torch.amp.GradScaler>`)
-> unscale -> clip (``clip_grad_norm``) -> optimizer step (skipped by the scaler on
inf/NaN gradients) -> scaler update -> :class:`EMA` update. Each piece keeps exactness
the same way: everything it carries from one step to the next is in the checkpoint —
the scaler's scale and growth tracker, the EMA's shadow weights and update count, the
epoch's gradient-norm and skipped-step statistics — and nothing depends on how the
steps were split into fit calls or processes.

Owns: :class:`StepOptions` (the checked options), :class:`Precision`, :class:`EMA`,
:class:`EpochStats` and :func:`micro_batches`. Does not own: the data, the model's
forward (the backend's ``train_step`` or the user's ``step=``), the optimizer.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import StateMismatchError, check_int, check_real, invalid_param

PRECISIONS = ("32", "bf16", "fp16")


@dataclass(frozen=True)
class StepOptions:
    """The options of the training step, checked (``Trainer(precision=, accumulate=,
    clip_grad_norm=, ema=, ema_warmup=)``)."""

    precision: str = "32"
    accumulate: int = 1
    clip_grad_norm: float | None = None
    ema: float | None = None
    ema_warmup: bool = False

    @classmethod
    def checked(
        cls,
        precision: Any = "32",
        accumulate: Any = 1,
        clip_grad_norm: Any = None,
        ema: Any = None,
        ema_warmup: Any = False,
    ) -> StepOptions:
        if precision not in PRECISIONS:
            raise invalid_param("precision", "Trainer", f"one of {PRECISIONS}", precision)
        accumulate = check_int("accumulate", accumulate, "Trainer", minimum=1)
        if clip_grad_norm is not None:
            clip_grad_norm = check_real("clip_grad_norm", clip_grad_norm, "Trainer")
            if clip_grad_norm <= 0:
                raise invalid_param(
                    "clip_grad_norm", "Trainer", "a finite number > 0 or None", clip_grad_norm
                )
        if ema is not None:
            ema = check_real("ema", ema, "Trainer")
            if not 0.0 < ema < 1.0:
                raise invalid_param("ema", "Trainer", "a decay in (0, 1) or None", ema)
        if not isinstance(ema_warmup, bool):
            raise invalid_param("ema_warmup", "Trainer", "a bool", ema_warmup)
        if ema_warmup and ema is None:
            raise ValueError("ema_warmup=True needs an EMA: pass ema=<decay> too.")
        return cls(precision, accumulate, clip_grad_norm, ema, ema_warmup)

    def describe(self) -> dict[str, Any]:
        """For the settings a checkpoint records (a change is named at resume)."""
        return {
            "precision": self.precision,
            "accumulate": self.accumulate,
            "clip_grad_norm": self.clip_grad_norm,
            "ema": self.ema,
            "ema_warmup": self.ema_warmup,
        }


class Precision:
    """Autocast for the forward and loss (bf16 or fp16), and fp16's gradient scaler."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        if self.dtype is not None and not torch.amp.is_autocast_available(self.device_type):
            raise ValueError(
                f"precision={name!r} needs autocast on {self.device_type!r}, which this torch "
                "build lacks. Use precision='32', or train on a device with autocast."
            )
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's context: a fresh autocast region per micro-batch (its cast
        cache is cleared when it closes, so every step casts the current weights)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def state_meta(self) -> dict[str, Any] | None:
        """The scaler's whole state (scale, growth tracker, factors) as JSON numbers."""
        if self.scaler is None:
            return None
        return {k: (float(v) if isinstance(v, float) else int(v))
                for k, v in self.scaler.state_dict().items()}  # fmt: skip

    @staticmethod
    def check_state(meta: Any) -> None:
        """Refuse a checkpoint's scaler state that is not a whole GradScaler state."""
        keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
        if not isinstance(meta, dict) or set(meta) != keys:
            raise StateMismatchError(
                f"scaler is malformed or missing: {meta!r}; an fp16 run's checkpoint holds "
                f"the scaler's {sorted(keys)}."
            )
        if not (isinstance(meta["scale"], float) and math.isfinite(meta["scale"])
                and meta["scale"] > 0):  # fmt: skip
            raise StateMismatchError(f"scaler.scale must be a finite float > 0: {meta!r}")

    def load_state(self, meta: Any) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(dict(meta))


class EMA:
    """An exponential moving average of the model's floating-point state (parameters and
    buffers), updated after every optimizer step: ``shadow = d * shadow + (1 - d) * w``
    with ``d = decay`` or, with ``warmup``, ``min(decay, (1 + n) / (10 + n))`` at update
    ``n`` (so early averages are not dominated by the initial weights). Non-float
    buffers (counters) are copied."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Shadow = the model's current state; no update yet (a new run)."""
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema/{k}": v for k, v in self.shadow.items()}

    def decay_at(self, update: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + update) / (10.0 + update))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        for name, w in model.state_dict().items():
            s = self.shadow[name]
            if s.is_floating_point():
                s.mul_(d).add_(w.detach(), alpha=1.0 - d)
            else:
                s.copy_(w)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The shadow weights in the model for a block (evaluation), then the trained
        weights back, bit for bit."""
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(trained)


class EpochStats:
    """The epoch's gradient norms (before clipping) and fp16 steps skipped by the scaler,
    summed on the device (no host sync per step) and part of the checkpoint, so an
    epoch split by a resume reports the same numbers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.norm_sum, self.norm_max = zero.clone(), zero.clone()
        self.norms, self.skipped = 0, 0

    def add(self, norm: torch.Tensor | None, skipped: bool) -> None:
        """One step's pre-clip gradient norm (None: not clipped, or a skipped step's)."""
        self.skipped += skipped
        if norm is not None:
            n = norm.detach().double()
            self.norm_sum += n
            torch.maximum(self.norm_max, n, out=self.norm_max)
            self.norms += 1

    def logs(self, clipping: bool, scaling: bool) -> dict[str, float]:
        """The epoch's figures for its history record; read at the epoch's end."""
        out: dict[str, float] = {}
        if clipping:
            out["grad_norm"] = float(self.norm_sum) / self.norms if self.norms else math.nan
            out["grad_norm_max"] = float(self.norm_max) if self.norms else math.nan
        if scaling:
            out["skipped_steps"] = float(self.skipped)
        return out

    def state_meta(self) -> dict[str, Any]:
        return {
            "norm_sum": float(self.norm_sum),
            "norm_max": float(self.norm_max),
            "norms": self.norms,
            "skipped": self.skipped,
        }

    @staticmethod
    def check_state(meta: Any) -> None:
        if not (
            isinstance(meta, Mapping)
            and all(isinstance(meta.get(k), float) for k in ("norm_sum", "norm_max"))
            and all(type(meta.get(k)) is int and meta[k] >= 0 for k in ("norms", "skipped"))
        ):
            raise StateMismatchError(f"step.stats is malformed: {meta!r}")

    def load_state(self, meta: Mapping[str, Any]) -> None:
        def f64(key: str) -> torch.Tensor:
            return torch.tensor(meta[key], dtype=torch.float64, device=self.device)

        self.norm_sum, self.norm_max = f64("norm_sum"), f64("norm_max")
        self.norms, self.skipped = meta["norms"], meta["skipped"]


def micro_batches(n: int, k: int, *, keep_empty: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of the ``k`` micro-batches of a batch of ``n`` rows: contiguous,
    sizes differing by at most one (``numpy.array_split``'s rule). Empty ones are
    dropped, unless ``keep_empty`` (under DDP every rank runs ``k`` passes: each one's
    forward may be a collective)."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), k)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if keep_empty or b > a]
