"""Attention over the paged KV cache: the cache tensors, the per-step batch layout, and the torch reference op.

A step's tokens (prefill chunks and decode tokens of many sequences) are flattened into one row
`[1, T]`. Each producer layer writes its new keys/values into its group's blocks, then every layer
attends each sequence's queries to the keys that sequence may see, read back through its block
table. KV-sharing layers only read (their producer wrote earlier in the same step). K-as-V layers
store the normed values once; their keys are re-derived on read (values times k_norm's weight,
rotated at the key positions), exactly the reference's K = RoPE(RMS(raw) * w).

Entries a sequence does not hold point at the pool's zero row `NULL_BLOCK`. With
`GEMMA4_DEBUG_CHECKS=1` (on in the tests) every step's block tables are checked before use, so a
bookkeeping bug fails loudly instead of attending to zeros or to another sequence's KV.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gemma4.config import LayerSpec
from gemma4.kv_layout import NULL_BLOCK, CacheGroup, pool_rows

# (layer index, values [N, kv_heads, D], key positions [N]) -> keys [N, kv_heads, D]
KeyFromValue = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

DEBUG_CHECKS_ENV = "GEMMA4_DEBUG_CHECKS"


def debug_checks_enabled() -> bool:
    """Whether every step's block tables are validated (`GEMMA4_DEBUG_CHECKS=1`): costs a pass over them."""
    return os.environ.get(DEBUG_CHECKS_ENV) == "1"


class PagedKVCache:
    """The KV tensors of every cache group: `[layers, blocks + 1, block_size, kv_heads, head_dim]`.

    Row `NULL_BLOCK` of each is the null block, on top of the group's `num_blocks` usable ones.
    """

    def __init__(
        self,
        groups: tuple[CacheGroup, ...],
        num_blocks: dict[str, int],
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.groups = groups
        self.block_size = block_size
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor] = []
        self.location: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(groups):
            rows = pool_rows(num_blocks[group.name])
            shape = (len(group.layers), rows, block_size, group.num_kv_heads, group.head_dim)
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device) if group.tensors_per_layer == 2 else None)
            for li, layer in enumerate(group.layers):
                self.location[layer] = (gi, li)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.values, *self.keys] if t is not None)


@dataclass
class SequenceSlice:
    """One sequence's part of a step: its queries are rows [query_start, query_start + query_len)."""

    query_start: int
    query_len: int
    context_len: int  # tokens in the cache once this step's tokens are written
    block_tables: list[list[int]]  # one per cache group

    @property
    def first_query_pos(self) -> int:
        return self.context_len - self.query_len

    def first_key_pos(self, sliding_window: int | None) -> int:
        """The first key position any of this slice's queries may attend to."""
        return 0 if sliding_window is None else max(0, self.first_query_pos - sliding_window + 1)


