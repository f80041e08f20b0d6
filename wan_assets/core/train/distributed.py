"""Data-parallel training under torchrun (docs/architecture.md §11): one process per GPU, rank 0 alone writes.

Each optimizer step draws one global batch (batch_size x world_size clips of one bucket); rank r
trains its slice. Gradients are summed across ranks after backward, with each rank's loss already
divided by the global sample count, so N ranks compute exactly the update one process would with
the N-times batch. Every random draw is per sample (seeded by its global index), so the split of
samples over ranks changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, count: int) -> range:
        """The global sample indices [0, count) this rank trains: contiguous, as even as possible."""
        per, extra = divmod(count, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (sum) the gradients of `params` in one flat buffer (one collective, not one per tensor)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def sum_scalar(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a non-finite loss or OOM skips the step everywhere)."""
        return self.sum_scalar(1.0 if flag else 0.0) > 0 if self.enabled else flag

    def broadcast_str(self, value: str) -> str:
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device() if dist.get_backend() == "nccl" else torch.device("cpu")


def init_from_env() -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
