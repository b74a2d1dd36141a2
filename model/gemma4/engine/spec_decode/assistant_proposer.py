"""Draft tokens with Gemma 4's assistant drafter, reading the target's paged KV cache in place.

Each round drafts k tokens per request, batched over the requests: one query per request per draft
step, all steps at the request's position (that of its last seen token), its keys read through its
block tables by the runner's `ops.paged_attention`, with no copy of the cache. The drafter's layers
name the target's producer layers as their `kv_source`, so each reads that layer's pool.

The op masks keys by the step's context length: a one-query sequence of context `pos` queries at
position `pos - 1` and sees keys `0 .. pos - 1` (full layers), and with a window of `n` the last `n`
of them. The drafter's sliding layers see `sliding_window + 1` keys (`assistant_config.sliding_keys`),
so the plan of a sliding group is built with that window; the query's RoPE is at `pos`, as
transformers' candidate generator places it. Keys at or past `pos` (the last token's own, not written
yet, and stale ones) are never read.

Sliding windows: the drafter reads keys from `pos - W - 1`, two before the first key the target's
next query reads (`pos - W + 1`): a KV manager that releases sliding blocks by the target's window
alone may have released the block holding them. With `GEMMA4_DEBUG_CHECKS=1` the proposer checks every
block it reads is held.

TP=1 only: the drafter is not sharded (the target's cache of a TP rank holds only its KV heads).
"""

from __future__ import annotations

from typing import Any

import torch

from gemma4.assistant import Gemma4Assistant, draft_greedy
from gemma4.assistant_config import sliding_keys
from gemma4.backends import Ops
from gemma4.config import LayerSpec
from gemma4.engine.paged_attention import PagedKVCache, debug_checks_enabled
from gemma4.kv_layout import NULL_BLOCK
from gemma4.modeling import Gemma4ForCausalLM, NewKV
from gemma4.ops.paged_attention import SequenceLayout


class _DraftAttention:
    """`AttentionBackend` of one draft round: each drafter layer reads its target producer's pool through
    the plan of that pool's group (built once per round with the drafter's window)."""

    def __init__(self, cache: PagedKVCache, ops: Ops, scales: dict[int, torch.Tensor], plans: dict[int, Any]) -> None:
        self.cache = cache
        self.ops = ops
        self.scales = scales
        self.plans = plans

    def __call__(self, layer: LayerSpec, q: torch.Tensor, kv: NewKV | None) -> torch.Tensor:
        if kv is not None:
            raise ValueError(f"drafter layer {layer.index} computes keys/values; it must read the target's")
        gi, li = self.cache.location[layer.kv_source]
        keys = self.cache.keys[gi]
        out = self.ops.paged_attention(
            q[0],
            None if keys is None else keys[li],
            self.cache.values[gi][li],
            self.plans[layer.kv_source],
            None if keys is not None else self.scales[layer.kv_source],
        )
        return out[None]


