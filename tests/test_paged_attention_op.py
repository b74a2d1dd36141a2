"""The batched paged-attention op equals plain per-sequence attention, pads safely, and is graph-friendly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gemma4.config import RopeConfig
from gemma4.modeling import RotaryEmbedding
from gemma4.ops.rope import apply_rope
from gemma4.ops.paged_attention import SequenceLayout, group_metadata, paged_attention, write_kv
from step_layouts import step_layout

BS = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def _step(seqs: list[tuple[int, int, int]], num_tokens: int, grids: tuple[tuple[int, int], ...], cols: int, rows: int):
    """A padded step for `seqs` of (slot, context_len, query_len), tokens in list order; unused slots are
    padding. Returns the layout, positions and block tables (distinct blocks)."""
    gen = torch.Generator().manual_seed(len(seqs))
    free = (torch.randperm(rows - 1, generator=gen) + 1).tolist()  # row 0 is the null block
    return step_layout(seqs, num_tokens, grids, BS, cols, free)


def _oracle(q, keys, values, seqs, tables, positions, window, span_ids=None):
    """Each sequence on its own: its keys 0..context-1 read through its table, causal (+ window) SDPA;
    with `span_ids`, queries also see the later keys of their span (this step's keys only)."""
    out = torch.zeros_like(q)
    row = 0
    for i, context, query in seqs:
        slots = torch.tensor([int(tables[i, p // BS]) * BS + p % BS for p in range(context)])
        k = keys.view(-1, KV_HEADS, DIM)[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = values.view(-1, KV_HEADS, DIM)[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)
        qp = positions[row : row + query]
        kp = torch.arange(context)
        allowed = kp[None, :] <= qp[:, None]
        if span_ids is not None:
            span_q = span_ids[row : row + query]
            span_k = torch.cat([torch.full((context - query,), -1), span_q])
            allowed |= (span_q[:, None] == span_k[None, :]) & (span_q[:, None] >= 0)
        if window is not None:
            allowed &= qp[:, None] - kp[None, :] < window
        attn = F.scaled_dot_product_attention(
            q[row : row + query].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=1.0
        )
        out[row : row + query] = attn.transpose(0, 1)
        row += query
    return out


# (slot, context, query) per sequence, in token order: decodes in the single-query grid (slots 0-3), a
# prefill chunk and a chunk continuing a prompt in the other (slots 4-7), a one-token prompt.
MIXED = [(4, 19, 7), (0, 9, 1), (1, 30, 1), (5, 12, 5), (2, 1, 1)]
GRIDS = ((4, 1), (4, 8))


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("k_as_v", [False, True])
def test_mixed_padded_step_equals_per_sequence_attention(window: int | None, k_as_v: bool) -> None:
    rows, cols = 64, 8
    num_tokens = 32  # padded: 15 real tokens, 5 real sequences
    layout, positions, tables = _step(MIXED, num_tokens, GRIDS, cols, rows)
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(rows, BS, KV_HEADS, DIM, generator=gen)
    values[0] = 0  # the null block
    keys = None if k_as_v else torch.randn(rows, BS, KV_HEADS, DIM, generator=gen)
    if keys is not None:
        keys[0] = 0
    q = torch.randn(num_tokens, HEADS, DIM, generator=gen)
    scale = torch.randn(DIM, generator=gen)
    rotary = RotaryEmbedding(RopeConfig(theta=10_000.0, partial_rotary_factor=0.5), DIM)  # proportional RoPE
    inv_freq = rotary.inv_freq if k_as_v else None
    meta = group_metadata(layout, positions, tables, block_size=BS, sliding_window=window, key_inv_freq=inv_freq)
    out = paged_attention(q, keys, values, meta, scale if k_as_v else None)
    assert out.shape == q.shape and torch.isfinite(out).all()
    if k_as_v:  # the oracle reads the keys the op derives, slot by slot: RoPE(values * scale) at each slot's position
        slot_pos = torch.zeros(rows * BS, dtype=torch.long)
        for i, context, _ in MIXED:
            for p in range(context):
                slot_pos[int(tables[i, p // BS]) * BS + p % BS] = p
        cos, sin = rotary(slot_pos[None], torch.float32)
        keys = apply_rope((values.view(-1, KV_HEADS, DIM) * scale)[None], cos, sin)[0].view_as(values)
    expected = _oracle(q, keys, values, MIXED, tables, positions, window)
    real = layout.token_mask.bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)


# Chunks with several spans: one touching the chunk's start, one its end, one longer than the window.
SPAN_SEQS = [(4, 19, 12), (0, 9, 1), (5, 14, 14), (1, 30, 1)]
SPAN_GRIDS = ((4, 1), (4, 16))


def _span_ids(num_tokens: int) -> torch.Tensor:
    spans = torch.full((num_tokens,), -1)
    spans[0:3] = 7  # slot 4's chunk (rows 0-11, positions 7-18): a span at its start
    spans[5:7] = 2
    spans[9:12] = 3  # ... and one at its end
    spans[13:22] = 7  # slot 5's chunk (rows 13-26): id 7 again, a span of 9 > the window
    spans[24:27] = 4
    spans[12] = 5  # a decode token in a span of its own
    return spans


@pytest.mark.parametrize("window", [None, 6])
def test_spans_see_their_later_keys(window: int | None) -> None:
    rows, cols, num_tokens = 64, 8, 32
    layout, positions, tables = _step(SPAN_SEQS, num_tokens, SPAN_GRIDS, cols, rows)
    span_ids = _span_ids(num_tokens)
    layout = dataclasses.replace(layout, span_ids=span_ids)
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, rows, BS, KV_HEADS, DIM, generator=gen)
    keys[0] = values[0] = 0
    q = torch.randn(num_tokens, HEADS, DIM, generator=gen)
    meta = group_metadata(layout, positions, tables, block_size=BS, sliding_window=window, spans=True)
    out = paged_attention(q, keys, values, meta)
    assert torch.isfinite(out).all()
    expected = _oracle(q, keys, values, SPAN_SEQS, tables, positions, window, span_ids)
    real = layout.token_mask.bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    causal = _oracle(q, keys, values, SPAN_SEQS, tables, positions, window)
    assert not torch.allclose(out[real], causal[real])  # the spans did change something
    # Without `spans` the same layout attends causally.
    causal_meta = group_metadata(layout, positions, tables, block_size=BS, sliding_window=window)
    plain = paged_attention(q, keys, values, causal_meta)
    torch.testing.assert_close(plain[real], causal[real], atol=1e-5, rtol=1e-5)


def test_writes_go_to_table_slots_and_padding_writes_zeros_to_the_null_block() -> None:
    rows, cols = 32, 8
    layout, positions, tables = _step(MIXED, 32, GRIDS, cols, rows)
    meta = group_metadata(layout, positions, tables, block_size=BS, sliding_window=None)
    cache = torch.zeros(rows, BS, KV_HEADS, DIM)
    new = torch.randn(32, KV_HEADS, DIM) + 5  # nonzero everywhere, padding included
    write_kv(cache, meta.slot_mapping, new, layout.token_mask)
    assert torch.all(cache[0] == 0)
    for t in range(32):
        if layout.token_mask[t]:
            s, p = int(layout.token_seq[t]), int(positions[t])
            torch.testing.assert_close(cache[int(tables[s, p // BS]), p % BS], new[t])


def test_op_has_no_data_dependent_shapes_and_compiles_fullgraph() -> None:
    rows, cols = 32, 8
    layout, positions, tables = _step(MIXED, 16, GRIDS, cols, rows)
    values = torch.randn(rows, BS, KV_HEADS, DIM)
    keys = torch.randn(rows, BS, KV_HEADS, DIM)
    q = torch.randn(16, HEADS, DIM)

    def step(q, keys, values, layout, positions, tables):
        meta = group_metadata(layout, positions, tables, block_size=BS, sliding_window=6)
        return paged_attention(q, keys, values, meta)

    def on_meta(t: torch.Tensor) -> torch.Tensor:
        return t.to("meta")

    fields = ("query_start", "query_len", "context_len", "token_seq", "token_mask")
    meta_layout = SequenceLayout(*(on_meta(getattr(layout, f)) for f in fields), layout.grids)
    assert step(on_meta(q), on_meta(keys), on_meta(values), meta_layout, on_meta(positions), on_meta(tables)).shape == q.shape
    eager = step(q, keys, values, layout, positions, tables)
    compiled = torch.compile(step, fullgraph=True)(q, keys, values, layout, positions, tables)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
