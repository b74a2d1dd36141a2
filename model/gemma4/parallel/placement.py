"""Where each MoE layer's experts live: physical slots per EP group, with copies of hot experts.

A placement gives every EP group `S = (E + R) / ep` slots (`R` redundant slots in all), each holding
one logical expert; every expert has at least one slot. A token's assignment to expert e goes to one
of e's copies, chosen by the token's row (`row % copies`), so the copies share e's load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    """`slots[g][s]` is the logical expert in slot s of EP group g (physical slot `g * S + s`)."""

    num_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        sizes = {len(group) for group in self.slots}
        if len(sizes) != 1:
            raise ValueError(f"every EP group needs the same number of slots, got {[len(g) for g in self.slots]}")
        placed = {e for group in self.slots for e in group}
        if placed != set(range(self.num_experts)):
            missing = sorted(set(range(self.num_experts)) - placed)
            raise ValueError(f"a placement must hold every expert in [0, {self.num_experts}); missing {missing[:8]}")

    @property
    def expert_parallel(self) -> int:
        return len(self.slots)

    @property
    def slots_per_group(self) -> int:
        return len(self.slots[0])

    def physical(self) -> list[int]:
        """The logical expert of each physical slot, in physical order."""
        return [e for group in self.slots for e in group]

    def copies(self) -> list[list[int]]:
        """For each logical expert, its physical slots (ascending)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(self.physical()):
            out[expert].append(slot)
        return out


def balanced_placement(num_experts: int, expert_parallel: int, redundant: int = 0) -> ExpertPlacement:
    """The start: experts in order, `E / ep` consecutive ones per group, then the redundant slots hold
    experts 0, 1, ... again, one more per group (before any load is known, every expert is as hot)."""
    if num_experts % expert_parallel or redundant % expert_parallel:
        raise ValueError(f"{num_experts} experts and {redundant} redundant slots must split {expert_parallel} ways")
    per, extra = num_experts // expert_parallel, redundant // expert_parallel
    groups = []
    for g in range(expert_parallel):
        own = list(range(g * per, (g + 1) * per))
        # Copies of experts held by other groups, so a group never holds two copies of one expert.
        spare = [(e + per * (g + 1)) % num_experts for e in range(g * extra, (g + 1) * extra)]
        groups.append(tuple(own + spare))
    return ExpertPlacement(num_experts, tuple(groups))
