"""Where each MoE layer's experts live: physical slots per EP group, with copies of hot experts.

A placement gives every EP group `S = (E + R) / ep` slots (`R` redundant slots in all), each holding
one logical expert; every expert has at least one slot. A token's assignment to expert e goes to one
of e's copies, chosen by the token's row (`row % copies`), so the copies share e's load.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Mapping, Sequence
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
    _check(num_experts, expert_parallel, redundant)
    per, extra = num_experts // expert_parallel, redundant // expert_parallel
    groups = []
    for g in range(expert_parallel):
        own = list(range(g * per, (g + 1) * per))
        # Copies of experts held by other groups, so a group never holds two copies of one expert.
        spare = [(e + per * (g + 1)) % num_experts for e in range(g * extra, (g + 1) * extra)]
        groups.append(tuple(own + spare))
    return ExpertPlacement(num_experts, tuple(groups))


def rebalance(
    load: Sequence[float], expert_parallel: int, redundant: int, previous: ExpertPlacement | None = None
) -> ExpertPlacement:
    """A placement that evens the EP groups' load (EPLB-style; Gemma 4 has no expert groups to respect).

    Copies: every expert gets one; each redundant copy then goes to the expert with the most load per
    copy (ties: fewer copies, then lower id, so zero load spreads copies round-robin). An expert gets at
    most `expert_parallel` copies while that is possible: a second copy in the same group cannot move
    load between groups. Packing: copies heaviest first (ties: lower id), each into the least-loaded
    group (ties: lower index) with a free slot that does not hold that expert yet; when every group
    with a free slot holds it, a copy from another group that the free group lacks swaps in (the
    closest in load), and only if none exists two copies share a group. The result's max group load is
    at most the mean plus the heaviest copy (list scheduling; see tests/test_expert_placement.py).

    With `previous`, the new groups take the indices of the previous groups they share most experts
    with, and an expert that stays in its group keeps its slot index, so a worker reloads only the
    slots `moved_slots` names; the same load rebalanced twice moves nothing.
    """
    num_experts = len(load)
    _check(num_experts, expert_parallel, redundant)
    _check_load(load, num_experts)
    if previous is not None and (previous.num_experts, previous.expert_parallel, previous.slots_per_group) != (
        num_experts, expert_parallel, (num_experts + redundant) // expert_parallel
    ):
        raise ValueError(
            f"previous placement has {previous.num_experts} experts over {previous.expert_parallel} groups of "
            f"{previous.slots_per_group} slots; this one needs {num_experts} over {expert_parallel} groups of "
            f"{(num_experts + redundant) // expert_parallel}"
        )
    copies = _copy_counts(load, expert_parallel, redundant)
    groups = _pack(load, copies, expert_parallel, (num_experts + redundant) // expert_parallel)
    if previous is not None:
        groups = _keep_slots(groups, previous.slots)
    return ExpertPlacement(num_experts, tuple(tuple(group) for group in groups))


def group_loads(placement: ExpertPlacement, load: Sequence[float]) -> list[float]:
    """Each EP group's load: every expert's load split evenly over its copies (as `row % copies` does)."""
    _check_load(load, placement.num_experts)
    counts = [len(c) for c in placement.copies()]
    return [sum(load[e] / counts[e] for e in group) for group in placement.slots]


def imbalance(loads: Sequence[float]) -> float:
    """Max over mean (1.0 = even, and when there is no load at all)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def plan_placements(
    loads: Mapping[int, Sequence[float]],
    expert_parallel: int,
    redundant: int,
    previous: Mapping[int, ExpertPlacement] | None = None,
) -> dict[int, ExpertPlacement]:
    """A rebalanced placement per MoE layer (keyed like `loads`), each kept close to its previous one."""
    previous = previous or {}
    return {layer: rebalance(load, expert_parallel, redundant, previous.get(layer)) for layer, load in loads.items()}


