"""Routed experts of a MoE layer as fixed-shape tensor code: no host syncs, no data-dependent shapes.

`route(scores, per_expert_scale, top_k)` turns router logits into each token's expert weights and
indices (the tail of `Router.forward`); `moe_experts` runs the chosen experts.

`moe_experts(x, weights, experts, gate_up_proj, down_proj)` returns, for every token n,
`sum_j weights[n, j] * down[e](gelu_tanh(gate[e] x[n]) * up[e] x[n])` with `e = experts[n, j]`. Each
assignment's result (in x's dtype) is multiplied by its fp32 weight, cast to x's dtype, and the k
results of a token are summed, as the reference implementation accumulates them.

Three formulations compute it; `formulation()` picks one from shapes, dtype and device alone, so the
choice is made once at trace time and a compiled or graph-captured step never changes its shapes.
With A = N*k assignments, E experts and S the bytes of one expert's three matrices:

- "gather" (A <= E; decode): copies each assignment's expert matrices (`gate_up_proj[experts]`) and
  runs batched matrix-vector products. Exact FLOPs, reads only the chosen experts, but the copy costs
  A*S bytes of memory and traffic; bounding A by E keeps it within the layer's own expert weights and
  within the bytes the dense formulation would read.
- "grouped" (A > E on CUDA in bf16, sizes 16-byte aligned; prefill chunks, large batches): sorts the
  assignments by expert (stable argsort), finds each expert's end offset with `searchsorted` and
  runs `torch._grouped_mm`. Exact FLOPs, each expert's weights read once, no weight copies.
  Elsewhere `_grouped_mm` is unusable: its fake kernel accepts only bf16, so fp32 cannot compile.
- "dense" (A > E otherwise: CPU, XLA, fp32): every expert over every token as two einsums, then the
  k chosen results of each token are picked out. Reads every expert once; FLOPs and the [N, E, 2I]
  intermediate are E/k times the routed work, the price of a fixed shape without grouped GEMMs.
  Unchosen experts' outputs are discarded rather than multiplied by zero, so a non-finite value there
  cannot leak into the sum.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from gemma4.backends import backend_of

Formulation = Literal["gather", "grouped", "dense"]


def formulation(
    num_assignments: int, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device
) -> Formulation:
    """The formulation for this shape, dtype and device (never for values: see the module docstring)."""
    if num_assignments <= num_experts:
        return "gather"
    aligned = hidden % 8 == 0 and intermediate % 8 == 0  # 16-byte strides for bf16 operands
    if backend_of(device).grouped_mm and dtype == torch.bfloat16 and aligned:
        return "grouped"
    return "dense"


def route(scores: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights `[N, top_k]` fp32 and indices `[N, top_k]` int64 from router logits `scores [N, E]`.

    Softmax in fp32, the top-k probabilities renormalised to sum to one, each times its expert's scale.
    """
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, k=top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[experts], experts


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of each token's chosen experts: `x [N, H]`, `weights [N, k]` fp32, `experts [N, k]` -> `[N, H]`.

    `gate_up_proj [E, 2I, H]` holds the gate rows then the up rows; `down_proj [E, H, I]`.
    """
    num_experts, hidden, intermediate = down_proj.shape[0], down_proj.shape[1], down_proj.shape[2]
    kind = formulation(experts.numel(), num_experts, hidden, intermediate, x.dtype, x.device)
    return FORMULATIONS[kind](x, weights, experts, gate_up_proj, down_proj)


def moe_gather(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The "gather" formulation: per-assignment copies of the chosen experts' matrices, batched matvecs."""
    gate_up = torch.matmul(gate_up_proj[experts], x[:, None, :, None]).squeeze(-1)  # [N, k, 2I]
    y = torch.matmul(down_proj[experts], _activate(gate_up).unsqueeze(-1)).squeeze(-1)  # [N, k, H]
    return _combine(y, weights, x.dtype)


def moe_grouped(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The "grouped" formulation: assignments sorted by expert, one grouped GEMM per projection."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignment ids grouped by expert
    ends = torch.searchsorted(flat[order], torch.arange(down_proj.shape[0], device=flat.device), right=True)
    offs = ends.to(torch.int32)
    tokens = x[torch.div(order, k, rounding_mode="floor")]  # [A, H] in expert order
    gate_up = torch._grouped_mm(tokens, gate_up_proj.transpose(1, 2), offs=offs)  # [A, 2I]
    y_sorted = torch._grouped_mm(_activate(gate_up), down_proj.transpose(1, 2), offs=offs)  # [A, H]
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to (token, slot) order
    return _combine(y.view(n, k, -1), weights, x.dtype)


def moe_dense(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The "dense" formulation: every expert over every token, then each token's k chosen results."""
    n, k = experts.shape
    gate_up = torch.einsum("nh,eoh->neo", x, gate_up_proj)  # [N, E, 2I]
    y_all = torch.einsum("nei,ehi->neh", _activate(gate_up), down_proj)  # [N, E, H]
    y = torch.gather(y_all, 1, experts[:, :, None].expand(n, k, y_all.shape[-1]))  # [N, k, H]
    return _combine(y, weights, x.dtype)


FORMULATIONS = {"gather": moe_gather, "grouped": moe_grouped, "dense": moe_dense}


def _activate(gate_up: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(gate) * up` over the last dimension (gate half first, as the checkpoint packs it)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _combine(y: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum over the k slots of `y [N, k, H]`, each scaled by its fp32 weight and cast to `dtype` first."""
    return (y * weights[..., None]).to(dtype).sum(dim=1)
