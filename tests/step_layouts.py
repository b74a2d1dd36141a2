"""Padded attention steps for the paged-attention tests (reference op and kernel)."""

from __future__ import annotations

import math

import torch

from gemma4.ops.paged_attention import SequenceLayout


def step_layout(
    seqs: list[tuple[int, int, int]],
    num_tokens: int,
    grids: tuple[tuple[int, int], ...],
    block_size: int,
    cols: int,
    free: list[int],
    gap: int = 0,
) -> tuple[SequenceLayout, torch.Tensor, torch.Tensor]:
    """The layout, positions and block tables of a step of `seqs` (slot, context_len, query_len): their
    tokens in list order from row 0, `gap` padded tokens after each (the rest padding too; unlisted slots
    are padded sequences); each sequence's blocks are taken from the end of `free`."""
    num_seqs = sum(n for n, _ in grids)
    start, qlen, ctx = (torch.zeros(num_seqs, dtype=torch.long) for _ in range(3))
    token_seq, mask, positions = (torch.zeros(num_tokens, dtype=torch.long) for _ in range(3))
    tables = torch.zeros(num_seqs, cols, dtype=torch.long)
    row = 0
    for slot, context, query in seqs:
        start[slot], qlen[slot], ctx[slot] = row, query, context
        token_seq[row : row + query] = slot
        mask[row : row + query] = 1
        positions[row : row + query] = torch.arange(context - query, context)
        for b in range(math.ceil(context / block_size)):
            tables[slot, b] = free.pop()
        row += query + gap
    return SequenceLayout(start, qlen, ctx, token_seq, mask, grids), positions, tables
