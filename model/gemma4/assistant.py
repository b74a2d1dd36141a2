"""Gemma 4's assistant drafter (transformers' `Gemma4AssistantForCausalLM`) in PyTorch.

A small `gemma4_text` stack of our `DecoderLayer`s whose layers all read the TARGET's keys/values
(their `LayerSpec.kv_source` is the target's producer layer, `Gemma4AssistantConfig.layers_for`), so
the attention backends of the target serve it unchanged: `SharedKVAttention` over K/V given densely
(the reference path and the parity tests), the engine's `PagedAttention` over the target's paged
cache (`engine.spec_decode.assistant_proposer`).

One draft step: `concat(target's scaled embedding of the last token, a hidden state [H_target])` ->
`pre_projection` -> layers (every query sees all valid target keys on full layers, the last
`sliding_window + 1` on sliding ones) -> final norm -> `post_projection` (the next step's hidden state)
and logits from the drafter's own head (tied to its `embed_tokens` unless the config unties it),
or through the masked embedder. No final softcap:
transformers applies none to the drafter. All steps of a round run at one position (the last
seen token's), and drafts are the logits' argmax (`draft_greedy`).

Parameter and buffer names equal the checkpoint's tensor names, so loading is a plain name match.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.assistant_config import Gemma4AssistantConfig, sliding_keys
from gemma4.backends import Ops
from gemma4.config import FULL, SLIDING, Gemma4TextConfig, LayerSpec
from gemma4.modeling import AttentionBackend, DecoderLayer, NewKV, RotaryEmbedding, route_ops
from gemma4.norm import RMSNorm
from gemma4.parallel.comm import SINGLE
from gemma4.parallel.layout import ParallelLayout


class MaskedEmbedder(nn.Module):
    """Scores only the tokens of the `top_k` best of `num_centroids` vocabulary clusters.

    `token_ordering` lists the vocabulary cluster by cluster (`[centroids, tokens_per_centroid]` when
    viewed); the others get the row's lowest selected logit minus one. transformers takes that floor
    over the whole batch; per row it is the same for a single row and keeps rows independent.
    """

    def __init__(self, config: Gemma4AssistantConfig) -> None:
        super().__init__()
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(config.text.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(config.text.vocab_size, dtype=torch.long))

    def forward(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T, vocab]` for `hidden [B, T, H]` against the head rows `head_weight [vocab, H]`."""
        b, t, h = hidden.shape
        clusters = torch.topk(self.centroids(hidden), k=self.top_k, dim=-1).indices  # [B, T, top_k]
        selected = self.token_ordering.view(self.num_centroids, -1)[clusters].reshape(b, t, -1)  # [B, T, K]
        rows = head_weight[selected.reshape(-1)].view(b, t, selected.shape[-1], h)
        logits = (hidden.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
        floor = logits.amin(dim=-1, keepdim=True) - 1.0
        return floor.expand(b, t, head_weight.shape[0]).scatter(-1, selected, logits)


class AssistantTextModel(nn.Module):
    """The drafter's `gemma4_text` stack: no K/V projections, no PLE; `embed_tokens` is only its (tied)
    head: inputs come from the target's embedding and hidden state."""

    def __init__(self, text: Gemma4TextConfig, layers: tuple[LayerSpec, ...]) -> None:
        super().__init__()
        self.specs = layers
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(text, spec, ParallelLayout(), SINGLE, None) for spec in layers)
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.rotary = nn.ModuleDict(
            {
                SLIDING: RotaryEmbedding(text.sliding_rope, text.head_dim),
                FULL: RotaryEmbedding(text.full_rope, text.global_head_dim),
            }
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """Final-normed hidden states of the projected inputs `x [B, T, H]`."""
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        for spec, layer in zip(self.specs, self.layers):
            x = layer(x, ropes[spec.attention_type], attention, None)
        return self.norm(x)


class Gemma4Assistant(nn.Module):
    """The drafter for one target: its layers read the target's producer layers' K/V (TP=1: unsharded)."""

    def __init__(self, config: Gemma4AssistantConfig, target: Gemma4TextConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = config.layers_for(target)
        h, backbone = config.text.hidden_size, config.backbone_hidden_size
        self.model = AssistantTextModel(config.text, self.layers)
        self.pre_projection = nn.Linear(2 * backbone, h, bias=False)
        self.post_projection = nn.Linear(h, backbone, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(h, config.text.vocab_size, bias=False)
        self.masked_embedding = MaskedEmbedder(config) if config.use_ordered_embeddings else None

    def use_ops(self, ops: Ops) -> None:
        """Run the hot path through `ops` (as `Gemma4ForCausalLM.use_ops`)."""
        route_ops(self.modules(), ops)

    def reset_buffers(self) -> None:
        """Recompute the RoPE frequencies after materialising from the meta device."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers()

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits `[B, T, vocab]` and the projected states `[B, T, H_target]` (the next step's hidden
        input) for `inputs_embeds [B, T, 2 * H_target]` at `positions [B, T]`."""
        hidden = self.model(self.pre_projection(inputs_embeds), positions, attention)
        projected = self.post_projection(hidden)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        if self.masked_embedding is None:
            logits = F.linear(hidden, head)
        else:
            logits = self.masked_embedding(hidden, head)
        return logits.float(), projected


class SharedKVAttention:
    """`AttentionBackend` for a drafter over target K/V held densely.

    `kv[layer] = (keys, values)`, each `[B, L, kv_heads, D]`, per target producer layer: keys normed and
    rotated, values normed (as the target attended them). Row b's keys `0 .. lengths[b] - 1` are valid
    (the rest is never read); all of row b's queries see all of them on full layers and the last
    `sliding_window + 1` on sliding ones. That is transformers' mask for the one query per row its
    candidate generator runs (its flipped window shifts with the query index for more).
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], lengths: torch.Tensor) -> None:
        self.kv = kv
        self.lengths = lengths

    def __call__(self, layer: LayerSpec, q: torch.Tensor, kv: NewKV | None) -> torch.Tensor:
        if kv is not None:
            raise ValueError(f"layer {layer.index} computes its own keys/values; a drafter's layers read the target's")
        k, v = self.kv[layer.kv_source]
        key = torch.arange(k.shape[1], device=k.device)[None]
        length = self.lengths[:, None]
        mask = key < length
        window = sliding_keys(layer)
        if window is not None:
            mask &= key >= length - window
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask[:, None, None, :], scale=1.0, enable_gqa=True,
        )
        return out.transpose(1, 2)


def draft_greedy(
    drafter: Gemma4Assistant,
    embed: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    attention: AttentionBackend,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_tokens` greedy draft steps for R requests: drafts `[R, num_tokens]` int64 and their fp32
    logits `[R, num_tokens, vocab]`.

    `tokens [R]` are the last seen tokens, `hidden [R, H_target]` the target's final-normed hidden
    states at the rows that produced them, `embed` the target's (scaled) input embedding. `positions`
    holds each request's position (that of its last seen token), shaped as `attention` lays out the
    requests' queries: `[R, 1]` (one row each) or `[1, R]` (one flat row, as the paged backend reads).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    drafts, all_logits = [], []
    for _ in range(num_tokens):
        x = torch.cat([embed(tokens), hidden.to(drafter.pre_projection.weight.dtype)], dim=-1)
        logits, projected = drafter(x.view(*positions.shape, -1), positions, attention)
        logits = logits.reshape(tokens.shape[0], -1)
        tokens = logits.argmax(dim=-1)
        hidden = projected.reshape(tokens.shape[0], -1)
        drafts.append(tokens)
        all_logits.append(logits)
    return torch.stack(drafts, dim=1), torch.stack(all_logits, dim=1)

