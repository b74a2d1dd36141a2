"""The RMSNorm module the text decoder and the media towers share (its arithmetic is the op set's)."""

from __future__ import annotations

import torch
from torch import nn

from gemma4.backends import reference_ops


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * w`, computed in fp32 (Gemma 4 uses `w`, not Gemma 3's `1 + w`).

    `with_scale=False` is the weightless norm of attention values and the MoE router input.
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.ops = reference_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)
