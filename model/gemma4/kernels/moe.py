"""Fused MoE kernels: the router's top-k and the routed experts as two grouped GEMMs.

Routing (`route`): one program per block of `BLOCK_TOKENS` token rows holds the rows' logits over all
E experts in registers, takes the fp32 softmax, picks the top k by k rounds of argmax (the lowest
index wins among equal values), renormalises and applies the per-expert scale. One launch replaces
softmax, topk, sum, divide, gather and multiply.

Experts (`moe_experts`), with A = N*k assignments (assignment `n*k + j` is token n's j-th choice):

1. Alignment (`align`, shape-static torch ops on the device, no host sync): per-expert counts
   (a scatter-add), each expert's run of assignments padded to a multiple of BLOCK_M, and the
   assignment ids sorted by expert (stable: by expert, then id) into a buffer of
   `ceil((A + min(E, A) * (BLOCK_M - 1)) / BLOCK_M)` M-blocks, the padding filled with the sentinel A.
   At most min(E, A) experts have assignments and each wastes fewer than BLOCK_M slots, so the
   static size always suffices. `block_expert` names each M-block's expert; blocks past the last
   used one hold the sentinel E, and their programs return at once.
2. `_gate_up_kernel`, grid (M-blocks, tiles of I): gathers the block's token rows of x and computes
   the gate and up tiles against the expert's two halves of `gate_up_proj` in the same K loop (x is
   loaded once for both), then writes `gelu_tanh(gate) * up` to `act [slots, I]`.
3. `_down_kernel`, grid (M-blocks, tiles of H): `act @ down_proj[e]^T`, times the assignment's fp32
   weight, stored by assignment id into `[N, k, H]`; the k slots are then summed by torch in x's
   dtype. The M-block index varies fastest in both grids, so the blocks of one expert run next to
   each other and share its weight tiles through L2.

Custom ops: `gemma4::moe_route` (the routing launch) and `gemma4::moe_expert_gemms` (both GEMM
launches, so the activation buffer, whose padding rows stay unwritten, never leaves the op). The
alignment is plain torch code between them, visible to torch.compile.

Rounding follows the reference ops step by step: gate and up are rounded to x's dtype, the GELU
result is rounded, then the product; the down projection is rounded before the fp32 weight is
applied and rounded again. Accumulation is fp32 throughout.

Two tile sets, picked from the static token count N only (`path_tiles`):

- "decode" (N <= 16): BLOCK_M = 16. A router gives a token k distinct experts, so an expert receives
  at most N <= 16 assignments and all of them sit in one M-block: each chosen expert's weights are
  streamed exactly once, by programs that each read a narrow tile of them (many programs keep the
  GPU's memory system busy on a memory-bound step). The grid runs over the static M-block count,
  at most min(E, A) + ceil(A / 16) blocks, rather than over the E experts: for 26B-A4B (A = 8N <= 128
  = E) that is never more programs and at small N far fewer (N = 1: 8 blocks, not 128), and it
  stays correct, only slower, if a caller repeats an expert within a token.
- "prefill" (N > 16): BLOCK_M = 64, wider tiles, for compute-bound chunks.

The dot operands stay in the storage dtype on a GPU (bf16/fp16 tensor cores, fp32 accumulators);
under `TRITON_INTERPRET=1` they are cast to fp32 after loading, since bf16 arithmetic is wrong there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from gemma4.config import variant_config
from gemma4.kernels.configs import POINTER_TYPES, KernelConfig

# Under the interpreter, dot operands are cast to fp32 (bf16 arithmetic is wrong there); compiled
# kernels multiply in the storage dtype. Read once, when the kernels are defined.
_DOT_IN_FP32 = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

DECODE_MAX_TOKENS = 16  # the decode tiles' BLOCK_M: every expert's assignments fit in one M-block
ROUTE_BLOCK_TOKENS = 16
ROUTE_NUM_WARPS = 4
ROUTE_NUM_STAGES = 2  # no loop to pipeline; passed so that the launch is the shipped compilation


@dataclass(frozen=True)
class GemmTiles:
    """Output tile width, K step and launch options of one grouped GEMM."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PathTiles:
    """The M-block height shared by alignment and both GEMMs, and each GEMM's tiles."""

    block_m: int
    gate_up: GemmTiles  # block_n tiles I (for each of gate and up), block_k steps over H
    down: GemmTiles  # block_n tiles H, block_k steps over I


