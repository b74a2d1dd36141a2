"""Attention over the paged KV cache for a whole step in one call per layer (torch reference op).

A step's tokens (prefill chunks and decode tokens of many sequences) are one flat row `[T]`. The op
regroups them per sequence into padded query grids: one grid of single-query sequences (decodes,
`[S_d, 1]`) and one of the longer ones (prefill chunks, `[S_p, Q]`, Q the longest chunk, bucketed),
so a long chunk in a step never pads every decode to its length. Each sequence attends to keys
gathered from its block table, `[S, L]` with `L = blocks * block_size` keys from the first block any
of its queries may see. Everything that depends on the step's lengths (gather indices, key
positions, the causal + window masks) is derived on the device from a few small integer tensors,
once per cache group per step (`GroupMetadata`), and shared by every layer of the group. All
shapes are functions of the bucket sizes only, so the op compiles with `fullgraph=True` and is
captured in CUDA graphs. It is the CPU and XLA path and the oracle of the Triton kernels.

Bidirectional spans (sliding layers of the vision models): queries of one span (an image's soft
tokens, `SequenceLayout.span_ids`) also see the later keys of their span, `(k > q - W) & (k <= q |
same span)`. A span lies within one step (the scheduler never splits one), so only keys written in
this step carry a span id; earlier keys count as none.

Padding never produces NaN: padded query rows attend to their row's first key slot (finite: padded
tokens write zeros, to the null block only), and their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemma4.ops.rope import apply_rope, rope_at


@dataclass(frozen=True)
class SequenceLayout:
    """Where each sequence's queries are in the flat step, as device tensors (one set per step).

    `query_start`, `query_len`, `context_len` are `[S]` (context: tokens in the cache once this step's
    are written; padded sequences have all three 0); `token_seq [T]` is each token's sequence and
    `token_mask [T]` is nonzero for real tokens (an integer tensor: it may be a view of a CUDA graph's
    input buffer, converted inside the step). `grids` are the static (sequences, query length) of
    the padded query grids, in sequence order: `((S_d, 1), (S_p, Q))`, empty grids left out.
    `span_ids [T]` (integers, -1 outside spans) marks the bidirectional spans of the step's tokens;
    layers attend through them only where `group_metadata(..., spans=True)`.
    """

    query_start: torch.Tensor
    query_len: torch.Tensor
    context_len: torch.Tensor
    token_seq: torch.Tensor
    token_mask: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    span_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class GridGather:
    """One query grid's gather plan for one cache group."""

    query_rows: torch.Tensor  # [S, Q] flat-step row of each padded query (clamped for padding)
    key_blocks: torch.Tensor  # [S, B] block ids of the keys each sequence may see
    key_positions: torch.Tensor  # [S, B * block_size]
    mask: torch.Tensor  # [S, 1, Q, L] True where a query may attend to a key
    key_rope: tuple[torch.Tensor, torch.Tensor] | None  # fp32 (cos, sin) [S, L, D] at the key positions (K-as-V)


@dataclass(frozen=True)
class GroupMetadata:
    """A cache group's per-step plan: built once, read by each of its layers."""

    grids: tuple[GridGather, ...]
    token_index: torch.Tensor  # [T] row of each step token in the grids' concatenated [sum S * Q] output
    slot_mapping: torch.Tensor  # [T] cache slot each step token writes (padding: the null block's slots)


