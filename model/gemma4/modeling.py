"""The Gemma 4 text decoder in PyTorch (all four variants, driven by `Gemma4TextConfig.layers`).

Module and parameter names equal the checkpoint's tensor names below the text prefix, so loading is
a rename of the prefix only. The model knows nothing of caching or serving: attention over "the
keys and values this layer may see" is delegated to an `AttentionBackend` (a dense causal one here;
the engine supplies a paged one), which also serves the KV-sharing layers of E2B/E4B. The arithmetic
of the hot path (norms, QK-norm + RoPE, the cache write, the MoE, PLE, the softcap) goes through an
`Ops` set (`gemma4.backends`): the torch reference ops by default, the Triton kernels when the
engine selects them (`use_ops`).

A model built with a `ParallelLayout` and its `Collectives` is one rank's shard of a multi-device
replica (`gemma4.parallel`): local shapes, the checkpoint's names. Attention heads, KV heads, MLP
width and the vocabulary are split over every rank (q/k/v and gate/up column-parallel, o and down
row-parallel, embeddings and LM head vocabulary-parallel); the MoE experts over EP groups, each
expert's width inside its group. Tokens are replicated on every rank, so norms, the router and PLE
projections run replicated; each partial sum is all-reduced before the sandwich norm that follows
it (the dense MLP's and the experts' in one all-reduce), and the logits are all-gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.backends import Ops, reference_ops
from gemma4.checkpoint import CheckpointError, checkpoint_name, index_checkpoint, read_tensors
from gemma4.config import FULL, SLIDING, Gemma4Config, Gemma4TextConfig, LayerSpec, RopeConfig
from gemma4.media.inputs import MediaFeatures
from gemma4.memory import check_layout
from gemma4.norm import RMSNorm
from gemma4.ops.rope import rope_at
from gemma4.parallel.comm import SINGLE, Collectives
from gemma4.parallel.layout import ParallelLayout
from gemma4.parallel.placement import ExpertPlacement, balanced_placement
from gemma4.parallel.sharding import EXPERT_TENSORS, Shard, expert_shard
from gemma4.towers import build_towers, encode_item
from gemma4.vision import VisionEncoder

# The dtypes a model's weights may take; the embedding scale is rounded to each once, at construction.
WEIGHT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def rounded_scale(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, as the reference does for the embedding scale (bf16: sqrt(5376) -> 73.5)."""
    return float(torch.tensor(value, dtype=torch.float32, device="cpu").to(dtype))


class RotaryEmbedding(nn.Module):
    """NeoX (half-split) RoPE of one layer type; proportional RoPE leaves the tail pairs unrotated."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        pairs = self.rope.rotated_pairs(self.head_dim)
        exponents = torch.arange(0, 2 * pairs, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.rope.theta**exponents)
        identity = torch.zeros(self.head_dim // 2 - pairs, dtype=torch.float32, device=device)
        return torch.cat([inv_freq, identity]) / self.rope.factor

    def reset_buffers(self) -> None:
        """Recompute `inv_freq` after the module was materialised from the meta device."""
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[B, T, head_dim]` for integer `positions [B, T]`."""
        cos, sin = rope_at(positions, self.inv_freq)
        return cos.to(dtype), sin.to(dtype)


@dataclass(frozen=True)
class NewKV:
    """A producer layer's new keys and values before their norms: `k [B, T, kv_heads, D]` is the raw key
    projection, `v` the raw value projection (None on K-as-V layers: values are the normed raw keys).
    Keys become `RoPE(RMS(k) * k_weight)` at `cos`/`sin [B, T, D]`, values `RMS(v)` (weightless);
    a cache backend fuses that into its write."""

    k: torch.Tensor
    v: torch.Tensor | None
    k_weight: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    eps: float

    def normed(self, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) `[B, T, kv_heads, D]`, normed and keys rotated."""
        b, t, heads, d = self.k.shape
        keys = ops.norm_rope(self.k.reshape(b * t, heads, d), self.k_weight, _rows(self.cos), _rows(self.sin), self.eps)
        values = ops.rms_norm(self.k if self.v is None else self.v, None, self.eps)
        return keys.view(b, t, heads, d), values


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`[B, T, D]` -> `[B * T, D]`: the ops take one row per token."""
    return x.reshape(-1, x.shape[-1])


