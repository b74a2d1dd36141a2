"""How one replica's ranks split the decoder: tensor parallelism over every rank, expert parallelism
over groups of them.

A replica of `tensor_parallel` ranks runs attention and the dense MLP tensor-parallel over all of
them (heads, MLP width and vocabulary split `tensor_parallel` ways; KV heads split, or replicated one
per rank when there are more ranks than KV heads). The MoE block is expert-parallel over
`expert_parallel` groups of `tensor_parallel / expert_parallel` consecutive ranks: group g holds the
experts of its placement slots (`gemma4.parallel.placement`), and the ranks inside a group split
each expert's width. Every rank sees every token (attention is tensor-parallel), so routing runs
replicated and one all-reduce combines the dense MLP's and the experts' partial sums. This is the
layout `gemma4.memory` prices; `gemma4.memory.check_layout` says which degrees a config takes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """One rank's place in a replica: `rank` of `tensor_parallel`; `expert_parallel` divides it.

    `redundant_experts` extra physical expert slots per MoE layer (in total, spread evenly over the
    EP groups) hold copies of hot experts.
    """

    tensor_parallel: int = 1
    expert_parallel: int = 1
    rank: int = 0
    redundant_experts: int = 0

    def __post_init__(self) -> None:
        tp, ep = self.tensor_parallel, self.expert_parallel
        for name in ("tensor_parallel", "expert_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if tp % ep:
            raise ValueError(f"expert_parallel ({ep}) must divide tensor_parallel ({tp})")
        if not 0 <= self.rank < tp:
            raise ValueError(f"rank must be in [0, {tp}), got {self.rank}")
        if self.redundant_experts < 0 or self.redundant_experts % ep:
            raise ValueError(
                f"redundant_experts must be a non-negative multiple of expert_parallel ({ep}), got {self.redundant_experts}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel

    @property
    def distributed(self) -> bool:
        return self.tensor_parallel > 1

    @property
    def expert_group(self) -> int:
        """The EP group this rank belongs to."""
        return self.rank // self.expert_tensor_parallel

    @property
    def expert_tensor_parallel(self) -> int:
        """Ranks per EP group: they split each of the group's experts' width."""
        return self.tensor_parallel // self.expert_parallel

    @property
    def expert_tensor_rank(self) -> int:
        return self.rank % self.expert_tensor_parallel

    def with_rank(self, rank: int) -> "ParallelLayout":
        return ParallelLayout(self.tensor_parallel, self.expert_parallel, rank, self.redundant_experts)

    def split(self, size: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
        """(start, length) of this rank's share of `size` split `parts` ways (default: TP)."""
        parts = self.tensor_parallel if parts is None else parts
        index = self.rank if index is None else index
        if size % parts:
            raise ValueError(f"{size} does not split {parts} ways")
        length = size // parts
        return index * length, length

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first head, heads) of a layer's KV heads this rank holds: an even split, or, with more ranks
        than heads, the one head its consecutive block of `tp / heads` ranks shares."""
        tp = self.tensor_parallel
        if num_kv_heads % tp == 0:
            return self.split(num_kv_heads)
        if tp % num_kv_heads:
            raise ValueError(f"tensor_parallel={tp} neither divides nor is a multiple of {num_kv_heads} KV heads")
        return self.rank // (tp // num_kv_heads), 1

    def expert_width(self, intermediate: int) -> tuple[int, int]:
        """(start, length) of each expert's intermediate width this rank computes inside its EP group."""
        return self.split(intermediate, self.expert_tensor_parallel, self.expert_tensor_rank)

    def expert_slots(self, num_experts: int) -> int:
        """Physical expert slots per EP group."""
        total = num_experts + self.redundant_experts
        if total % self.expert_parallel:
            raise ValueError(f"{num_experts} experts + {self.redundant_experts} redundant do not split {self.expert_parallel} ways")
        return total // self.expert_parallel


def check_parallel_settings(tensor_parallel: int, expert_parallel: int, redundant: int, rebalance_interval: int) -> None:
    """The layout settings' rules among themselves (the engine's and the platform's settings share them);
    `gemma4.memory.check_layout` then checks them against a model's config."""
    tp, ep = tensor_parallel, expert_parallel
    if tp % ep:
        raise ValueError(f"expert_parallel_size ({ep}) must divide tensor_parallel_size ({tp})")
    if ep == 1 and (redundant or rebalance_interval):
        raise ValueError("redundant_experts and expert_rebalance_interval need expert_parallel_size > 1")
    if redundant % ep:
        raise ValueError(f"redundant_experts ({redundant}) must be a multiple of expert_parallel_size ({ep})")