def key_blocks(sliding_window: int | None, block_size: int, table_cols: int, query_len: int) -> int:
    """Blocks gathered per sequence: the whole table (full attention), or what a window and a query of
    `query_len` can span (sliding: the window may start mid-block)."""
    if sliding_window is None:
        return table_cols
    return min(table_cols, -(-(sliding_window - 1 + query_len) // block_size) + 1)


def _span_visible(
    span_ids: torch.Tensor,
    query_start: torch.Tensor,
    query_len: torch.Tensor,
    first_query_pos: torch.Tensor,
    query_rows: torch.Tensor,
    query_valid: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """`[S, Q, L]`: True where query and key lie in the same span. Keys written before this step (and
    positions past the context) have no span."""
    span_q = torch.where(query_valid, span_ids[query_rows], -1)  # [S, Q]
    key_offset = key_positions - first_query_pos[:, None]  # [S, L] the key's offset among this step's tokens
    key_in_step = (key_offset >= 0) & (key_offset < query_len[:, None])
    key_rows = (query_start[:, None] + key_offset).clamp(0, span_ids.numel() - 1)
    span_k = torch.where(key_in_step, span_ids[key_rows], -1)  # [S, L]
    return (span_q[:, :, None] == span_k[:, None, :]) & (span_q[:, :, None] >= 0)


def _grid_gather(
    layout: SequenceLayout,
    table: torch.Tensor,
    first: int,
    num_seqs: int,
    q_len: int,
    num_tokens: int,
    block_size: int,
    sliding_window: int | None,
    key_inv_freq: torch.Tensor | None,
    spans: bool,
) -> GridGather:
    device = table.device
    seqs = slice(first, first + num_seqs)
    cols = table.shape[1]
    blocks = key_blocks(sliding_window, block_size, cols, q_len)
    query_len, query_start = layout.query_len[seqs], layout.query_start[seqs]
    first_query_pos = layout.context_len[seqs] - query_len  # [S]
    if sliding_window is None:
        first_block = torch.zeros_like(first_query_pos)
    else:
        first_block = (first_query_pos - sliding_window + 1).clamp(min=0) // block_size
    block_index = first_block[:, None] + torch.arange(blocks, device=device)  # [S, B]
    keys = table[seqs].gather(1, block_index.clamp(max=cols - 1))
    key_positions = first_block[:, None] * block_size + torch.arange(blocks * block_size, device=device)  # [S, L]

    offsets = torch.arange(q_len, device=device)
    query_valid = offsets[None, :] < query_len[:, None]  # [S, Q]
    query_rows = (query_start[:, None] + offsets).clamp(max=num_tokens - 1)
    query_positions = first_query_pos[:, None] + offsets  # [S, Q]
    visible = key_positions[:, None, :] <= query_positions[:, :, None]  # [S, Q, L]
    if spans and layout.span_ids is not None:
        visible |= _span_visible(
            layout.span_ids, query_start, query_len, first_query_pos, query_rows, query_valid, key_positions
        )
    if sliding_window is not None:
        visible &= query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
    # Padded query rows see only their first key slot, so their softmax stays finite.
    first_key = torch.zeros_like(visible)
    first_key[:, :, 0] = True
    mask = torch.where(query_valid[:, :, None], visible, first_key)
    rope = None if key_inv_freq is None else rope_at(key_positions, key_inv_freq)
    return GridGather(query_rows, keys, key_positions, mask[:, None], rope)


def group_metadata(
    layout: SequenceLayout,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    *,
    block_size: int,
    sliding_window: int | None,
    key_inv_freq: torch.Tensor | None = None,
    spans: bool = False,
) -> GroupMetadata:
    """The plan of one cache group for a step (`positions [T]`, `block_table [S, cols]`).

    A group that stores values only (K-as-V) passes `key_inv_freq [D/2]` (its layer type's
    `RotaryEmbedding.inv_freq`): its keys' rotation is then computed here once per step, not in each
    of its layers. `spans=True` (sliding layers of bidirectional models) lets the queries of a span
    of `layout.span_ids` see their span's later keys.
    """
    device = positions.device
    num_tokens = positions.numel()
    table = block_table.long()
    grids, bases, widths = [], [], []
    first = out_row = 0
    for num_seqs, q_len in layout.grids:
        grids.append(
            _grid_gather(
                layout, table, first, num_seqs, q_len, num_tokens, block_size, sliding_window, key_inv_freq, spans
            )
        )
        bases.append(out_row + torch.arange(num_seqs, device=device) * q_len)
        widths.append(torch.full((num_seqs,), q_len, device=device))
        first += num_seqs
        out_row += num_seqs * q_len
    seq = layout.token_seq
    token_offset = torch.arange(num_tokens, device=device) - layout.query_start[seq]
    token_index = torch.cat(bases)[seq] + torch.minimum(token_offset.clamp(min=0), torch.cat(widths)[seq] - 1)
    return GroupMetadata(tuple(grids), token_index, slot_mapping(layout, positions, table, block_size))


def slot_mapping(
    layout: SequenceLayout, positions: torch.Tensor, block_table: torch.Tensor, block_size: int
) -> torch.Tensor:
    """`[T]` cache slot each step token writes; padded tokens write the null block's slots."""
    cols = block_table.shape[1]
    block_index = layout.token_seq * cols + (positions // block_size).clamp(max=cols - 1)
    block_of_token = block_table.long().reshape(-1)[block_index]
    slots = block_of_token * block_size + positions % block_size
    return torch.where(layout.token_mask != 0, slots, positions % block_size)


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor) -> None:
    """Store one layer's new keys or values `[T, kv_heads, D]` at their slots of `cache [rows, bs, kv_heads, D]`.

    Padded tokens (`token_mask` zero) write zeros to the null block, which so stays all-zero.
    """
    new = torch.where((token_mask != 0)[:, None, None], new, 0)
    cache.view(-1, *new.shape[-2:]).index_copy_(0, slot_mapping, new)


def _grid_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor,
    grid: GridGather,
    key_scale: torch.Tensor | None,
) -> torch.Tensor:
    """One grid's attention, `[S * Q, heads, D]`."""
    s_count, q_len = grid.query_rows.shape
    kv_heads, dim = value_cache.shape[-2:]
    heads = q.shape[1]
    group = heads // kv_heads
    keys_len = grid.key_positions.shape[1]
    values = value_cache[grid.key_blocks].reshape(s_count, keys_len, kv_heads, dim)
    if key_cache is None:
        assert key_scale is not None and grid.key_rope is not None, "K-as-V layers need key_scale and key_inv_freq"
        cos, sin = grid.key_rope
        keys = apply_rope(values * key_scale, cos.to(values.dtype), sin.to(values.dtype))
    else:
        keys = key_cache[grid.key_blocks].reshape(s_count, keys_len, kv_heads, dim)
    # Grouped-query attention without repeating K/V: each KV head serves `group` query heads,
    # stacked along the query axis ([S, kv_heads, group * Q, D]).
    queries = q[grid.query_rows].reshape(s_count, q_len, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    queries = queries.reshape(s_count, kv_heads, group * q_len, dim)
    # The mask of query q serves its `group` stacked rows; a single query broadcasts it.
    mask = grid.mask if q_len == 1 else grid.mask.expand(s_count, 1, q_len, keys_len).repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(
        queries, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=1.0
    )  # [S, kv_heads, group * Q, D]
    return out.reshape(s_count, kv_heads, group, q_len, dim).permute(0, 3, 1, 2, 4).reshape(s_count * q_len, heads, dim)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor,
    meta: GroupMetadata,
    key_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend every step query `q [T, heads, D]` to the keys its sequence may see; returns `[T, heads, D]`.

    `key_cache`/`value_cache` are one layer's pool tensors `[rows, block_size, kv_heads, D]`. K-as-V
    layers pass `key_cache=None` and `key_scale [D]` (their k_norm weight): keys are re-derived from
    the gathered (normed) values as `RoPE(values * key_scale)` at the key positions (`meta` built with
    `key_inv_freq`). Scale is 1.0 (Gemma 4's QK-norm replaces 1/sqrt(d)).
    """
    outs = [_grid_attention(q, key_cache, value_cache, grid, key_scale) for grid in meta.grids]
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[meta.token_index]
