"""Data-parallel training under torchrun: the process group and the few collectives
warmfit needs.

Owns: reading torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``),
starting the process group (gloo on the CPU, nccl on a GPU) when torchrun started us
and nobody else did (a group the caller started without torchrun is joined as it is),
and three collectives over plain tensors: a sum, an "any rank?" vote (for a
coordinated stop on SIGTERM) and a gather of byte strings (per-rank random streams for
the checkpoint). Nothing here pickles: byte strings travel as uint8 tensors.

Does not own: sharding (:func:`warmfit.data.shard` splits a *global* batch, so the batch
composition does not depend on the world size) or the model wrapper (the torch backend
wraps the model in ``DistributedDataParallel``).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """``cuda`` without an index means this rank's GPU: ``cuda:<local_rank>``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """The context torchrun set up, starting the process group if needed; or the
        process group the caller started itself without torchrun's environment (e.g.
        ``torch.multiprocessing.spawn`` + ``init_process_group(..., world_size=N)``)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if "WORLD_SIZE" not in os.environ and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                rank = dist.get_rank()
                local_rank = int(os.environ.get("LOCAL_RANK", rank))
                return cls(world, rank, local_rank, _rank_device(device, local_rank))
        if world <= 1:
            return cls(device=device)
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = _rank_device(device, local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            # We started the group, so we end it: a group left to the interpreter's
            # teardown can abort the process ("terminate called without an active
            # exception") as its background threads are destroyed.
            atexit.register(_destroy_process_group)
        if dist.get_world_size() != world:
            raise RuntimeError(
                f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks."
            )
        return cls(world, rank, local_rank, device)

    # -- collectives (every rank must call them at the same point) -----------------------
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order, on every rank."""
        if not self.active:
            return [payload]
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        if payload:  # frombuffer refuses an empty buffer
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        bufs = [torch.zeros_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf)
        return [bytes(b[: int(s.item())].cpu().numpy()) for b, s in zip(bufs, sizes, strict=True)]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