# The only tile table: launchers and shipped_configs() read it. Every entry compiles for sm_90 and
# gfx942 without spills and within gfx942's 64 KiB of LDS, both as the AOT check compiles it (no
# alignment facts) and as a launch specialises it (16-byte aligned pointers, pipelined loads); the
# prefill GEMMs use 8 warps because 4 spill registers in the unspecialised compile. 704 = 11 * 64,
# so the I tiles and steps divide the real I; the kernels mask partial tiles for any other size.
TILES: dict[str, PathTiles] = {
    "decode": PathTiles(
        block_m=DECODE_MAX_TOKENS,
        gate_up=GemmTiles(block_n=32, block_k=128, num_warps=4, num_stages=3),
        down=GemmTiles(block_n=64, block_k=64, num_warps=4, num_stages=3),
    ),
    "prefill": PathTiles(
        block_m=64,
        gate_up=GemmTiles(block_n=64, block_k=64, num_warps=8, num_stages=3),
        down=GemmTiles(block_n=128, block_k=32, num_warps=8, num_stages=3),
    ),
}


def path_tiles(num_tokens: int) -> PathTiles:
    """The tiles for a batch of `num_tokens` tokens (a static size: a trace never switches paths)."""
    return TILES["decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"]


# ----------------------------------------------------------------------------------------------
# Routing


@triton.jit
def _route_kernel(
    scores_ptr,
    scale_ptr,
    weights_ptr,
    experts_ptr,
    num_tokens,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
    BLOCK_TOP_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.arange(0, BLOCK_EXPERTS)
    row_ok = rows < num_tokens
    col_ok = cols < NUM_EXPERTS
    logits = tl.load(
        scores_ptr + rows[:, None] * NUM_EXPERTS + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]

    slots = tl.arange(0, BLOCK_TOP_K)
    chosen_probs = tl.zeros([BLOCK_TOKENS, BLOCK_TOP_K], dtype=tl.float32)
    chosen_experts = tl.zeros([BLOCK_TOKENS, BLOCK_TOP_K], dtype=tl.int32)
    remaining = tl.where(col_ok[None, :], probs, -1.0)  # probabilities are >= 0: a taken entry never wins again
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=1, tie_break_left=True)
        best_prob = tl.max(remaining, axis=1)
        chosen_probs = tl.where(slots[None, :] == j, best_prob[:, None], chosen_probs)
        chosen_experts = tl.where(slots[None, :] == j, best[:, None], chosen_experts)
        remaining = tl.where(cols[None, :] == best[:, None], -1.0, remaining)

    weights = chosen_probs / tl.sum(chosen_probs, axis=1)[:, None]
    weights = weights * tl.load(scale_ptr + chosen_experts).to(tl.float32)
    out_offsets = rows[:, None] * TOP_K + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offsets, weights, mask=out_ok)
    tl.store(experts_ptr + out_offsets, chosen_experts.to(tl.int64), mask=out_ok)


def _route_constexprs(num_experts: int, top_k: int) -> dict[str, Any]:
    return {
        "NUM_EXPERTS": num_experts,
        "TOP_K": top_k,
        "BLOCK_TOKENS": ROUTE_BLOCK_TOKENS,
        "BLOCK_EXPERTS": triton.next_power_of_2(num_experts),
        "BLOCK_TOP_K": triton.next_power_of_2(top_k),
    }


