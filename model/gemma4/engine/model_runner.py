"""Runs one scheduled step through the model over the paged KV cache.

The step's tokens are flattened into one row; logits are computed only for the last token of each
request whose computed tokens reach its end (a finished prefill or a decode), since only those
sample. The attention op is chosen here, so a kernel or CUDA-graph runner replaces it in one place.
"""

from __future__ import annotations

import torch

from gemma4.config import FULL
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.paged_attention import PagedAttention, PagedKVCache, SequenceSlice
from gemma4.engine.request import Request
from gemma4.engine.scheduler import ScheduledBatch
from gemma4.kv_layout import CacheGroup
from gemma4.modeling import Gemma4ForCausalLM, apply_rope


class ModelRunner:
    def __init__(
        self,
        model: Gemma4ForCausalLM,
        groups: tuple[CacheGroup, ...],
        num_blocks: dict[str, int],
        block_size: int,
    ) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = PagedKVCache(groups, num_blocks, block_size, self.dtype, self.device)
        layers = model.model.layers
        self._k_norm = {
            spec.index: layers[spec.index].self_attn.k_norm.weight
            for spec in model.text_config.layers
            if spec.k_eq_v and not spec.shares_kv
        }

    def _key_from_value(self, layer: int, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """K-as-V layers: keys are the stored (normed) values times k_norm's weight, rotated."""
        cos, sin = self.model.model.rotary[FULL](positions[None], values.dtype)
        return apply_rope((values * self._k_norm[layer])[None], cos, sin)[0]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, kv: KVCacheManager) -> tuple[torch.Tensor, list[Request]]:
        """Run the step; returns fp32 logits `[n, vocab]` for the requests that sample, in order."""
        token_ids: list[int] = []
        positions: list[int] = []
        sequences: list[SequenceSlice] = []
        sample_rows: list[int] = []
        sampling: list[Request] = []
        for request, n in zip(batch.requests, batch.num_tokens):
            start = request.num_computed_tokens
            sequences.append(SequenceSlice(len(token_ids), n, start + n, kv.block_tables(request.request_id)))
            token_ids.extend(request.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if start + n == request.num_tokens:
                sample_rows.append(len(token_ids) - 1)
                sampling.append(request)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        attention = PagedAttention(self.cache, sequences, pos[0], self._key_from_value)
        hidden = self.model.hidden_states(ids, pos, attention)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[0, rows]).float()
        return logits, sampling
