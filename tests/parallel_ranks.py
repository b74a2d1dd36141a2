"""Picklable rank objects for the process-harness tests (spawned children import them by module name)."""

from __future__ import annotations

import os

import torch

from gemma4.parallel.comm import init_collectives


class GlooRank:
    """One rank of a gloo group that runs a collective on request or fails on purpose."""

    def __init__(self, world_size: int, rank: int, init_method: str) -> None:
        self.rank = rank
        self.comm = init_collectives("gloo", init_method, world_size, rank)

    def all_reduce(self, values: list[float]) -> list[float]:
        return self.comm.all_reduce(torch.tensor(values) * (self.rank + 1)).tolist()

    def all_gather(self, rows: int, dim: int) -> list:
        x = torch.full((rows, 2), float(self.rank)) + torch.arange(rows, dtype=torch.float32)[:, None]
        return self.comm.all_gather(x, dim=dim).tolist()

    def fail(self, rank: int) -> int:
        if self.rank == rank:
            raise ValueError(f"rank {rank} fails on purpose")
        return self.rank

    def fail_before_collective(self, rank: int) -> float:
        """Rank `rank` raises; the others wait in an all-reduce it never joins."""
        if self.rank == rank:
            raise ValueError(f"rank {rank} fails before the collective")
        return self.comm.all_reduce(torch.ones(1)).item()

    def pid(self) -> int:
        return os.getpid()


def make_gloo_rank(world_size: int, rank: int, init_method: str) -> GlooRank:
    return GlooRank(world_size, rank, init_method)


def make_broken_rank(rank: int, init_method: str) -> GlooRank:
    raise RuntimeError(f"rank {rank} cannot start (on purpose)")