@torch.library.custom_op("gemma4::moe_route", mutates_args=())
def _route_op(scores: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = scores.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=scores.device)
    experts = torch.empty(num_tokens, top_k, dtype=torch.int64, device=scores.device)
    grid = (triton.cdiv(num_tokens, ROUTE_BLOCK_TOKENS),)
    _route_kernel[grid](
        scores.contiguous(), per_expert_scale.contiguous(), weights, experts, num_tokens,
        **_route_constexprs(num_experts, top_k), num_warps=ROUTE_NUM_WARPS, num_stages=ROUTE_NUM_STAGES,
    )
    return weights, experts


@_route_op.register_fake
def _(scores: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = scores.shape[0]
    return (
        scores.new_empty(num_tokens, top_k, dtype=torch.float32),
        scores.new_empty(num_tokens, top_k, dtype=torch.int64),
    )


def route(scores: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights `[N, top_k]` fp32 and indices `[N, top_k]` int64 from router logits `scores [N, E]`."""
    return torch.ops.gemma4.moe_route(scores, per_expert_scale, top_k)


# ----------------------------------------------------------------------------------------------
# Alignment


class Alignment(NamedTuple):
    """Assignments grouped into expert-pure M-blocks (see the module docstring)."""

    sorted_ids: torch.Tensor  # [num_blocks * block_m] int32: assignment ids by expert, padding = A
    block_expert: torch.Tensor  # [num_blocks] int32: each M-block's expert, E past the last used block
    counts: torch.Tensor  # [E] int32: assignments per expert


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, `[num_experts]` int32, on the device (equal to a bincount, but of static shape)."""
    flat = experts.reshape(-1).long()
    ones = torch.ones_like(flat, dtype=torch.int32)
    return torch.zeros(num_experts, dtype=torch.int32, device=experts.device).scatter_add_(0, flat, ones)


def num_blocks(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Static M-block count that holds every expert's padded run, whatever the routing."""
    return triton.cdiv(num_assignments + min(num_experts, num_assignments) * (block_m - 1), block_m)


def align(experts: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the assignments `experts [N, k]` into M-blocks of `block_m` slots, each block one expert's."""
    flat = experts.reshape(-1).long()
    num_assignments = flat.numel()
    counts = expert_counts(experts, num_experts)
    sizes = counts.long()
    padded = (sizes + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # assignment ids by expert, then by id
    sorted_experts = flat[order]
    rank = torch.arange(num_assignments, device=flat.device) - (torch.cumsum(sizes, 0) - sizes)[sorted_experts]
    slots = (padded_ends - padded)[sorted_experts] + rank
    blocks = num_blocks(num_assignments, num_experts, block_m)
    sorted_ids = torch.full((blocks * block_m,), num_assignments, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, slots, order.to(torch.int32))
    block_starts = torch.arange(blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return Alignment(sorted_ids, block_expert, counts)


# ----------------------------------------------------------------------------------------------
# Grouped GEMMs


@triton.jit
def _block_rows(sorted_ids_ptr, block_expert_ptr, num_assignments, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's M-block: its expert (NUM_EXPERTS if unused), slots, assignment ids and their validity."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + slots)
    return expert, slots, ids, ids < num_assignments


@triton.jit
def _dot_operand(tile):
    """A loaded tile as a dot operand: fp32 under the interpreter, the storage dtype when compiled."""
    if _DOT_IN_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _rounded(value, dtype: tl.constexpr):
    """`value` rounded to `dtype` and back to fp32, where the reference materialises a tensor."""
    return value.to(dtype).to(tl.float32)


@triton.jit
def _gelu_tanh(x):
    """`0.5 x (1 + tanh(u))` written as `x sigmoid(2u)`: the same function, finite for every x."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + 0.044715 x^3)
    return x * tl.sigmoid(2.0 * inner)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    gate_up_ptr,
    act_ptr,
    num_assignments,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert, slots, ids, valid = _block_rows(sorted_ids_ptr, block_expert_ptr, num_assignments, NUM_EXPERTS, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTERMEDIATE
    x_rows = x_ptr + (ids // TOP_K).to(tl.int64)[:, None] * HIDDEN
    gate_cols = gate_up_ptr + expert.to(tl.int64) * (2 * INTERMEDIATE * HIDDEN) + cols[None, :] * HIDDEN
    up_cols = gate_cols + INTERMEDIATE * HIDDEN
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < HIDDEN
        x_tile = _dot_operand(tl.load(x_rows + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0))
        w_ok = k_ok[:, None] & col_ok[None, :]
        gate_tile = _dot_operand(tl.load(gate_cols + ks[:, None], mask=w_ok, other=0.0))
        up_tile = _dot_operand(tl.load(up_cols + ks[:, None], mask=w_ok, other=0.0))
        gate = tl.dot(x_tile, gate_tile, gate, input_precision="ieee")
        up = tl.dot(x_tile, up_tile, up, input_precision="ieee")
    dtype: tl.constexpr = act_ptr.dtype.element_ty
    act = _rounded(_gelu_tanh(_rounded(gate, dtype)), dtype) * _rounded(up, dtype)
    act_ptrs = act_ptr + slots.to(tl.int64)[:, None] * INTERMEDIATE + cols[None, :]
    tl.store(act_ptrs, act.to(dtype), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    weights_ptr,
    down_ptr,
    out_ptr,
    num_assignments,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert, slots, ids, valid = _block_rows(sorted_ids_ptr, block_expert_ptr, num_assignments, NUM_EXPERTS, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    act_rows = act_ptr + slots.to(tl.int64)[:, None] * INTERMEDIATE
    down_cols = down_ptr + expert.to(tl.int64) * (HIDDEN * INTERMEDIATE) + cols[None, :] * INTERMEDIATE
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTERMEDIATE, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < INTERMEDIATE
        act_tile = _dot_operand(tl.load(act_rows + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0))
        down_tile = _dot_operand(tl.load(down_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0))
        acc = tl.dot(act_tile, down_tile, acc, input_precision="ieee")
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + ids, mask=valid, other=0.0)
    out = _rounded(acc, dtype) * weight[:, None]
    out_ptrs = out_ptr + ids.to(tl.int64)[:, None] * HIDDEN + cols[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=valid[:, None] & col_ok[None, :])


def _gate_up_constexprs(
    tiles: PathTiles, hidden: int, intermediate: int, num_experts: int, top_k: int
) -> dict[str, Any]:
    return {
        "HIDDEN": hidden, "INTERMEDIATE": intermediate, "NUM_EXPERTS": num_experts, "TOP_K": top_k,
        "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.gate_up.block_n, "BLOCK_K": tiles.gate_up.block_k,
    }


def _down_constexprs(tiles: PathTiles, hidden: int, intermediate: int, num_experts: int) -> dict[str, Any]:
    return {
        "HIDDEN": hidden, "INTERMEDIATE": intermediate, "NUM_EXPERTS": num_experts,
        "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.down.block_n, "BLOCK_K": tiles.down.block_k,
    }


@torch.library.custom_op("gemma4::moe_expert_gemms", mutates_args=())
def _expert_gemms_op(
    x: torch.Tensor,
    weights: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Both grouped GEMMs over aligned assignments: each assignment's weighted result, `[N, k, H]`.

    One op for both launches keeps the activation buffer internal: its padding rows are never
    written (nor read), which an op output could not leave undefined.
    """
    num_tokens, top_k = weights.shape
    tiles = path_tiles(num_tokens)
    blocks = block_expert.numel()
    if sorted_ids.numel() != blocks * tiles.block_m:
        raise ValueError(f"{sorted_ids.numel()} aligned slots are not {blocks} blocks of {tiles.block_m}")
    num_experts, hidden, intermediate = down_proj.shape
    x, gate_up_proj, down_proj = x.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous()
    act = x.new_empty(sorted_ids.numel(), intermediate)
    _gate_up_kernel[(blocks, triton.cdiv(intermediate, tiles.gate_up.block_n))](
        x, sorted_ids, block_expert, gate_up_proj, act, weights.numel(),
        **_gate_up_constexprs(tiles, hidden, intermediate, num_experts, top_k),
        num_warps=tiles.gate_up.num_warps, num_stages=tiles.gate_up.num_stages,
    )
    out = x.new_empty(num_tokens, top_k, hidden)
    _down_kernel[(blocks, triton.cdiv(hidden, tiles.down.block_n))](
        act, sorted_ids, block_expert, weights.float().contiguous(), down_proj, out, weights.numel(),
        **_down_constexprs(tiles, hidden, intermediate, num_experts),
        num_warps=tiles.down.num_warps, num_stages=tiles.down.num_stages,
    )
    return out


@_expert_gemms_op.register_fake
def _(
    x: torch.Tensor,
    weights: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty(weights.shape[0], weights.shape[1], down_proj.shape[1])


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
    if gate_up_proj.dtype != x.dtype or down_proj.dtype != x.dtype:
        raise ValueError(f"expert weights ({gate_up_proj.dtype}, {down_proj.dtype}) must have x's dtype {x.dtype}")
    tiles = path_tiles(x.shape[0])
    sorted_ids, block_expert, _ = align(experts, down_proj.shape[0], tiles.block_m)
    per_assignment = torch.ops.gemma4.moe_expert_gemms(x, weights, sorted_ids, block_expert, gate_up_proj, down_proj)
    return per_assignment.sum(dim=1)  # in x's dtype, as the reference sums its k slots


# ----------------------------------------------------------------------------------------------
# Shipped configurations


def _signature(kernel: Any, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Every parameter of `kernel` in order: its type from `types`, or "constexpr"."""
    return {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}


def _config(
    name: str, kernel: Any, types: dict[str, str], constexprs: dict[str, Any], num_warps: int, num_stages: int
) -> KernelConfig:
    return KernelConfig(
        name=name, kernel=kernel, signature=_signature(kernel, types, constexprs), constexprs=constexprs,
        num_warps=num_warps, num_stages=num_stages,
    )


def shipped_configs() -> list[KernelConfig]:
    """Routing and both GEMMs of every tile set, for 26B-A4B's real shapes, in bf16 and fp16."""
    text = variant_config("26b-a4b").text
    assert text.num_experts is not None and text.top_k_experts is not None and text.moe_intermediate_size is not None
    hidden, intermediate = text.hidden_size, text.moe_intermediate_size
    num_experts, top_k = text.num_experts, text.top_k_experts
    index = {"sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", "num_assignments": "i32"}
    configs = []
    for dtype in ("bfloat16", "float16"):
        data = POINTER_TYPES[dtype]
        route_types = {
            "scores_ptr": data, "scale_ptr": data, "weights_ptr": "*fp32", "experts_ptr": "*i64", "num_tokens": "i32"
        }
        configs.append(_config(
            f"moe_route[e={num_experts},k={top_k},{dtype}]", _route_kernel, route_types,
            _route_constexprs(num_experts, top_k), ROUTE_NUM_WARPS, ROUTE_NUM_STAGES,
        ))
        for path, tiles in TILES.items():
            gate_up_types = {"x_ptr": data, "gate_up_ptr": data, "act_ptr": data, **index}
            configs.append(_config(
                f"moe_gate_up[{path},bm={tiles.block_m},{dtype}]", _gate_up_kernel, gate_up_types,
                _gate_up_constexprs(tiles, hidden, intermediate, num_experts, top_k),
                tiles.gate_up.num_warps, tiles.gate_up.num_stages,
            ))
            down_types = {"act_ptr": data, "weights_ptr": "*fp32", "down_ptr": data, "out_ptr": data, **index}
            configs.append(_config(
                f"moe_down[{path},bm={tiles.block_m},{dtype}]", _down_kernel, down_types,
                _down_constexprs(tiles, hidden, intermediate, num_experts),
                tiles.down.num_warps, tiles.down.num_stages,
            ))
    return configs
