"""Gemma 4's audio tower (E2B/E4B): a conformer over log-mel frames, output `output_proj_dims` wide.

Module names equal the checkpoint's below `model.audio_tower.`, so loading is a prefix rename. The numerics follow
transformers 5.23 `Gemma4AudioModel`, including its quirks: the feed-forward blocks and the layer norms use eps 1e-6
whatever the config says (only the light conv and the subsampling LayerNorm read `rms_norm_eps`), and every frame,
padding included, attends over its chunk's key context so that padding rows come out as transformers computes them.
The embedder into the text model is `gemma4.tower_layers.MultimodalEmbedder` (`model.embed_audio`), not part of this.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.config import ConfigError, Gemma4AudioConfig
from gemma4.norm import RMSNorm
from gemma4.tower_layers import ClippableLinear

# transformers builds these norms with Gemma4RMSNorm's default eps, not config.rms_norm_eps.
_FIXED_NORM_EPS = 1e-6
_ACTIVATIONS = {"silu": F.silu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ConfigError(f"audio hidden_act {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _clip_bound(config: Gemma4AudioConfig, dtype: torch.dtype) -> float:
    """The activation clamp's bound; the dtype's max keeps the clamp finite in bf16/fp16."""
    return min(config.gradient_clipping, torch.finfo(dtype).max)


class _SubsampleLayer(nn.Module):
    """Conv2d 3x3 stride 2 over (time, mel), LayerNorm over channels (no bias), ReLU; padding frames zeroed first."""

    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * mask[:, None, :, None].to(x.dtype)
        x = self.conv(x.to(self.conv.weight.dtype))
        # contiguous: a channels-last tensor would send the next conv down a differently-rounding kernel
        x = F.relu(self.norm(x.movedim(1, -1))).movedim(-1, 1).contiguous()
        return x, mask[:, ::2]


class _SubsampleConvProjection(nn.Module):
    """Two stride-2 conv layers (4x fewer frames) and the projection of (mel/4 x channels) to the tower width.

    The projection's input width is `(channels[0] // 4) * channels[1]` as transformers sizes it, which equals the
    flattened width only when the features have `channels[0]` mel bins (128 in the released models)."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = _SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = _SubsampleLayer(c0, c1, config.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.layer0(features[:, None], mask)
        x, mask = self.layer1(x, mask)
        batch, _, frames, _ = x.shape
        # (time, mel, channel) with channel fastest
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(batch, frames, -1)), mask


