"""Which part of each full checkpoint tensor one rank holds (`ParallelLayout`, `ExpertPlacement`).

A `Shard` lists, along each dimension of the full tensor, the ranges the rank keeps, concatenated in
order; the loader reads exactly those with safetensors' `get_slice`. The split follows the layout
`gemma4.memory` prices: vocabulary rows of the embeddings and the LM head, attention heads of q/o,
KV heads of k/v (`ParallelLayout.kv_heads`), MLP width of gate/up/down; the experts tensors keep the
rows of the experts in the rank's EP-group slots and the rank's share of each expert's width (gate
rows and up rows of the packed `gate_up_proj` both). Everything else is replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from gemma4.config import Gemma4TextConfig
from gemma4.parallel.layout import ParallelLayout
from gemma4.parallel.placement import ExpertPlacement

Range = tuple[int, int]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_VOCAB = ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight", "lm_head.weight")
# Layer tensor -> (dimension split, what splits it).
_SPLITS = {
    "self_attn.q_proj.weight": (0, "heads"),
    "self_attn.o_proj.weight": (1, "heads"),
    "self_attn.k_proj.weight": (0, "kv_heads"),
    "self_attn.v_proj.weight": (0, "kv_heads"),
    "mlp.gate_proj.weight": (0, "width"),
    "mlp.up_proj.weight": (0, "width"),
    "mlp.down_proj.weight": (1, "width"),
}
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass(frozen=True)
class Shard:
    """For each dimension of a full tensor, the `(start, stop)` ranges kept, concatenated in order."""

    ranges: tuple[tuple[Range, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(sum(stop - start for start, stop in dim) for dim in self.ranges)

    def covers(self, full_shape: Sequence[int]) -> bool:
        """Whether this is the whole tensor of `full_shape`."""
        return self.ranges == whole(full_shape).ranges


def whole(shape: Sequence[int]) -> Shard:
    return Shard(tuple(((0, n),) for n in shape))


def _split(shape: Sequence[int], dim: int, start: int, length: int) -> Shard:
    ranges = list(whole(shape).ranges)
    ranges[dim] = ((start, start + length),)
    return Shard(tuple(ranges))


def _runs(ids: Sequence[int]) -> tuple[Range, ...]:
    """`ids` as ranges, consecutive ascending ids merged (a balanced placement's slots are one run)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((start, stop) for start, stop in runs)


def expert_shard(name: str, shape: Sequence[int], experts: Sequence[int], layout: ParallelLayout) -> Shard:
    """The rows of `experts` (in slot order) of an experts tensor and this rank's share of their width.

    `gate_up_proj [E, 2I, H]` packs the gate rows then the up rows: both halves are sliced.
    `down_proj [E, H, I]` is sliced along I.
    """
    _, rows, cols = shape
    kept = _runs(experts)
    if name.endswith("gate_up_proj"):
        width = rows // 2
        start, n = layout.expert_width(width)
        return Shard((kept, ((start, start + n), (width + start, width + start + n)), ((0, cols),)))
    start, n = layout.expert_width(cols)
    return Shard((kept, ((0, rows),), ((start, start + n),)))


def tensor_shard(
    text: Gemma4TextConfig,
    name: str,
    shape: Sequence[int],
    layout: ParallelLayout,
    placements: Mapping[int, ExpertPlacement],
) -> Shard:
    """The part of the full tensor `name` (a model parameter name) of `shape` this rank holds."""
    if name in _VOCAB:
        return _split(shape, 0, *layout.split(shape[0]))
    match = _LAYER.match(name)
    if match is None:
        return whole(shape)
    index, suffix = int(match.group(1)), match.group(2)
    spec = text.layers[index]
    if suffix in EXPERT_TENSORS:
        return expert_shard(suffix, shape, placements[index].slots[layout.expert_group], layout)
    if suffix not in _SPLITS:
        return whole(shape)
    dim, how = _SPLITS[suffix]
    if how == "width":
        return _split(shape, dim, *layout.split(shape[dim]))
    first, count = layout.split(text.num_attention_heads) if how == "heads" else layout.kv_heads(spec.num_kv_heads)
    return _split(shape, dim, first * spec.head_dim, count * spec.head_dim)


def rank_shards(
    text: Gemma4TextConfig,
    shapes: Mapping[str, Sequence[int]],
    layout: ParallelLayout,
    placements: Mapping[int, ExpertPlacement],
) -> dict[str, Shard]:
    """The shard of every tensor in `shapes` (model name -> full shape) this rank holds."""
    return {name: tensor_shard(text, name, shape, layout, placements) for name, shape in shapes.items()}