def moved_slots(old: ExpertPlacement, new: ExpertPlacement) -> list[int]:
    """Physical slots whose expert changed: the weights a worker must load to switch placements."""
    if (old.num_experts, old.expert_parallel, old.slots_per_group) != (
        new.num_experts, new.expert_parallel, new.slots_per_group
    ):
        raise ValueError("placements of different shapes share no slots")
    return [slot for slot, (a, b) in enumerate(zip(old.physical(), new.physical())) if a != b]


def _check(num_experts: int, expert_parallel: int, redundant: int) -> None:
    if num_experts < 1 or expert_parallel < 1 or redundant < 0:
        raise ValueError(f"need experts >= 1, expert_parallel >= 1, redundant >= 0; got {num_experts}, "
                         f"{expert_parallel}, {redundant}")
    if num_experts % expert_parallel or redundant % expert_parallel:
        raise ValueError(f"{num_experts} experts and {redundant} redundant slots must split {expert_parallel} ways")


def _check_load(load: Sequence[float], num_experts: int) -> None:
    if len(load) != num_experts:
        raise ValueError(f"load has {len(load)} entries for {num_experts} experts")
    bad = [e for e, x in enumerate(load) if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise ValueError(f"loads must be finite and >= 0; experts {bad[:8]} are not")


def _copy_counts(load: Sequence[float], expert_parallel: int, redundant: int) -> list[int]:
    num_experts = len(load)
    cap = max(expert_parallel, -(-(num_experts + redundant) // num_experts))
    copies = [1] * num_experts
    heap = [(-load[e], 1, e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(redundant):
        _, _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < cap:
            heapq.heappush(heap, (-load[e] / copies[e], copies[e], e))
    return copies


def _pack(load: Sequence[float], copies: list[int], expert_parallel: int, slots: int) -> list[list[int]]:
    share = [load[e] / copies[e] for e in range(len(load))]
    items = sorted((e for e in range(len(load)) for _ in range(copies[e])), key=lambda e: (-share[e], e))
    groups: list[list[int]] = [[] for _ in range(expert_parallel)]
    totals = [0.0] * expert_parallel
    for e in items:
        free = [g for g in range(expert_parallel) if len(groups[g]) < slots]
        fits = [g for g in free if e not in groups[g]]
        if fits:
            g = min(fits, key=lambda g: (totals[g], g))
        else:
            g = min(free, key=lambda g: (totals[g], g))
            swap = _swap_candidate(groups, share, e, g)
            if swap is not None:  # x moves from group h into g; e takes x's slot in h
                h, s = swap
                x = groups[h][s]
                groups[h][s] = e
                totals[h] += share[e] - share[x]
                e = x
        groups[g].append(e)
        totals[g] += share[e]
    return groups


def _swap_candidate(groups: list[list[int]], share: list[float], e: int, g: int) -> tuple[int, int] | None:
    """A slot (group, index) outside g whose expert g lacks, in a group without e (closest load to e's)."""
    options = [
        (abs(share[x] - share[e]), h, s)
        for h, group in enumerate(groups) if h != g and e not in group
        for s, x in enumerate(group) if x not in groups[g]
    ]
    return min(options)[1:] if options else None


def _keep_slots(groups: list[list[int]], previous: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    """Relabel groups to their most-overlapping previous group, then keep staying experts' slot indices."""
    overlap = sorted(
        (-sum((Counter(new) & Counter(old)).values()), i, j)
        for i, new in enumerate(groups) for j, old in enumerate(previous)
    )
    target: dict[int, int] = {}
    for _, i, j in overlap:
        if i not in target and j not in target.values():
            target[i] = j
    out: list[list[int]] = [[] for _ in groups]
    for i, new in enumerate(groups):
        old = previous[target[i]]
        left = Counter(new)  # copies not yet given a slot
        kept: list[int | None] = []
        for x in old:
            if left[x]:
                left[x] -= 1
                kept.append(x)
            else:
                kept.append(None)
        movers = [x for x in new for _ in range(left.pop(x, 0))]  # in packing order, each expert once
        out[target[i]] = [x if x is not None else movers.pop(0) for x in kept]
    return out
