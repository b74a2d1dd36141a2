"""Attention over the paged KV cache: the cache tensors, the model's attention backend for a step, checks.

A step's tokens (prefill chunks and decode tokens of many sequences) are flattened into one row
`[1, T]`. Each producer layer writes its new keys/values into its group's blocks, then every layer
attends each sequence's queries to the keys that sequence may see, read back through its block
table (`gemma4.ops.paged_attention`, one call per layer). KV-sharing layers only read (their
producer wrote earlier in the same step). K-as-V layers store the normed values once; their keys are
re-derived on read (values times k_norm's weight, rotated at the key positions), exactly the
reference's K = RoPE(RMS(raw) * w).

Entries a sequence does not hold point at the pool's zero row `NULL_BLOCK`, which no valid query
attends to; padded tokens of a bucketed step write zeros there. With
`GEMMA4_DEBUG_CHECKS=1` (on in the tests) every step's block tables are checked before use, so a
bookkeeping bug fails loudly instead of attending to another sequence's KV.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gemma4.backends import Ops
from gemma4.config import LayerSpec
from gemma4.engine.step_inputs import StepTensors
from gemma4.kv_layout import NULL_BLOCK, CacheGroup, pool_rows
from gemma4.modeling import Gemma4ForCausalLM, NewKV

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


def key_scales(target: Gemma4ForCausalLM) -> dict[int, torch.Tensor]:
    """Each K-as-V producer layer's k_norm weight: what `PagedAttention` re-derives those layers' keys with."""
    layers = target.model.layers
    return {
        spec.index: layers[spec.index].self_attn.k_norm.weight
        for spec in target.text_config.layers
        if spec.k_eq_v and not spec.shares_kv
    }


class PagedAttention:
    """`AttentionBackend` over `PagedKVCache` for one step: per layer, one fused cache write (norms, RoPE)
    and one `paged_attention` call, both from the runner's `Ops` (Triton kernels or torch reference ops).

    Each group's attention plan is built from the step tensors when the step starts and shared by the
    group's layers; producer layers write their new keys/values first, KV-sharing layers only read.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        step: StepTensors,
        ops: Ops,
        key_scales: dict[int, torch.Tensor],
        key_inv_freq: torch.Tensor,
        *,
        spans: bool = False,
    ) -> None:
        """`key_scales`: each K-as-V producer layer's k_norm weight; `key_inv_freq`: the RoPE frequencies of
        those (global) layers, with which their keys are rotated on read. `spans`: the sliding layers
        attend through the step's bidirectional spans (`SequenceLayout.span_ids`; the vision models)."""
        self.cache = cache
        self.ops = ops
        self.key_scales = key_scales
        self.token_mask = step.layout.token_mask
        self.metadata = [
            ops.attention_plan(
                step.layout,
                step.positions,
                table,
                block_size=cache.block_size,
                sliding_window=group.sliding_window,
                key_inv_freq=key_inv_freq if keys is None else None,
                spans=spans and group.sliding_window is not None,
            )
            for group, table, keys in zip(cache.groups, step.block_tables, cache.keys)
        ]

    def __call__(self, layer: LayerSpec, q: torch.Tensor, kv: NewKV | None) -> torch.Tensor:
        gi, li = self.cache.location[layer.kv_source]
        meta = self.metadata[gi]
        keys = self.cache.keys[gi]
        if kv is not None:
            self.ops.write_kv_normed(
                kv.k[0], None if kv.v is None else kv.v[0], kv.k_weight, kv.cos[0], kv.sin[0], kv.eps,
                None if keys is None else keys[li], self.cache.values[gi][li], meta.slot_mapping, self.token_mask,
            )
        out = self.ops.paged_attention(
            q[0],
            None if keys is None else keys[li],
            self.cache.values[gi][li],
            meta,
            None if keys is not None else self.key_scales[layer.kv_source],
        )
        return out[None]
