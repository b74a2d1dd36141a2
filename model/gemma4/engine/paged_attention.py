"""Attention over the paged KV cache: the cache tensors, the per-step batch layout, and the torch reference op.

A step's tokens (prefill chunks and decode tokens of many sequences) are flattened into one row
`[1, T]`. Each producer layer writes its new keys/values into its group's blocks, then every layer
attends each sequence's queries to the keys that sequence may see, read back through its block
table. KV-sharing layers only read (their producer wrote earlier in the same step). K-as-V layers
store the normed values once; their keys are re-derived on read (values times k_norm's weight,
rotated at the key positions), exactly the reference's K = RoPE(RMS(raw) * w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gemma4.config import LayerSpec
from gemma4.kv_layout import CacheGroup

# (layer index, values [N, kv_heads, D], key positions [N]) -> keys [N, kv_heads, D]
KeyFromValue = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class PagedKVCache:
    """The KV tensors of every cache group: `[layers, blocks, block_size, kv_heads, head_dim]`."""

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
            shape = (len(group.layers), num_blocks[group.name], block_size, group.num_kv_heads, group.head_dim)
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


class PagedAttention:
    """`AttentionBackend` over `PagedKVCache` for one step (torch reference op, loops over sequences)."""

    def __init__(
        self,
        cache: PagedKVCache,
        sequences: list[SequenceSlice],
        positions: torch.Tensor,
        key_from_value: KeyFromValue,
    ) -> None:
        self.cache = cache
        self.sequences = sequences
        self.positions = positions  # [T]
        self.key_from_value = key_from_value
        bs = cache.block_size
        device = positions.device
        # Where each new token goes, per group.
        self.slot_mapping = []
        for gi in range(len(cache.groups)):
            slots = []
            for seq in sequences:
                pos = torch.arange(seq.first_query_pos, seq.context_len)
                table = torch.tensor(seq.block_tables[gi], dtype=torch.long)
                slots.append(table[pos // bs] * bs + pos % bs)
            self.slot_mapping.append(torch.cat(slots).to(device))

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
        bs = self.cache.block_size
        values = self.cache.values[gi][li].view(-1, group.num_kv_heads, group.head_dim)
        keys_t = self.cache.keys[gi]
        keys = None if keys_t is None else keys_t[li].view(-1, group.num_kv_heads, group.head_dim)
        out = torch.empty_like(q[0])
        for seq in self.sequences:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            q_pos = self.positions[rows]
            lo = 0 if group.sliding_window is None else max(0, seq.first_query_pos - group.sliding_window + 1)
            k_pos = torch.arange(lo, seq.context_len, device=q.device)
            table = torch.tensor(seq.block_tables[gi], dtype=torch.long, device=q.device)
            slots = table[k_pos // bs] * bs + k_pos % bs
            seq_v = values[slots]
            seq_k = self.key_from_value(layer.kv_source, seq_v, k_pos) if keys is None else keys[slots]
            mask = k_pos[None, :] <= q_pos[:, None]
            if group.sliding_window is not None:
                mask &= q_pos[:, None] - k_pos[None, :] < group.sliding_window
            attn = F.scaled_dot_product_attention(
                q[0, rows].transpose(0, 1),
                seq_k.transpose(0, 1),
                seq_v.transpose(0, 1),
                attn_mask=mask,
                scale=1.0,
                enable_gqa=True,
            )
            out[rows] = attn.transpose(0, 1)
        return out[None]
