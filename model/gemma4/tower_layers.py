"""Modules the vision and audio towers share: the clippable linear and the embedder into the text model.

Names match the checkpoint (`....linear.weight`, the four clip bounds as buffers; `embed_vision.` /
`embed_audio.` `embedding_projection.weight`), so the towers load by a prefix rename.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma4.norm import RMSNorm


class ClippableLinear(nn.Module):
    """`clamp(W clamp(x, input_min, input_max), output_min, output_max)`; the clamps (and their four scalar
    buffers, read from the checkpoint) exist only where the tower's config has `use_clipped_linears`."""

    def __init__(self, in_features: int, out_features: int, clipped: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            for name, bound in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.tensor(bound * float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


class MultimodalEmbedder(nn.Module):
    """A tower's output into the text model's width: weightless RMSNorm, then a projection (no bias).

    Its outputs are the soft tokens scattered into the placeholder positions, unscaled."""

    def __init__(self, tower_width: int, text_hidden_size: int, eps: float) -> None:
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(tower_width, eps, with_scale=False)
        self.embedding_projection = nn.Linear(tower_width, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
