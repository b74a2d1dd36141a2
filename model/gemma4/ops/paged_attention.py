"""Attention over the paged KV cache for a whole step in one call per layer (torch reference op).

A step's tokens (prefill chunks and decode tokens of many sequences) are one flat row `[T]`. The op
regroups them per sequence, padded: queries `[S, Q]` (Q: the step's longest query, bucketed) attend
to keys gathered from each sequence's block table, `[S, L]` with `L = blocks * block_size` keys from
the first block any of its queries may see. Everything that depends on the step's lengths (gather
indices, key positions, the causal + window mask) is derived on the device from a few small integer
tensors, once per cache group per step (`GroupMetadata`), and shared by every layer of the group.
All shapes are functions of the bucket sizes only, so the op compiles with `fullgraph=True` and is
captured in CUDA graphs. It is the CPU and XLA path and the oracle of the Triton kernels.

Padding never produces NaN: padded query rows attend to their row's first key slot (finite: padded
tokens write zeros, to the null block only), and their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# (values [S, L, kv_heads, D], key positions [S, L]) -> keys [S, L, kv_heads, D] (K-as-V layers)
KeysFromValues = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceLayout:
    """Where each sequence's queries are in the flat step, as device tensors (one set per step).

    `query_start`, `query_len`, `context_len` are `[S]` (context: tokens in the cache once this step's
    are written; padded sequences have all three 0); `token_seq [T]` is each token's sequence and
    `token_mask [T]` is nonzero for real tokens (an integer tensor: it may be a view of a CUDA graph's
    input buffer, converted inside the step); `max_query_len` is the static Q of the padded query grid.
    """

    query_start: torch.Tensor
    query_len: torch.Tensor
    context_len: torch.Tensor
    token_seq: torch.Tensor
    token_mask: torch.Tensor
    max_query_len: int


@dataclass(frozen=True)
class GroupMetadata:
    """A cache group's per-step gather plan: built once, read by each of its layers."""

    query_rows: torch.Tensor  # [S, Q] flat-step row of each padded query (clamped for padding)
    token_index: torch.Tensor  # [T] position of each step token in the flattened [S * Q] grid
    key_blocks: torch.Tensor  # [S, B] block ids of the keys each sequence may see
    key_positions: torch.Tensor  # [S, B * block_size]
    mask: torch.Tensor  # [S, 1, Q, L] True where a query may attend to a key
    slot_mapping: torch.Tensor  # [T] cache slot each step token writes (padding: the null block's slots)


def group_metadata(
    layout: SequenceLayout,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    *,
    block_size: int,
    sliding_window: int | None,
    key_blocks: int,
) -> GroupMetadata:
    """The gather plan of one cache group for a step (`positions [T]`, `block_table [S, cols]`).

    `key_blocks` is the static number of blocks gathered per sequence: enough for the longest
    context in the bucket (full attention) or for a window plus the longest query (sliding).
    """
    device = positions.device
    cols = block_table.shape[1]
    q_len = layout.max_query_len
    table = block_table.long()
    first_query_pos = layout.context_len - layout.query_len  # [S]
    if sliding_window is None:
        first_block = torch.zeros_like(first_query_pos)
    else:
        first_block = (first_query_pos - sliding_window + 1).clamp(min=0) // block_size
    block_index = first_block[:, None] + torch.arange(key_blocks, device=device)  # [S, B]
    keys = table.gather(1, block_index.clamp(max=cols - 1))
    key_positions = (
        first_block[:, None] * block_size + torch.arange(key_blocks * block_size, device=device)
    )  # [S, L]

    offsets = torch.arange(q_len, device=device)
    query_valid = offsets[None, :] < layout.query_len[:, None]  # [S, Q]
    query_rows = (layout.query_start[:, None] + offsets).clamp(max=positions.numel() - 1)
    query_positions = first_query_pos[:, None] + offsets  # [S, Q]
    visible = key_positions[:, None, :] <= query_positions[:, :, None]  # [S, Q, L]
    if sliding_window is not None:
        visible &= query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
    visible &= query_valid[:, :, None]
    # Padded query rows see only their first key slot, so their softmax stays finite.
    first_key = torch.zeros_like(visible)
    first_key[:, :, 0] = True
    mask = torch.where(query_valid[:, :, None], visible, first_key)

    token_offset = torch.arange(positions.numel(), device=device) - layout.query_start[layout.token_seq]
    token_index = layout.token_seq * q_len + token_offset.clamp(0, q_len - 1)
    block_of_token = table.reshape(-1)[layout.token_seq * cols + (positions // block_size).clamp(max=cols - 1)]
    slots = block_of_token * block_size + positions % block_size
    slot_mapping = torch.where(layout.token_mask != 0, slots, positions % block_size)  # padding: the null block (0)
    return GroupMetadata(query_rows, token_index, keys, key_positions, mask[:, None], slot_mapping)


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor) -> None:
    """Store one layer's new keys or values `[T, kv_heads, D]` at their slots of `cache [rows, bs, kv_heads, D]`.

    Padded tokens (`token_mask` zero) write zeros to the null block, which so stays all-zero.
    """
    new = torch.where((token_mask != 0)[:, None, None], new, 0)
    cache.view(-1, *new.shape[-2:]).index_copy_(0, slot_mapping, new)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor,
    meta: GroupMetadata,
    keys_from_values: KeysFromValues | None = None,
) -> torch.Tensor:
    """Attend every step query `q [T, heads, D]` to the keys its sequence may see; returns `[T, heads, D]`.

    `key_cache`/`value_cache` are one layer's pool tensors `[rows, block_size, kv_heads, D]`; K-as-V
    layers pass `key_cache=None` and `keys_from_values`, which re-derives keys from the gathered
    values at their positions. Scale is 1.0 (Gemma 4's QK-norm replaces 1/sqrt(d)).
    """
    s_count, q_len = meta.query_rows.shape
    kv_heads, dim = value_cache.shape[-2:]
    heads = q.shape[1]
    group = heads // kv_heads
    keys_len = meta.key_positions.shape[1]
    values = value_cache[meta.key_blocks].reshape(s_count, keys_len, kv_heads, dim)
    if key_cache is None:
        assert keys_from_values is not None, "K-as-V layers need keys_from_values"
        keys = keys_from_values(values, meta.key_positions)
    else:
        keys = key_cache[meta.key_blocks].reshape(s_count, keys_len, kv_heads, dim)
    # Grouped-query attention without repeating K/V: each KV head serves `group` query heads,
    # stacked along the query axis ([S, kv_heads, group * Q, D]).
    queries = q[meta.query_rows].reshape(s_count, q_len, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    queries = queries.reshape(s_count, kv_heads, group * q_len, dim)
    mask = meta.mask.expand(s_count, 1, q_len, keys_len).repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(
        queries, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=1.0
    )  # [S, kv_heads, group * Q, D]
    out = out.reshape(s_count, kv_heads, group, q_len, dim).permute(0, 3, 1, 2, 4).reshape(s_count * q_len, heads, dim)
    return out[meta.token_index]
