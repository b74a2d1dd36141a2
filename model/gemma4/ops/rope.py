"""Rotary position embedding (NeoX, rotate_half layout): the angles at positions, and the rotation.

One module for the model's RotaryEmbedding, the queries' and keys' QK-norm + RoPE op, and the keys
that K-as-V layers re-derive at read time, so all three rotate alike.
"""

from __future__ import annotations

import torch


def rope_at(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) `[..., D]` at integer `positions [...]` for the `D / 2` frequencies `inv_freq`."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX (rotate_half) RoPE of `x [..., heads, D]` by `cos/sin [..., D]`, each product rounded to the dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
