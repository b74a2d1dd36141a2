"""Which layers of a Gemma 4 model store keys/values, grouped into KV-cache groups (pure Python).

A cache group is a set of layers with the same attention type and page shape: all sliding layers
(window-limited) and all full-attention layers. KV-sharing layers (E2B/E4B tail) store nothing:
they read their producer's group. K-as-V layers (26B/31B global layers) store one tensor per
token instead of two. The engine allocates its pools from these groups and the memory model
prices them with the same numbers, so both agree.

Every pool tensor has one row more than its usable blocks: row `NULL_BLOCK`, never allocated and
all-zero (only the padded tokens of a bucketed step write there, and they write zeros), so a
block-table entry a sequence does not hold reads zeros, not another sequence's KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemma4.config import FULL, SLIDING, Gemma4TextConfig

NULL_BLOCK = 0  # the reserved all-zero block of every pool; block tables point entries they do not hold at it


def pool_rows(num_blocks: int) -> int:
    """Rows of a pool tensor with `num_blocks` usable blocks: those plus the null block."""
    return num_blocks + 1


@dataclass(frozen=True)
class CacheGroup:
    """Layers sharing one block pool; `tensors_per_layer` is 1 for K-as-V layers, else 2 (K and V)."""

    name: str
    layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    tensors_per_layer: int

    @property
    def elements_per_token_per_layer(self) -> int:
        """Elements stored per token per layer (multiply by the KV dtype size for bytes)."""
        return self.tensors_per_layer * self.num_kv_heads * self.head_dim

    def bytes_per_token(self, kv_dtype_bytes: int) -> int:
        """Bytes one token occupies in this group, over all its layers."""
        return len(self.layers) * self.elements_per_token_per_layer * kv_dtype_bytes

    def bytes_per_block(self, block_size: int, kv_dtype_bytes: int) -> int:
        return block_size * self.bytes_per_token(kv_dtype_bytes)

    def peak_blocks_per_sequence(self, block_size: int, max_model_len: int, max_chunk: int) -> int:
        """Most blocks one sequence can hold at once: all its tokens, or (sliding) its window plus a prefill chunk."""
        if self.sliding_window is None:
            return math.ceil(max_model_len / block_size)
        return math.ceil(min(max_model_len, self.sliding_window - 1 + max_chunk) / block_size) + 1

    def pool_bytes(self, num_blocks: int, block_size: int, kv_dtype_bytes: int) -> int:
        """Bytes of this group's pool tensors with `num_blocks` usable blocks (the null block included)."""
        return pool_rows(num_blocks) * self.bytes_per_block(block_size, kv_dtype_bytes)

    def max_blocks_per_sequence(self, num_tokens: int, block_size: int) -> int:
        """Blocks a sequence of `num_tokens` holds at once after prefill (sliding: the window's blocks)."""
        if self.sliding_window is None:
            return math.ceil(num_tokens / block_size)
        return min(math.ceil(num_tokens / block_size), math.ceil(self.sliding_window / block_size) + 1)


def cache_groups(config: Gemma4TextConfig) -> tuple[CacheGroup, ...]:
    """The KV-cache groups of a text config: one per attention type that has producer layers."""
    groups = []
    for kind in (SLIDING, FULL):
        producers = [s for s in config.layers if s.attention_type == kind and not s.shares_kv]
        if not producers:
            continue
        first = producers[0]
        groups.append(
            CacheGroup(
                name="sliding" if kind == SLIDING else "full",
                layers=tuple(s.index for s in producers),
                num_kv_heads=first.num_kv_heads,
                head_dim=first.head_dim,
                sliding_window=first.sliding_window,
                tensors_per_layer=1 if first.k_eq_v else 2,
            )
        )
    return tuple(groups)


def split_kv_budget(
    groups: tuple[CacheGroup, ...],
    budget_bytes: int,
    *,
    block_size: int,
    kv_dtype_bytes: int,
    max_num_seqs: int,
    max_model_len: int,
    max_num_batched_tokens: int,
) -> dict[str, int]:
    """Usable blocks per group from one byte budget, so that the pool tensors (`pool_bytes`) fit it.

    Each pool's null block is paid for first. Sliding groups get what `max_num_seqs` sequences need
    at most (their window plus one prefill chunk); full-attention groups share the rest in
    proportion to their bytes per token, since every token of every sequence lives in each of them.
    """
    blocks: dict[str, int] = {}
    remaining = budget_bytes - sum(g.pool_bytes(0, block_size, kv_dtype_bytes) for g in groups)
    sliding = [g for g in groups if g.sliding_window is not None]
    full = [g for g in groups if g.sliding_window is None]
    for g in sliding:
        want = max_num_seqs * g.peak_blocks_per_sequence(block_size, max_model_len, max_num_batched_tokens)
        affordable = max(0, remaining) // g.bytes_per_block(block_size, kv_dtype_bytes)
        blocks[g.name] = min(want, affordable)
        remaining -= blocks[g.name] * g.bytes_per_block(block_size, kv_dtype_bytes)
    full_block_bytes = sum(g.bytes_per_block(block_size, kv_dtype_bytes) for g in full)
    for g in full:
        blocks[g.name] = max(0, remaining) // full_block_bytes if full_block_bytes else 0
    return blocks