def check_block_tables(cache: PagedKVCache, sequences: list[SequenceSlice]) -> None:
    """Raise if a step would touch KV through a block its sequence does not hold.

    Every entry must be a row of its pool, and the blocks covering a sequence's keys (its queries'
    windows, which include the positions written this step) must exist and not be the null block.
    """
    bs = cache.block_size
    for gi, group in enumerate(cache.groups):
        rows = cache.values[gi].shape[1]
        for si, seq in enumerate(sequences):
            table = seq.block_tables[gi]
            first_key = seq.first_key_pos(group.sliding_window)
            needed = range(first_key // bs, -(-seq.context_len // bs))
            if len(table) < needed.stop:
                raise RuntimeError(
                    f"sequence {si}: the {group.name} block table covers {len(table)} blocks; "
                    f"its {seq.context_len} tokens need {needed.stop}"
                )
            for i, block in enumerate(table):
                if not 0 <= block < rows:
                    raise RuntimeError(
                        f"sequence {si}: {group.name} block table entry {i} is {block}, outside the pool [0, {rows})"
                    )
                if block == NULL_BLOCK and i in needed:
                    raise RuntimeError(
                        f"sequence {si}: {group.name} block table entry {i} is the null block, inside the "
                        f"attention window (keys {first_key}..{seq.context_len - 1})"
                    )


@dataclass(frozen=True)
class _KeyView:
    rows: slice  # the sequence's query rows in the step
    positions: torch.Tensor  # key positions it may attend to
    slots: torch.Tensor  # their cache slots
    mask: torch.Tensor  # [queries, keys]


class PagedAttention:
    """`AttentionBackend` over `PagedKVCache` for one step (torch reference op, loops over sequences)."""

    def __init__(
        self,
        cache: PagedKVCache,
        sequences: list[SequenceSlice],
        positions: torch.Tensor,
        key_from_value: KeyFromValue,
    ) -> None:
        if debug_checks_enabled():
            check_block_tables(cache, sequences)
        self.cache = cache
        self.sequences = sequences
        self.positions = positions  # [T]
        self.key_from_value = key_from_value
        self._tables = [
            [torch.tensor(seq.block_tables[gi], dtype=torch.long, device=positions.device) for seq in sequences]
            for gi in range(len(cache.groups))
        ]
        # Where each new token goes, per group.
        new_positions = [torch.arange(seq.first_query_pos, seq.context_len, device=positions.device) for seq in sequences]
        self.slot_mapping = [
            torch.cat([self._slots(table, pos) for table, pos in zip(tables, new_positions)]) for tables in self._tables
        ]
        self._views: dict[int, list[_KeyView]] = {}

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = self.cache.block_size
        return table[positions // bs] * bs + positions % bs

    def _key_views(self, gi: int) -> list[_KeyView]:
        """Per sequence: the key positions it may see in group `gi`, their slots and the mask (once per step,
        shared by every layer of the group)."""
        if gi not in self._views:
            window = self.cache.groups[gi].sliding_window
            views = []
            for seq, table in zip(self.sequences, self._tables[gi]):
                rows = slice(seq.query_start, seq.query_start + seq.query_len)
                q_pos = self.positions[rows]
                k_pos = torch.arange(seq.first_key_pos(window), seq.context_len, device=q_pos.device)
                mask = k_pos[None, :] <= q_pos[:, None]
                if window is not None:
                    mask &= q_pos[:, None] - k_pos[None, :] < window
                views.append(_KeyView(rows, k_pos, self._slots(table, k_pos), mask))
            self._views[gi] = views
        return self._views[gi]

    def _write(self, gi: int, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self.slot_mapping[gi]
        values = self.cache.values[gi][li].view(-1, *v.shape[-2:])
        values[slots] = v[0]
        keys = self.cache.keys[gi]
        if keys is not None:
            keys[li].view(-1, *k.shape[-2:])[slots] = k[0]

    def __call__(
        self, layer: LayerSpec, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> torch.Tensor:
        gi, li = self.cache.location[layer.kv_source]
        if k is not None and v is not None:
            self._write(gi, li, k, v)
        group = self.cache.groups[gi]
        values = self.cache.values[gi][li].view(-1, group.num_kv_heads, group.head_dim)
        keys_t = self.cache.keys[gi]
        keys = None if keys_t is None else keys_t[li].view(-1, group.num_kv_heads, group.head_dim)
        out = torch.empty_like(q[0])
        for view in self._key_views(gi):
            rows = view.rows
            seq_v = values[view.slots]
            seq_k = self.key_from_value(layer.kv_source, seq_v, view.positions) if keys is None else keys[view.slots]
            attn = F.scaled_dot_product_attention(
                q[0, rows].transpose(0, 1),
                seq_k.transpose(0, 1),
                seq_v.transpose(0, 1),
                attn_mask=view.mask,
                scale=1.0,
                enable_gqa=True,
            )
            out[rows] = attn.transpose(0, 1)
        return out[None]