class _FeedForward(nn.Module):
    """Half-step conformer FFN: clamp, norm, 4x up, activation, down, clamp, norm, times residual_weight, + x."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        d, clipped = config.hidden_size, config.use_clipped_linears
        self.pre_layer_norm = RMSNorm(d, _FIXED_NORM_EPS)
        self.ffw_layer_1 = ClippableLinear(d, 4 * d, clipped)
        self.ffw_layer_2 = ClippableLinear(4 * d, d, clipped)
        self.post_layer_norm = RMSNorm(d, _FIXED_NORM_EPS)
        self.act = _activation(config.hidden_act)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = _clip_bound(self.config, x.dtype)
        h = self.pre_layer_norm(torch.clamp(x, -bound, bound))
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(h)))
        h = self.post_layer_norm(torch.clamp(h, -bound, bound))
        return h * self.config.residual_weight + x


class _LocalSelfAttention(nn.Module):
    """Chunked local attention with a learned relative-position term, computed in fp32.

    Queries go in chunks of `attention_chunk_size`; each chunk scores a key context of its own frames plus
    `attention_context_left - 1` before and `attention_context_right` after. A key counts when it is valid and
    its distance d = query - key satisfies 0 <= d < left - 1 or 0 < -d < right; other context slots (outside
    the clip too) get `attention_invalid_logits_value` after the softcap. The relative term for distance d is
    q . relative_k_proj(sinusoid(d)) for 0 <= d <= left - 1, else 0 (what transformers' relative shift gives
    for the released geometry, the only one accepted).
    """

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        d, heads, clipped = config.hidden_size, config.num_attention_heads, config.use_clipped_linears
        if d % heads:
            raise ConfigError(f"audio hidden_size {d} is not a multiple of num_attention_heads {heads}")
        self.heads, self.head_dim = heads, d // heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        if (self.chunk + self.past + self.future) // 2 != self.past:
            raise ConfigError(
                "audio attention geometry unsupported: need (attention_chunk_size + attention_context_left - 1 + "
                "attention_context_right) // 2 == attention_context_left - 1, as in the released models"
            )
        self.config = config
        self.q_proj = ClippableLinear(d, d, clipped)
        self.k_proj = ClippableLinear(d, d, clipped)
        self.v_proj = ClippableLinear(d, d, clipped)
        self.post = ClippableLinear(d, d, clipped)
        self.relative_k_proj = nn.Linear(d, d, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def _sinusoids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`[sin | cos]` of distances past..0 (row m is distance past - m), timescales 1..1e4.

        The timescales are rounded to the tower's dtype and the angles computed in it, as transformers' table
        buffer is once the tower is cast (a bf16 tower gets bf16 angles)."""
        half = self.config.hidden_size // 2
        steps = torch.arange(half, dtype=torch.float32, device=device)
        inv_timescales = torch.exp(steps * (-math.log(1e4) / max(half - 1, 1))).to(dtype)
        angle = torch.arange(self.past, -1, -1, device=device)[:, None] * inv_timescales
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    def _context(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """[B, T, ...] -> [B, blocks, window, ...]: block n holds frames n*chunk - past .. (n+1)*chunk + future - 1,
        zeros outside the clip."""
        window = self.chunk + self.past + self.future
        pad_right = blocks * self.chunk - x.shape[1] + self.future
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (self.past, pad_right))
        return x.unfold(1, window, self.chunk).movedim(-1, 2)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape
        shape = (batch, frames, self.heads, self.head_dim)
        q = self.q_proj(x).float().view(shape)
        k = self.k_proj(x).float().view(shape)
        v = self.v_proj(x).float().view(shape)
        # softplus in the weight dtype, as transformers does
        q = q * ((self.head_dim**-0.5) / math.log(2)) * F.softplus(self.per_dim_scale)
        k = k * (math.log(1 + math.e) / math.log(2))

        blocks = -(-frames // self.chunk)
        q = F.pad(q, (0, 0, 0, 0, 0, blocks * self.chunk - frames)).view(batch, blocks, self.chunk, *shape[2:])
        k_ctx, v_ctx = self._context(k, blocks), self._context(v, blocks)  # [B, N, W, H, D]
        logits = torch.einsum("bnqhd,bnwhd->bhnqw", q, k_ctx)

        rel_k = self.relative_k_proj(self._sinusoids(x.device, x.dtype)).float().view(-1, self.heads, self.head_dim)
        rel = torch.einsum("bnqhd,mhd->bhnqm", q, rel_k)  # row m: distance past - m
        window = k_ctx.shape[2]
        query_pos = torch.arange(self.chunk, device=x.device)[:, None]
        slot = torch.arange(window, device=x.device)[None, :]
        distance = query_pos + self.past - slot  # [chunk, window]
        has_rel = (distance >= 0) & (distance <= self.past)
        row = torch.where(has_rel, self.past - distance, 0).expand(batch, self.heads, blocks, -1, -1)
        logits = logits + torch.where(has_rel, torch.gather(rel, -1, row), 0.0)

        cap = self.config.attention_logit_cap
        logits = torch.tanh(logits / cap) * cap
        in_clip = self._context(key_valid[..., None].float(), blocks)[..., 0] > 0  # [B, N, W]; False outside the clip
        in_window = ((distance >= 0) & (distance < self.past)) | ((distance < 0) & (-distance < self.future))
        allowed = in_clip[:, None, :, None, :] & in_window
        logits = logits.masked_fill(~allowed, self.config.attention_invalid_logits_value)
        probs = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhnqw,bnwhd->bnqhd", probs, v_ctx).reshape(batch, blocks * self.chunk, -1)
        return self.post(out[:, :frames].to(x.dtype))


class _LightConv1d(nn.Module):
    """Norm, GLU (2x up), causal depthwise conv over time, clamp, norm, activation, projection, + x."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        d, clipped = config.hidden_size, config.use_clipped_linears
        self.pre_layer_norm = RMSNorm(d, config.rms_norm_eps)
        self.linear_start = ClippableLinear(d, 2 * d, clipped)
        self.depthwise_conv1d = nn.Conv1d(d, d, config.conv_kernel_size, groups=d, bias=False)
        self.conv_norm = RMSNorm(d, config.rms_norm_eps)
        self.linear_end = ClippableLinear(d, d, clipped)
        self.act = _activation(config.hidden_act)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1).transpose(1, 2)
        h = self.depthwise_conv1d(F.pad(h, (self.config.conv_kernel_size - 1, 0))).transpose(1, 2)
        bound = _clip_bound(self.config, h.dtype)
        h = self.act(self.conv_norm(torch.clamp(h, -bound, bound)))
        return self.linear_end(h) + x


class _ConformerLayer(nn.Module):
    """FFN/2, attention (clamp+norm around it, + residual), light conv, FFN/2, clamp, norm."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.feed_forward1 = _FeedForward(config)
        self.norm_pre_attn = RMSNorm(d, _FIXED_NORM_EPS)
        self.self_attn = _LocalSelfAttention(config)
        self.norm_post_attn = RMSNorm(d, _FIXED_NORM_EPS)
        self.lconv1d = _LightConv1d(config)
        self.feed_forward2 = _FeedForward(config)
        self.norm_out = RMSNorm(d, _FIXED_NORM_EPS)
        self.config = config

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        bound = _clip_bound(self.config, self.norm_pre_attn.weight.dtype)
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(torch.clamp(x, -bound, bound)), key_valid)
        x = self.norm_post_attn(torch.clamp(h, -bound, bound)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(torch.clamp(x, -bound, bound))


class Gemma4AudioModel(nn.Module):
    """Log-mel frames `[B, T, 128]` -> one `output_proj_dims` vector per 4 frames, with its validity."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        if len(config.subsampling_conv_channels) != 2:
            raise ConfigError(
                f"audio subsampling_conv_channels must have 2 entries, got {config.subsampling_conv_channels}"
            )
        self.config = config
        self.subsample_conv_projection = _SubsampleConvProjection(config)
        self.layers = nn.ModuleList(_ConformerLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features [B, T, mel]`, `mask [B, T]` (True = real frame) -> `(hidden [B, T', out], valid [B, T'])`,
        T' = ceil(ceil(T / 2) / 2); rows where `valid` is False are padding."""
        mask = mask.bool()
        x, valid = self.subsample_conv_projection(features, mask)
        for layer in self.layers:
            x = layer(x, valid)
        return self.output_proj(x), valid

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One clip, `features [T, mel]`, `mask [T]` -> its soft tokens `[N, out]`, N = mask[::2][::2].sum()
        (0 when the clip is too short)."""
        hidden, valid = self(features[None], mask[None])
        return hidden[0][valid[0]]
