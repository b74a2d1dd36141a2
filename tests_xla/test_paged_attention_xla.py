"""The torch paged-attention op (plan, KV write and attention) on torch_xla's CPU device equals eager.

The op's own correctness (against per-sequence attention) is tests/test_paged_attention_op.py; here the
same padded mixed steps run on XLA, where every shape must be static for the graph to lower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from gemma4.config import RopeConfig
from gemma4.modeling import RotaryEmbedding
from gemma4.ops.paged_attention import SequenceLayout, group_metadata, paged_attention, slot_mapping, write_kv
from step_layouts import step_layout

BS, ROWS, COLS = 4, 64, 8
HEADS, KV_HEADS, DIM = 4, 2, 8
NUM_TOKENS = 32  # padded: 20 real tokens
# (slot, context, query): decodes in the single-query grid (slots 0-3), prefill chunks in the other.
SEQS = [(4, 19, 12), (0, 9, 1), (1, 30, 1), (5, 12, 5), (2, 1, 1)]
GRIDS = ((4, 1), (4, 16))


def _on(device: torch.device, layout: SequenceLayout) -> SequenceLayout:
    moved = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout) if f.name != "grids"}
    return dataclasses.replace(layout, **{k: v.to(device) for k, v in moved.items() if v is not None})


def _step(device: torch.device, window: int | None, k_as_v: bool, spans: bool) -> torch.Tensor:
    """One layer's step on `device`: write the new tokens' KV, plan, attend; the real rows' outputs."""
    free = (torch.randperm(ROWS - 1, generator=torch.Generator().manual_seed(0)) + 1).tolist()
    layout, positions, tables = step_layout(SEQS, NUM_TOKENS, GRIDS, BS, COLS, free)
    if spans:  # a bidirectional span inside slot 4's chunk and one over slot 5's
        span_ids = torch.full((NUM_TOKENS,), -1)
        span_ids[2:6], span_ids[14:17] = 1, 2
        layout = dataclasses.replace(layout, span_ids=span_ids)
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(ROWS, BS, KV_HEADS, DIM, generator=gen)
    keys = None if k_as_v else torch.randn(ROWS, BS, KV_HEADS, DIM, generator=gen)
    for cache in (values, keys):
        if cache is not None:
            cache[0] = 0  # the null block
    new_values, new_keys = (torch.randn(NUM_TOKENS, KV_HEADS, DIM, generator=gen) for _ in range(2))
    q = torch.randn(NUM_TOKENS, HEADS, DIM, generator=gen)
    scale = torch.randn(DIM, generator=gen) if k_as_v else None
    rotary = RotaryEmbedding(RopeConfig(theta=10_000.0, partial_rotary_factor=0.5), DIM)
    real = layout.token_mask.bool()

    def to(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    layout, positions, tables = _on(device, layout), to(positions), to(tables)
    q, values, keys, new_values, new_keys, scale = map(to, (q, values, keys, new_values, new_keys, scale))
    slots = slot_mapping(layout, positions, tables, BS)
    write_kv(values, slots, new_values, layout.token_mask)
    if keys is not None:
        write_kv(keys, slots, new_keys, layout.token_mask)
    meta = group_metadata(
        layout, positions, tables, block_size=BS, sliding_window=window,
        key_inv_freq=to(rotary.inv_freq) if k_as_v else None, spans=spans,
    )
    return paged_attention(q, keys, values, meta, scale).cpu()[real]


@pytest.mark.parametrize(
    ("window", "k_as_v", "spans"), [(None, False, False), (6, False, True), (None, True, False)],
    ids=["global", "sliding with spans", "global K-as-V"],
)
def test_paged_attention_on_xla_equals_eager(
    window: int | None, k_as_v: bool, spans: bool, xla: torch.device, fallbacks: Callable[[], list[str]]
) -> None:
    eager = _step(torch.device("cpu"), window, k_as_v, spans)
    assert eager.shape == (20, HEADS, DIM) and eager.abs().max() > 0.1
    torch.testing.assert_close(_step(xla, window, k_as_v, spans), eager, atol=1e-5, rtol=1e-5)
    assert fallbacks() == []
