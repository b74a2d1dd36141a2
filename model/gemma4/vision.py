"""Gemma 4's vision tower: patches of one or more images to pooled soft tokens (before `embed_vision`).

Module and buffer names equal the checkpoint's below `model.vision_tower.`, so loading is a prefix
rename. Everything is driven by `Gemma4VisionConfig`; the released sizes differ only in config.
Padding patches carry position (-1, -1): they get no position embedding, are never attended to and
add nothing to the pooled tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.config import Gemma4VisionConfig
from gemma4.norm import RMSNorm
from gemma4.tower_layers import ClippableLinear


class VisionPatchEmbedder(nn.Module):
    """Pixels in [0, 1] to `input_proj(2p - 1)` plus the learned column and row embeddings."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(
            torch.zeros(2, config.position_embedding_size, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.input_proj((2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype))
        pos = position_ids.clamp(min=0)
        table = self.position_embedding_table
        pos_emb = table[0][pos[..., 0]] + table[1][pos[..., 1]]
        return h + pos_emb.masked_fill(padding.unsqueeze(-1), 0.0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of each head by the column angles, the second half by the row angles.

    x: [B, P, heads, hd]; cos/sin: [B, P, 2, hd/2] (axis 2 = column, row), shared by all heads.
    """
    halves = x.chunk(2, dim=-1)
    out = [h * cos[:, :, None, i] + _rotate_half(h) * sin[:, :, None, i] for i, h in enumerate(halves)]
    return torch.cat(out, dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention with 2-D RoPE, q/k norms with weights, weightless v norm, scale 1."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        d, hd, clipped = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.head_dim = hd
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj = ClippableLinear(d, self.num_heads * hd, clipped)
        self.k_proj = ClippableLinear(d, self.num_kv_heads * hd, clipped)
        self.v_proj = ClippableLinear(d, self.num_kv_heads * hd, clipped)
        self.o_proj = ClippableLinear(self.num_heads * hd, d, clipped)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.v_norm = RMSNorm(hd, config.rms_norm_eps, with_scale=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        b, p, _ = x.shape
        q = _rope_2d(self.q_norm(self.q_proj(x).view(b, p, self.num_heads, self.head_dim)), cos, sin)
        k = _rope_2d(self.k_norm(self.k_proj(x).view(b, p, self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(b, p, self.num_kv_heads, self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(2, 3) + key_bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, p, self.num_heads * self.head_dim)
        return self.o_proj(out)


class VisionMLP(nn.Module):
    """Gated GELU (tanh) MLP."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        d, f, clipped = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(d, f, clipped)
        self.up_proj = ClippableLinear(d, f, clipped)
        self.down_proj = ClippableLinear(f, d, clipped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """Sandwich-normed attention and MLP blocks, as in the text decoder."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_bias))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    """The encoder stack plus the axial RoPE angles it shares (not in the checkpoint)."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        half = self.head_dim // 2
        exponents = torch.arange(0, half, 2, dtype=torch.float32, device=device) / half
        return 1.0 / (self.rope_theta**exponents)

    def reset_buffers(self) -> None:
        """Recompute `inv_freq` after the module was materialised from the meta device."""
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, P, 2, hd/4]
        angles = torch.cat((angles, angles), dim=-1)  # each half of the head rotates by rotate_half
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        key_bias = torch.zeros(padding.shape, dtype=x.dtype, device=x.device)
        key_bias = key_bias.masked_fill(padding, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, key_bias)
        return x


class Gemma4VisionModel(nn.Module):
    """Patches to pooled soft tokens: embed, encode, average k x k patch blocks, scale, standardise."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedder = VisionPatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, P, 3*p*p] in [0, 1], position_ids [B, P, 2] (x = column, y = row; -1 = padding)
        -> (tokens [B, P // k^2, d], valid [B, P // k^2]); invalid slots hold zeros."""
        k = self.config.pooling_kernel_size
        p = pixel_values.shape[1]
        if p % (k * k):
            raise ValueError(f"the patch count {p} must be a multiple of pooling_kernel_size^2 = {k * k}")
        padding = (position_ids == -1).all(dim=-1)
        h = self.patch_embedder(pixel_values, position_ids, padding)
        h = self.encoder(h, position_ids, padding)
        tokens, valid = self._pool(h, position_ids, padding, p // (k * k))
        if self.config.standardize:
            tokens = (tokens - self.std_bias.float()) * self.std_scale.float()
        tokens = tokens.masked_fill(~valid.unsqueeze(-1), 0.0)
        return tokens.to(h.dtype), valid

    def _pool(
        self, h: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of each k x k block of patches into slot `x//k + (W//k) * (y//k)` (row-major; W is the image's
        patch width), summed in fp32 and rounded to the working dtype, then times sqrt(d) in fp32 (fp32 out).
        A slot is valid when a real patch lands in it."""
        k = self.config.pooling_kernel_size
        dtype = h.dtype
        pos = position_ids.clamp(min=0)
        width = pos[..., 0].masked_fill(padding, 0).amax(dim=-1, keepdim=True) + 1
        block = pos // k
        slot = (block[..., 0] + (width // k) * block[..., 1]).masked_fill(padding, 0)
        if int(slot.max()) >= length:
            raise ValueError(f"patch positions map to pooled slots beyond the {length} the patch count allows")
        h = h.float().masked_fill(padding.unsqueeze(-1), 0.0)
        pooled = torch.zeros(h.shape[0], length, h.shape[-1], dtype=torch.float32, device=h.device)
        pooled.scatter_add_(1, slot.unsqueeze(-1).expand_as(h), h * (1.0 / (k * k)))
        counts = torch.zeros(h.shape[0], length, dtype=torch.int64, device=h.device)
        counts.scatter_add_(1, slot, (~padding).long())
        # The mean is rounded to the working dtype before the fp32 scaling, as the reference does.
        pooled = pooled.to(dtype).float() * math.sqrt(self.config.hidden_size)
        return pooled, counts > 0

    def encode(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One unpadded image or video frame: [P, 3*p*p], [P, 2] -> [P // k^2, d]."""
        tokens, valid = self.forward(pixel_values.unsqueeze(0), position_ids.unsqueeze(0))
        if not bool(valid.all()):
            raise ValueError("encode takes one unpadded image whose patch grid sides are multiples of the pooling kernel")
        return tokens[0]