class AttentionBackend(Protocol):
    """Attends queries of one layer to the keys/values that layer may see.

    `q [B, T, heads, D]` is normed and rotated; `kv` holds the layer's new keys/values before their
    norms, or is None for KV-sharing layers, which read those of `layer.kv_source`. Returns
    `[B, T, heads, D]`. Scaling is 1.0: Gemma 4's QK-norm replaces the 1/sqrt(d) factor.
    """

    def __call__(self, layer: LayerSpec, q: torch.Tensor, kv: NewKV | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class SoftTokens:
    """Encoder outputs placed into a forward's embeddings: row `rows[i]` of the flattened `[B * T]` tokens
    (a placeholder position) takes `embeds[i]` (`[M, H]`, the embedder's output, unscaled)."""

    rows: torch.Tensor
    embeds: torch.Tensor


class DenseAttention:
    """Full-sequence attention without a cache: causal on global layers, causal + window on sliding ones.

    `span_ids [B, T]` (-1 outside) are the bidirectional blocks of the vision models: on sliding layers
    a block's tokens also see its later tokens, `(k > q - W) & (k <= q | same block)`; global layers stay
    causal. Keeps each producer layer's keys/values for the KV-sharing layers that read them.
    """

    def __init__(self, positions: torch.Tensor, ops: Ops, span_ids: torch.Tensor | None = None) -> None:
        self.positions = positions
        self.ops = ops
        self.span_ids = span_ids
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[int | None, torch.Tensor] = {}

    def _mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            q = self.positions[:, :, None]
            k = self.positions[:, None, :]
            mask = k <= q
            if window is not None:
                if self.span_ids is not None:
                    same = self.span_ids[:, :, None] == self.span_ids[:, None, :]
                    mask |= same & (self.span_ids[:, :, None] >= 0)
                mask &= q - k < window
            self._masks[window] = mask[:, None]  # [B, 1, T, T], broadcast over heads
        return self._masks[window]

    def __call__(self, layer: LayerSpec, q: torch.Tensor, kv: NewKV | None) -> torch.Tensor:
        if kv is None:
            k, v = self._kv[layer.kv_source]
        else:
            k, v = self._kv[layer.index] = kv.normed(self.ops)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=self._mask(layer.sliding_window),
            scale=1.0,
            enable_gqa=True,
        )
        return out.transpose(1, 2)


