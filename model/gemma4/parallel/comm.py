"""The collectives a model shard runs, over its replica's process group (no-ops for a single rank).

torch.distributed's own process groups carry them: NCCL on CUDA (RCCL behind the same API on ROCm),
gloo on the CPU (`gemma4.backends.Backend.collectives` names the one for a device). The model calls
only these three, so a rank's forward is the single-device forward plus one all-reduce after each
row-parallel projection, one all-gather of the logits and one all-reduce per vocabulary-split
embedding lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Collectives:
    """A rank's collectives; `group=None` with `world_size=1` is the single-device case."""

    world_size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (in place; returns `x`)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim`, rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))  # the ranks' x stacked along dim 0
        _all_gather_single(out, x, group=self.group)
        return torch.cat(out.chunk(self.world_size), dim=dim % x.dim())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


SINGLE = Collectives()
# torch 2.13 names it all_gather_single (and deprecates all_gather_into_tensor); torch 2.9 has only the latter.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def init_collectives(backend: str, init_method: str, world_size: int, rank: int) -> Collectives:
    """Join the replica's process group (`backend` nccl / gloo) and return its collectives."""
    if world_size == 1:
        return SINGLE
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)
    return Collectives(world_size, rank, dist.group.WORLD)