class AssistantProposer:
    """Greedy drafts of `drafter` over `target`'s paged cache (`key_scales`, `key_inv_freq`: as the runner
    passes `PagedAttention`, the K-as-V layers' k_norm weights and their RoPE frequencies)."""

    def __init__(
        self,
        drafter: Gemma4Assistant,
        target: Gemma4ForCausalLM,
        cache: PagedKVCache,
        ops: Ops,
        key_scales: dict[int, torch.Tensor],
        key_inv_freq: torch.Tensor,
    ) -> None:
        if target.layout.tensor_parallel != 1:
            raise ValueError("the assistant drafter runs with tensor_parallel_size 1 only")
        for spec in drafter.layers:
            if spec.kv_source not in cache.location:
                raise ValueError(f"drafter layer {spec.index} reads target layer {spec.kv_source}, which has no cache")
        drafter.use_ops(ops)
        self.drafter = drafter
        self.embed = target.model.embed_tokens
        self.cache = cache
        self.ops = ops
        self.key_scales = key_scales
        self.key_inv_freq = key_inv_freq
        # The sources the drafter reads and the window it reads each with (None: all keys).
        self.windows = {spec.kv_source: sliding_keys(spec) for spec in drafter.layers}
        self.device = key_inv_freq.device

    def propose(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: list[int],
        block_tables: list[list[list[int]]],
        num_tokens: int,
    ) -> torch.Tensor:
        """Drafts `[R, num_tokens]` (int64) for R requests; see `draft`."""
        return self.draft(hidden, tokens, positions, block_tables, num_tokens)[0]

    def draft(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: list[int],
        block_tables: list[list[list[int]]],
        num_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts `[R, num_tokens]` and their fp32 logits `[R, num_tokens, vocab]`.

        Request r: `tokens[r]` is its last token (its KV not in the cache), at position `positions[r]`
        (= the tokens whose KV is cached), `hidden[r] [H_target]` the target's final-normed hidden state
        at the row that produced it, `block_tables[r][g]` its table for cache group g.
        """
        count = len(positions)
        if tokens.shape != (count,) or hidden.shape[0] != count or len(block_tables) != count:
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, hidden {tuple(hidden.shape)} and {len(block_tables)} block tables "
                f"do not match {count} positions"
            )
        if count and min(positions) < 1:
            raise ValueError(f"positions must be >= 1 (a request has cached keys to read), got {positions}")
        plans = self._plans(positions, block_tables)
        attention = _DraftAttention(self.cache, self.ops, self.key_scales, plans)
        where = torch.tensor([positions], dtype=torch.long, device=self.device)  # [1, R]: one flat row
        return draft_greedy(self.drafter, self.embed, tokens.to(self.device), hidden.to(self.device), where,
                            attention, num_tokens)

    def _plans(self, positions: list[int], block_tables: list[list[list[int]]]) -> dict[int, Any]:
        """Per source layer read, its group's plan for one query per request at context `positions[r]`."""
        count = len(positions)
        arange = torch.arange(count, dtype=torch.long, device=self.device)
        context = torch.tensor(positions, dtype=torch.long, device=self.device)
        layout = SequenceLayout(
            query_start=arange,
            query_len=torch.ones_like(arange),
            context_len=context,
            token_seq=arange,
            token_mask=torch.ones_like(arange),
            grids=((count, 1),),
        )
        query_positions = context - 1  # what the op places the queries at: never written (no NewKV)
        plans: dict[tuple[int, int | None], Any] = {}
        out: dict[int, Any] = {}
        for source, window in self.windows.items():
            gi, _ = self.cache.location[source]
            if (gi, window) not in plans:
                tables = [tables_r[gi] for tables_r in block_tables]
                if debug_checks_enabled():
                    self._check_tables(gi, window, positions, tables)
                cols = max(1, max(len(t) for t in tables))
                table = torch.tensor(
                    [t + [NULL_BLOCK] * (cols - len(t)) for t in tables], dtype=torch.long, device=self.device
                )
                plans[gi, window] = self.ops.attention_plan(
                    layout,
                    query_positions,
                    table,
                    block_size=self.cache.block_size,
                    sliding_window=window,
                    key_inv_freq=self.key_inv_freq if self.cache.keys[gi] is None else None,
                )
            out[source] = plans[gi, window]
        return out

    def _check_tables(self, gi: int, window: int | None, positions: list[int], tables: list[list[int]]) -> None:
        """Raise unless every block holding a key a draft reads is held (not the null block)."""
        bs = self.cache.block_size
        name = self.cache.groups[gi].name
        for r, (pos, table) in enumerate(zip(positions, tables)):
            first = 0 if window is None else max(0, pos - window)
            needed = range(first // bs, -(-pos // bs))
            if len(table) < needed.stop:
                raise RuntimeError(f"request {r}: the {name} block table covers {len(table)} blocks; keys "
                                   f"0..{pos - 1} need {needed.stop}")
            missing = [i for i in needed if table[i] == NULL_BLOCK]
            if missing:
                raise RuntimeError(
                    f"request {r}: {name} block table entries {missing} are the null block, inside the drafter's "
                    f"window (keys {first}..{pos - 1})"
                )