class Attention(nn.Module):
    """Gemma 4 self-attention: QK-norm, weightless V-norm, RoPE, optional K-as-V, optional shared KV.

    On a TP rank it holds its heads and KV heads (`ParallelLayout.kv_heads`), and its output is a
    partial sum over the ranks' heads (the layer all-reduces it).
    """

    def __init__(self, config: Gemma4TextConfig, layer: LayerSpec, layout: ParallelLayout) -> None:
        super().__init__()
        self.layer = layer
        hidden, d = config.hidden_size, layer.head_dim
        _, heads = layout.split(config.num_attention_heads)
        _, kv_heads = layout.kv_heads(layer.num_kv_heads)
        self.q_proj = nn.Linear(hidden, heads * d, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        if not layer.shares_kv:
            self.k_proj = nn.Linear(hidden, kv_heads * d, bias=False)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
            # K-as-V layers have no v_proj: values are the raw key projection, weightless-normed.
            self.v_proj = None if layer.k_eq_v else nn.Linear(hidden, kv_heads * d, bias=False)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(heads * d, hidden, bias=False)
        self.ops = reference_ops()

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention: AttentionBackend
    ) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.layer.head_dim
        cos, sin = rope
        eps = self.q_norm.eps
        q = self.ops.norm_rope(self.q_proj(x).view(b * t, -1, d), self.q_norm.weight, _rows(cos), _rows(sin), eps)
        kv = None
        if not self.layer.shares_kv:
            raw_v = None if self.v_proj is None else self.v_proj(x).view(b, t, -1, d)
            kv = NewKV(self.k_proj(x).view(b, t, -1, d), raw_v, self.k_norm.weight, cos, sin, eps)
        out = attention(self.layer, q.view(b, t, -1, d), kv)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    """Gated GELU feed-forward: `down(gelu_tanh(gate(x)) * up(x))` (on a TP rank: its share of the width,
    a partial sum)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.ops = reference_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.gelu_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Top-k expert choice from the post-attention residual; the softmax runs in fp32."""

    def __init__(self, config: Gemma4TextConfig) -> None:
        super().__init__()
        assert config.num_experts is not None and config.top_k_experts is not None
        self.top_k = config.top_k_experts
        self.input_scale = config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.ops = reference_ops()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights (fp32) and indices, both `[N, top_k]`, for tokens `x [N, H]`."""
        scores = self.proj(self.norm(x) * self.scale * self.input_scale)
        return self.ops.moe_route(scores, self.per_expert_scale, self.top_k)


class Experts(nn.Module):
    """The routed experts, stored packed as the checkpoint stores them (gate rows, then up rows).

    A rank holds the `S` physical slots of its EP group (`placement.slots[group]`), each slot its
    share of the expert's width. A token's assignment to logical expert e goes to copy
    `copies[e][row % len(copies[e])]` (device tables `copy_counts [E]`, `copy_slots [E, R + 1]`);
    assignments whose copy lives in another group run on the slot of the same index here with
    weight 0, so shapes stay fixed and (expert outputs being finite) they add exactly zero.
    """

    def __init__(self, config: Gemma4TextConfig, layout: ParallelLayout, placement: ExpertPlacement) -> None:
        super().__init__()
        assert config.num_experts is not None and config.moe_intermediate_size is not None
        e, h = config.num_experts, config.hidden_size
        self.num_experts = e
        self.layout = layout
        slots = layout.expert_slots(e)
        _, width = layout.expert_width(config.moe_intermediate_size)
        self.gate_up_proj = nn.Parameter(torch.empty(slots, 2 * width, h))
        self.down_proj = nn.Parameter(torch.empty(slots, h, width))
        self.register_buffer("copy_counts", torch.ones(e, dtype=torch.long), persistent=False)
        self.register_buffer(
            "copy_slots", torch.zeros(e, layout.redundant_experts + 1, dtype=torch.long), persistent=False
        )
        self.check(placement)
        self.placement = placement
        self.ops = reference_ops()

    def check(self, placement: ExpertPlacement) -> None:
        """Raise ValueError unless `placement` fits this layer's experts and the layout."""
        e, ep, slots = self.num_experts, self.layout.expert_parallel, self.gate_up_proj.shape[0]
        if placement.num_experts != e or placement.expert_parallel != ep or placement.slots_per_group != slots:
            raise ValueError(
                f"a placement of {placement.num_experts} experts over {placement.expert_parallel} groups of "
                f"{placement.slots_per_group} slots does not fit {e} experts over {ep} groups of {slots} slots"
            )

    def write_tables(self) -> None:
        """Fill the routing tables from `placement` (in place: captured graphs keep reading them)."""
        copies = self.placement.copies()
        width = self.copy_slots.shape[1]
        table = [slots + [slots[0]] * (width - len(slots)) for slots in copies]
        self.copy_counts.copy_(torch.tensor([len(c) for c in copies], dtype=torch.long))
        self.copy_slots.copy_(torch.tensor(table, dtype=torch.long))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's part of the weighted sum of each token's chosen experts, `x [N, H]` -> `[N, H]`."""
        rows = torch.arange(experts.shape[0], device=experts.device)[:, None]
        slot = self.copy_slots[experts, torch.remainder(rows, self.copy_counts[experts])]
        per_group = self.gate_up_proj.shape[0]
        here = torch.div(slot, per_group, rounding_mode="floor") == self.layout.expert_group
        weights = torch.where(here, weights, 0.0)
        local = torch.remainder(slot, per_group)
        return self.ops.moe_experts(x, weights, local, self.gate_up_proj, self.down_proj)


class DecoderLayer(nn.Module):
    """One Gemma 4 layer: sandwich-normed attention and MLP (plus MoE beside the MLP, plus PLE), scaled."""

    def __init__(
        self,
        config: Gemma4TextConfig,
        layer: LayerSpec,
        layout: ParallelLayout,
        comm: Collectives,
        placement: ExpertPlacement | None,
    ) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.comm = comm
        self.self_attn = Attention(config, layer, layout)
        self.mlp = MLP(h, layout.split(layer.intermediate_size)[1])
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.has_moe = config.enable_moe_block
        if self.has_moe:
            assert config.num_experts is not None
            # Tokens routed to each expert since load (serving telemetry: per-expert load and imbalance).
            self.register_buffer("expert_tokens", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
            self.router = Router(config)
            assert placement is not None
            self.experts = Experts(config, layout, placement)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.has_per_layer_input = config.hidden_size_per_layer_input > 0
        if self.has_per_layer_input:
            p = config.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(h, p, bias=False)
            self.per_layer_projection = nn.Linear(p, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)
        self.ops = reference_ops()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionBackend,
        per_layer_input: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`token_mask` (True = real token) keeps padded rows out of the expert-load counters.

        Each residual add is fused with the sandwich norm before it; the last one also applies the
        layer scalar.
        """
        attn = self.comm.all_reduce(self.self_attn(self.input_layernorm(x), rope, attention))
        x = self._add_normed(x, attn, self.post_attention_layernorm)

        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.has_moe:
            h, moe = self._reduce_pair(h, self._moe(x, token_mask))
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe)
        else:
            h = self.comm.all_reduce(h)
        if not self.has_per_layer_input:
            return self._add_normed(x, h, self.post_feedforward_layernorm, self.layer_scalar)
        x = self._add_normed(x, h, self.post_feedforward_layernorm)
        assert per_layer_input is not None
        g = self.ops.gelu_mul(self.per_layer_input_gate(x), per_layer_input)
        return self._add_normed(x, self.per_layer_projection(g), self.post_per_layer_input_norm, self.layer_scalar)

    def _add_normed(
        self, residual: torch.Tensor, x: torch.Tensor, norm: RMSNorm, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(residual + norm(x)) * scale`, as one op."""
        return self.ops.residual_rms_norm(residual, x, norm.weight, norm.eps, scale)

    def _reduce_pair(self, dense: torch.Tensor, moe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense MLP's and the experts' partial sums, summed over the ranks in one all-reduce."""
        if self.comm.world_size == 1:
            return dense, moe
        both = self.comm.all_reduce(torch.cat([dense, moe], dim=-1))
        return both.split(dense.shape[-1], dim=-1)

    def _moe(self, residual: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """The experts' output before its post-norm (a partial sum on a rank of a replica)."""
        flat = residual.reshape(-1, residual.shape[-1])
        weights, experts = self.router(flat)
        self._count(experts, token_mask)
        out = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts)
        return out.reshape(residual.shape)

    def _count(self, experts: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """Add the routed (unmasked) tokens to `expert_tokens` on the device, without a host sync."""
        if token_mask is None:
            counts = torch.ones_like(experts)
        else:
            counts = token_mask.reshape(-1, 1).expand_as(experts).to(experts.dtype)
        self.expert_tokens.index_add_(0, experts.reshape(-1), counts.reshape(-1))


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by a scale rounded to the weight dtype (as the reference does).

    On a TP rank it holds its vocabulary shard (rows `vocab_start ...`): each rank looks up the ids
    it holds, zeros the others, and an all-reduce assembles the rows.
    """

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        scale: float,
        layout: ParallelLayout = ParallelLayout(),
        comm: Collectives = SINGLE,
    ) -> None:
        start, rows = layout.split(num_embeddings)
        super().__init__(rows, dim)
        self.vocab_start = start
        self.comm = comm
        self.scale = scale
        # Rounded once here: forward creates no host tensor (no CPU op or Python float from a tensor per step).
        self.rounded_scales = {dtype: rounded_scale(scale, dtype) for dtype in WEIGHT_DTYPES}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The (unscaled) table rows of `ids`, assembled from every rank's vocabulary shard."""
        if self.comm.world_size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        held = (local >= 0) & (local < self.num_embeddings)
        found = super().forward(torch.where(held, local, 0))
        return self.comm.all_reduce(torch.where(held[..., None], found, 0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids) * self.rounded_scales[self.weight.dtype]


class Gemma4TextModel(nn.Module):
    """Embeddings (+ Per-Layer Embeddings), the decoder stack and the final norm."""

    def __init__(
        self,
        config: Gemma4TextConfig,
        layout: ParallelLayout,
        comm: Collectives,
        placements: Mapping[int, ExpertPlacement],
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, config.embed_scale, layout, comm)
        self.layers = nn.ModuleList(
            DecoderLayer(config, spec, layout, comm, placements.get(spec.index)) for spec in config.layers
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = nn.ModuleDict(
            {
                SLIDING: RotaryEmbedding(config.sliding_rope, config.head_dim),
                FULL: RotaryEmbedding(config.full_rope, config.global_head_dim),
            }
        )
        p = config.hidden_size_per_layer_input
        if p:
            n = config.num_hidden_layers
            self.embed_tokens_per_layer = ScaledEmbedding(
                config.vocab_size_per_layer_input, n * p, math.sqrt(p), layout, comm
            )
            self.per_layer_model_projection = nn.Linear(config.hidden_size, n * p, bias=False)
            self.per_layer_projection_norm = RMSNorm(p, config.rms_norm_eps)
        self.ops = reference_ops()

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """PLE `[B, T, layers, p]`: a token-identity row plus a projection of the input embedding."""
        cfg = self.config
        table = self.embed_tokens_per_layer
        ids, rows = input_ids.reshape(-1), table.weight
        if table.comm.world_size > 1:
            # Vocabulary-split table: gather each token's row (ids past the table read row 0, as the op
            # does), then let the op index those rows by position.
            rows = table.rows(torch.where(ids < cfg.vocab_size_per_layer_input, ids, 0))
            ids = torch.arange(ids.shape[0], device=ids.device)
        ple = self.ops.per_layer_inputs(
            ids,
            _rows(self.per_layer_model_projection(embeds)),
            rows,
            self.per_layer_projection_norm.weight,
            num_layers=cfg.num_hidden_layers,
            eps=cfg.rms_norm_eps,
            token_scale=table.rounded_scales[table.weight.dtype],
            context_scale=cfg.hidden_size**-0.5,
        )
        return ple.view(*input_ids.shape, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBackend,
        *,
        token_mask: torch.Tensor | None = None,
        soft_tokens: SoftTokens | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states; `token_mask [B, T]` (True = real token, None = all) gates expert counts.

        `input_ids` hold `<pad>` at media placeholders, whose embedding rows `soft_tokens` replace; PLE
        reads the pad ids for its token-identity part and the merged embeddings for its context part.
        """
        x = self.embed_tokens(input_ids)
        if soft_tokens is not None:
            x = x.reshape(-1, x.shape[-1]).index_copy(0, soft_tokens.rows, soft_tokens.embeds.to(x.dtype)).view_as(x)
        ple = self.per_layer_inputs(input_ids, x) if self.config.hidden_size_per_layer_input else None
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        for i, layer in enumerate(self.layers):
            spec = self.config.layers[i]
            x = layer(x, ropes[spec.attention_type], attention, None if ple is None else ple[:, :, i], token_mask)
        return self.norm(x)


def route_ops(modules: Iterable[nn.Module], ops: Ops) -> None:
    """Hand `ops` to every module that computes through an op set (those holding an `ops` attribute)."""
    for module in modules:
        if hasattr(module, "ops"):
            module.ops = ops


class Gemma4ForCausalLM(nn.Module):
    """The text decoder with its (tied) LM head and final logit softcap.

    `layout` and `comm` make it one rank's shard of a replica; `placements` (MoE layer -> placement,
    default balanced) say which experts the rank's EP group holds.
    """

    def __init__(
        self,
        config: Gemma4Config,
        layout: ParallelLayout = ParallelLayout(),
        comm: Collectives = SINGLE,
        placements: Mapping[int, ExpertPlacement] | None = None,
    ) -> None:
        super().__init__()
        text = config.text
        if comm.world_size != layout.tensor_parallel or comm.rank != layout.rank:
            raise ValueError(
                f"collectives of rank {comm.rank} of {comm.world_size} do not match the layout's rank "
                f"{layout.rank} of {layout.tensor_parallel}"
            )
        check_layout(text, layout.tensor_parallel, layout.expert_parallel, layout.redundant_experts)
        self.config = config
        self.text_config = text
        self.layout = layout
        self.comm = comm
        self.model = Gemma4TextModel(text, layout, comm, self._placements(placements or {}))
        self.towers = build_towers(config)
        if not text.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, layout.split(text.vocab_size)[1], bias=False)
        self.ops = reference_ops()
        self.register_buffer(
            "placeholder_ids", torch.tensor(config.multimodal_placeholder_ids, dtype=torch.long), persistent=False
        )

    def _placements(self, given: Mapping[int, ExpertPlacement]) -> dict[int, ExpertPlacement]:
        """`given` for every MoE layer, the balanced placement where it has none."""
        text, layout = self.text_config, self.layout
        moe_layers = [spec.index for spec in text.layers] if text.enable_moe_block else []
        unknown = sorted(set(given) - set(moe_layers))
        if unknown:
            raise ValueError(f"placements given for layers {unknown}, which have no experts")
        if not moe_layers:
            return {}
        assert text.num_experts is not None
        balanced = balanced_placement(text.num_experts, layout.expert_parallel, layout.redundant_experts)
        return {i: given.get(i, balanced) for i in moe_layers}

    def use_ops(self, ops: Ops) -> None:
        """Run the text decoder's hot path through `ops` (every module that computes holds the set it calls;
        the media towers keep the reference ops: the kernels are tuned for the decoder's shapes)."""
        route_ops((self, *self.model.modules()), ops)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers after materialising from the meta device."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers()
            elif isinstance(module, DecoderLayer) and module.has_moe:
                module.expert_tokens = torch.zeros_like(module.expert_tokens)
            elif isinstance(module, Experts):
                module.write_tables()
            elif isinstance(module, VisionEncoder):
                module.reset_buffers()
        self.placeholder_ids = torch.tensor(
            self.config.multimodal_placeholder_ids, dtype=torch.long, device=self.placeholder_ids.device
        )

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (empty for dense models); syncs, for metrics only."""
        return {i: layer.expert_tokens.tolist() for i, layer in enumerate(self.model.layers) if layer.has_moe}

    def expert_placements(self) -> dict[int, ExpertPlacement]:
        """Each MoE layer's expert placement (empty for dense models)."""
        return {i: layer.experts.placement for i, layer in enumerate(self.model.layers) if layer.has_moe}

    def set_expert_placements(self, placements: Mapping[int, ExpertPlacement], checkpoint: str | Path) -> None:
        """Move to new placements between steps: reload (from `checkpoint`, this rank's slices only) the
        local slots whose expert changed, then rewrite the routing tables. The outputs of later steps are
        those of the old placement up to float summation order."""
        layers = self.model.layers
        bad = sorted(i for i in placements if not (0 <= i < len(layers) and layers[i].has_moe))
        if bad:
            raise ValueError(f"placements given for layers {bad}, which have no experts")
        for i, placement in placements.items():
            layers[i].experts.check(placement)
        entries = index_checkpoint(checkpoint)
        group = self.layout.expert_group
        targets: dict[str, tuple[torch.Tensor, list[int]]] = {}  # checkpoint name -> (parameter, its slots to fill)
        shards: dict[str, Shard] = {}
        for i, placement in placements.items():
            experts = layers[i].experts
            old, new = experts.placement.slots[group], placement.slots[group]
            changed = [s for s in range(len(new)) if old[s] != new[s]]
            for suffix in EXPERT_TENSORS if changed else ():
                name = checkpoint_name(self.config, f"model.layers.{i}.{suffix}")
                shape = self._expert_shape(suffix)
                entry = entries.get(name)
                if entry is None or entry.shape != shape:
                    found = "is missing" if entry is None else f"has shape {list(entry.shape)}"
                    raise CheckpointError(f"tensor {name!r} {found}; expected shape {list(shape)}")
                targets[name] = (getattr(experts, suffix.removeprefix("experts.")), changed)
                shards[name] = expert_shard(suffix, shape, [new[s] for s in changed], self.layout)
        with torch.no_grad():
            for entry, tensor in read_tensors([entries[name] for name in targets], shards):
                param, slots = targets[entry.name]
                index = torch.tensor(slots, device=param.device)
                param.index_copy_(0, index, tensor.to(device=param.device, dtype=param.dtype))
        for i, placement in placements.items():
            layers[i].experts.placement = placement
            layers[i].experts.write_tables()

    def _expert_shape(self, suffix: str) -> tuple[int, int, int]:
        """The full checkpoint shape of an experts tensor."""
        text = self.text_config
        assert text.num_experts is not None and text.moe_intermediate_size is not None
        e, h, i = text.num_experts, text.hidden_size, text.moe_intermediate_size
        return (e, 2 * i, h) if suffix.endswith("gate_up_proj") else (e, h, i)

    def encode_media(self, item: MediaFeatures) -> torch.Tensor:
        """The soft tokens `[item.num_tokens, H]` of one image, video frame or audio clip (ValueError when
        this checkpoint has no tower for it)."""
        return encode_item(self.towers, item)

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """True at multimodal placeholder ids (None for a checkpoint without media tokens)."""
        if self.placeholder_ids.numel() == 0:
            return None
        # A comparison against every placeholder, not torch.isin: XLA lowers this, isin runs on the host.
        return (input_ids[..., None] == self.placeholder_ids).any(-1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the whole vocabulary, the final softcap applied (on a rank of a replica: its
        vocabulary shard's, gathered from every rank)."""
        weight = self.model.embed_tokens.weight if self.text_config.tie_word_embeddings else self.lm_head.weight
        logits = self.ops.softcap_logits(F.linear(hidden, weight), self.text_config.final_logit_softcapping)
        return self.comm.all_gather(logits, dim=-1)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBackend,
        *,
        token_mask: torch.Tensor | None = None,
        soft_tokens: SoftTokens | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states `[B, T, H]`; the engine computes logits only for rows it samples.

        `token_mask [B, T]` (bool, True = real token) keeps padded rows out of the expert-load counters.
        Multimodal placeholders are embedded as `<pad>`, then `soft_tokens` take their rows.
        """
        placeholders = self.placeholder_mask(input_ids)
        if placeholders is not None:
            input_ids = torch.where(placeholders, self.text_config.pad_token_id, input_ids)
        return self.model(input_ids, positions, attention, token_mask=token_mask, soft_tokens=soft_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: AttentionBackend | None = None,
        *,
        soft_tokens: SoftTokens | None = None,
        span_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, vocab]` for `input_ids [B, T]` (default: positions 0..T-1, dense attention, causal
        but for the bidirectional blocks `span_ids [B, T]` marks, on models that have them)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if attention is None:
            bidirectional = self.text_config.use_bidirectional_attention == "vision"
            attention = DenseAttention(positions, self.ops, span_ids if bidirectional else None)
        return self.compute_logits(self.hidden_states(input_ids, positions, attention, soft_tokens=soft_tokens))
