"""Fused per-row and elementwise kernels of the decoder: RMSNorm (plain, and fused with the sandwich
norm's residual add and the layer scalar), QK-norm + RoPE, the Per-Layer-Embedding inputs, the gated
GELU and the final logit softcap. Each has the signature of its torch reference op in `gemma4.ops.norms`.

Design. Every kernel reads its inputs from global memory once (wide norm rows twice, the second time
from L1/L2), computes in fp32 and writes its output once: what the reference spreads over 4-8 torch kernels (casts, a mean, multiplies, a concat) is one
launch. Where the reference rounds an intermediate to the model dtype (each torch op in bf16 rounds
its result), the kernel rounds at the same place (`_round`), so it reproduces the reference up to the
fp32 reduction order and `rsqrt` instead of `pow(., -0.5)`.

Every kernel works on a block of `ROWS` rows a program: a 2-D tile `[ROWS, BLOCK]`, one row per tile
row, the rows past the last one masked off (`row_block`). Rows are short (256-5376 values), so one row a
program would launch thousands of programs with a few hundred values each; `ROWS` rows fill a tile of
about `ROW_TILE_ELEMENTS` values (at most `MAX_ROWS` rows: that bound only binds below 64-wide rows, test
sizes) held by 16 warps (8 values a thread: 16-byte bf16 accesses on sm_90).
Per-row reductions are along the tile's second axis.

- Norms: a program per `ROWS` rows. Rows up to 1024 wide are one tile wide; wider rows (the hidden
  sizes 1536-5376) loop over 1024-wide chunks twice, first summing squares, then normalising and
  storing (the second read hits L1/L2); they take 4 rows a program. A single 8192-wide tile would waste
  a third of its lanes on a 5376 row; the chunk loop does not.
- QK-norm + RoPE: a program per `ROWS` (token, head) rows, the pair flattened into one row index. The
  head vector is loaded as its two halves, so the rotate_half pairing (x1[j], x2[j]) is elementwise
  between the two tiles: no shuffles, no second load. The cos/sin row of the token is read by every
  head of it (from cache).
- PLE inputs: a program per `ROWS` (token, layer) rows: gathers each layer's p-wide slice of the
  token's table row (ids >= Vp, and negative ids, read row 0), scales both parts, norms the context
  part, adds.
- Gated GELU and softcap: a 2-D grid of (`ROWS` rows, 1024-wide chunk), rows addressed by their stride,
  so a view of a packed gate/up output needs no copy. `tanh` (softcap and GELU's) is exp-based: `exp(-2|x|)`
  never overflows, and Triton's interpreter has no libdevice.

Launch choices (tile widths, rows a program, warps) come from `row_tile` and the `*_launch` functions, which
`shipped_configs()` calls with the real model widths: CI compiles exactly what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from gemma4.kernels.configs import POINTER_TYPES, KernelConfig

# The real model widths the launchers are configured for (see shared/reference/gemma4-architecture.md).
HIDDEN_SIZES = (1536, 2560, 2816, 5376)  # E2B, E4B, 26B-A4B, 31B
HEAD_DIMS = (256, 512)  # sliding, full attention
PLE_WIDTH = 256  # hidden_size_per_layer_input (E2B, E4B)
SHIPPED_DTYPES = ("bfloat16", "float16")

MLP_WIDTHS = (704, 2112, 6144, 10240, 12288, 21504)  # gelu_mul widths: MoE expert, dense MLPs
VOCAB_SIZE = 262144  # softcap width

MAX_ROW_BLOCK = 1024  # widest row tile; wider rows loop over chunks
ELEMENTWISE_BLOCK = 1024  # widest chunk of the (rows, chunk) grids
ROW_TILE_ELEMENTS = 4096  # values of a [ROWS, BLOCK] tile (a head's two halves count both)
MAX_ROWS = 64
MAX_WARPS = 16
# Constants of the jit code (Triton reads only constexpr globals).
_INV_SQRT2 = tl.constexpr(2.0**-0.5)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)


@dataclass(frozen=True)
class Launch:
    """What a launcher passes to a kernel besides its arguments: constexprs and launch options."""

    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int = 1  # no loads worth pipelining through shared memory in these kernels


def row_tile(width: int, max_block: int = MAX_ROW_BLOCK, row_elements: int | None = None) -> tuple[int, int, int]:
    """Tile width, rows a program and warps for rows of `width`: the width's next power of two up to
    `max_block`, as many rows as fill `ROW_TILE_ELEMENTS` (a row holding `row_elements` values of its
    tile, `block` unless given), 8 values a thread (16-byte bf16 accesses): 16 warps at a full tile."""
    block = min(triton.next_power_of_2(width), max_block)
    per_row = block if row_elements is None else row_elements
    rows = max(1, min(MAX_ROWS, ROW_TILE_ELEMENTS // per_row))
    return block, rows, max(1, min(MAX_WARPS, rows * per_row // 256))


def kernel_config(name: str, kernel: Any, types: Mapping[str, str], launch: Launch) -> KernelConfig:
    """A `KernelConfig` from the kernel's runtime argument types (in order; constexprs come last)."""
    signature = {**types, **{key: "constexpr" for key in launch.constexprs}}
    return KernelConfig(name, kernel, signature, dict(launch.constexprs), launch.num_warps, launch.num_stages)


def launch_kernel(kernel: Any, grid: tuple[int, ...], launch: Launch, *args: Any) -> None:
    """Run `kernel` over `grid` with `launch`'s constexprs and options."""
    kernel[grid](*args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)


def head_tile(head_dim: int) -> tuple[int, int, int]:
    """Half-tile width, rows a program and warps for head vectors held as their two halves (D <= 512)."""
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    return row_tile(half, max_block=block_half, row_elements=2 * block_half)


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` as `[rows, width]` with unit column stride (a view when possible)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# ----------------------------------------------------------------------------------------------------
# Shared jit helpers (also used by gemma4.kernels.kv_write)


@triton.jit
def row_block(num_rows, ROWS: tl.constexpr):
    """This program's `ROWS` row indices (int64) as a column `[ROWS, 1]`, and which of them exist (the last
    block's tail is masked off)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return rows[:, None], rows[:, None] < num_rows


@triton.jit
def _round(x, dtype: tl.constexpr):
    """`x` rounded to `dtype` and back to fp32: where the reference's torch op rounds its result."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _load_f32(ptr, offsets, mask):
    """Load and widen to fp32 at once (bf16 arithmetic is wrong in Triton's interpreter)."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _inv_rms(sum_sq, width, eps):
    """`(mean(x^2) + eps)^-0.5` from the rows' sums of squares."""
    return tl.math.rsqrt(sum_sq / width + eps)


@triton.jit
def _tanh(x):
    """tanh from exp(-2|x|) (in (0, 1]: finite for every finite x), with x's sign."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def load_halves(row_ptr, offsets, mask, half):
    """The halves `x[:half]`, `x[half:]` of rows of width `2 * half` at `offsets < half`, in fp32
    (`row_ptr [ROWS, 1]` and `offsets [1, BLOCK_HALF]` give `[ROWS, BLOCK_HALF]` tiles).

    Head vectors are handled as halves: rotate_half pairs x1[j] with x2[j], elementwise between them.
    """
    return _load_f32(row_ptr, offsets, mask), _load_f32(row_ptr + half, offsets, mask)


@triton.jit
def halves_inv_rms(x1, x2, half, eps):
    """Each row's `_inv_rms` as a column `[ROWS, 1]`."""
    return _inv_rms(tl.sum(x1 * x1 + x2 * x2, axis=1), 2 * half, eps)[:, None]


@triton.jit
def norm_halves(
    x1, x2, inv_rms, weight_ptr, offsets, col_mask, half, HAS_WEIGHT: tl.constexpr, dtype: tl.constexpr
):
    """RMSNorm of rows' halves (`x * inv_rms`, then `* weight`), rounded to `dtype` as the norm's cast; the
    weight's halves are loaded once, at `offsets`/`col_mask [1, BLOCK_HALF]`, and broadcast over the rows."""
    h1 = x1 * inv_rms
    h2 = x2 * inv_rms
    if HAS_WEIGHT:
        w1, w2 = load_halves(weight_ptr, offsets, col_mask, half)
        h1 = h1 * w1
        h2 = h2 * w2
    return _round(h1, dtype), _round(h2, dtype)


@triton.jit
def rope_halves(n1, n2, cos_row, sin_row, offsets, mask, half, dtype: tl.constexpr):
    """rotate_half RoPE of rows' halves (`cos_row`/`sin_row [ROWS, 1]`: each row's token's),
    `x * cos + [-x2, x1] * sin`, each product rounded (the sum at the store)."""
    cos1, cos2 = load_halves(cos_row, offsets, mask, half)
    sin1, sin2 = load_halves(sin_row, offsets, mask, half)
    out1 = _round(n1 * cos1, dtype) - _round(n2 * sin1, dtype)
    out2 = _round(n2 * cos2, dtype) + _round(n1 * sin2, dtype)
    return out1, out2


@triton.jit
def store_halves(row_ptr, out1, out2, offsets, mask, half):
    tl.store(row_ptr + offsets, out1.to(row_ptr.dtype.element_ty), mask=mask)
    tl.store(row_ptr + half + offsets, out2.to(row_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add and the layer scalar


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    residual_ptr,
    scale_ptr,
    out_ptr,
    num_rows,
    width,
    x_row_stride,
    residual_row_stride,
    eps,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """`ROWS` rows: `[residual +] norm(x) [* scale]`, rounded after the norm, the add and the multiply."""
    rows, row_mask = row_block(num_rows, ROWS)
    x_rows = x_ptr + rows * x_row_stride
    out_rows = out_ptr + rows * width
    dtype = out_ptr.dtype.element_ty
    sum_sq = tl.zeros((ROWS, BLOCK), tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        x = _load_f32(x_rows, cols, row_mask & (cols < width))
        sum_sq += x * x
    inv_rms = _inv_rms(tl.sum(sum_sq, axis=1), width, eps)[:, None]
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        col_mask = cols < width
        mask = row_mask & col_mask
        h = _load_f32(x_rows, cols, mask) * inv_rms
        if HAS_WEIGHT:
            h = h * _load_f32(weight_ptr, cols, col_mask)
        if HAS_RESIDUAL:
            h = _round(h, dtype) + _load_f32(residual_ptr + rows * residual_row_stride, cols, mask)
            if HAS_SCALE:
                h = _round(h, dtype) * scale
        tl.store(out_rows + cols, h.to(dtype), mask=mask)


def rms_norm_launch(width: int, has_weight: bool, has_residual: bool, has_scale: bool) -> Launch:
    block, rows, warps = row_tile(width)
    flags = {"HAS_WEIGHT": has_weight, "HAS_RESIDUAL": has_residual, "HAS_SCALE": has_scale}
    return Launch({"ROWS": rows, "BLOCK": block, **flags}, warps)


def row_grid(num_rows: int, launch: Launch, *chunks: int) -> tuple[int, ...]:
    """One program per `ROWS` rows (and per chunk in any further grid axes)."""
    return (triton.cdiv(num_rows, launch.constexprs["ROWS"]), *chunks)


def _rms_norm_types(dtype: str) -> dict[str, str]:
    ptr = POINTER_TYPES[dtype]
    pointers = {name: ptr for name in ("x_ptr", "weight_ptr", "residual_ptr", "scale_ptr", "out_ptr")}
    ints = {name: "i32" for name in ("num_rows", "width", "x_row_stride", "residual_row_stride")}
    return {**pointers, **ints, "eps": "fp32"}


def _norm_rows(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    width = x.shape[-1]
    out = x.new_empty(x.shape)
    if x.numel() == 0:
        return out
    x_rows = as_rows(x, width)
    residual_rows = x_rows if residual is None else as_rows(residual, width)
    launch = rms_norm_launch(width, weight is not None, residual is not None, scale is not None)
    launch_kernel(
        _rms_norm_kernel,
        row_grid(x_rows.shape[0], launch),
        launch,
        x_rows,
        x_rows if weight is None else weight,
        residual_rows,
        x_rows if scale is None else scale,
        out,
        x_rows.shape[0],
        width,
        x_rows.stride(0),
        residual_rows.stride(0),
        eps,
    )
    return out


@torch.library.custom_op("gemma4::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _norm_rows(x, weight, eps, None, None)


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("gemma4::residual_rms_norm", mutates_args=())
def _residual_rms_norm_op(
    residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, scale: Optional[torch.Tensor]
) -> torch.Tensor:
    return _norm_rows(x, weight, eps, residual, scale)


@_residual_rms_norm_op.register_fake
def _(
    residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, scale: Optional[torch.Tensor]
) -> torch.Tensor:
    return x.new_empty(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Kernel of `gemma4.ops.norms.rms_norm` (last dim, any leading dims)."""
    return torch.ops.gemma4.rms_norm(x, weight, eps)


def residual_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel of `gemma4.ops.norms.residual_rms_norm`; `scale` (`[1]`) in x's dtype, as the model's buffer."""
    return torch.ops.gemma4.residual_rms_norm(residual, x, weight, eps, scale)


# ----------------------------------------------------------------------------------------------------
# QK-norm + RoPE


@triton.jit
def _norm_rope_kernel(
    x_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_rows,
    half,
    num_heads,
    x_token_stride,
    x_head_stride,
    cos_token_stride,
    sin_token_stride,
    eps,
    ROWS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """`ROWS` (token, head) rows (row `token * num_heads + head`): norm, then rotate by the token's cos/sin."""
    rows, row_mask = row_block(num_rows, ROWS)
    token = rows // num_heads
    head = rows % num_heads
    offsets = tl.arange(0, BLOCK_HALF)[None, :]
    col_mask = offsets < half
    mask = row_mask & col_mask
    dtype = out_ptr.dtype.element_ty
    x1, x2 = load_halves(x_ptr + token * x_token_stride + head * x_head_stride, offsets, mask, half)
    inv_rms = halves_inv_rms(x1, x2, half, eps)
    n1, n2 = norm_halves(x1, x2, inv_rms, weight_ptr, offsets, col_mask, half, HAS_WEIGHT, dtype)
    cos_row = cos_ptr + token * cos_token_stride
    sin_row = sin_ptr + token * sin_token_stride
    out1, out2 = rope_halves(n1, n2, cos_row, sin_row, offsets, mask, half, dtype)
    store_halves(out_ptr + rows * 2 * half, out1, out2, offsets, mask, half)


def norm_rope_launch(head_dim: int, has_weight: bool) -> Launch:
    block_half, rows, warps = head_tile(head_dim)
    return Launch({"ROWS": rows, "BLOCK_HALF": block_half, "HAS_WEIGHT": has_weight}, warps)


def _norm_rope_types(dtype: str) -> dict[str, str]:
    ptr = POINTER_TYPES[dtype]
    ints = (
        "num_rows",
        "half",
        "num_heads",
        "x_token_stride",
        "x_head_stride",
        "cos_token_stride",
        "sin_token_stride",
    )
    return {
        **{name: ptr for name in ("x_ptr", "weight_ptr", "cos_ptr", "sin_ptr", "out_ptr")},
        **{name: "i32" for name in ints},
        "eps": "fp32",
    }


def _head_rows(t: torch.Tensor) -> torch.Tensor:
    """`t [..., heads, D]` as `[T, heads, D]` with unit last stride."""
    rows = t.reshape(-1, *t.shape[-2:])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@torch.library.custom_op("gemma4::norm_rope", mutates_args=())
def _norm_rope_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    out = x.new_empty(x.shape)
    if x.numel() == 0:
        return out
    heads, head_dim = x.shape[-2:]
    rows = _head_rows(x)
    cos_rows, sin_rows = as_rows(cos, head_dim), as_rows(sin, head_dim)
    if cos_rows.shape[0] != rows.shape[0] or sin_rows.shape[0] != rows.shape[0]:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not match x {tuple(x.shape)}'s leading dims")
    launch = norm_rope_launch(head_dim, weight is not None)
    launch_kernel(
        _norm_rope_kernel,
        row_grid(rows.shape[0] * heads, launch),
        launch,
        rows,
        rows if weight is None else weight,
        cos_rows,
        sin_rows,
        out,
        rows.shape[0] * heads,
        head_dim // 2,
        heads,
        rows.stride(0),
        rows.stride(1),
        cos_rows.stride(0),
        sin_rows.stride(0),
        eps,
    )
    return out


@_norm_rope_op.register_fake
def _(
    x: torch.Tensor, weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    return x.new_empty(x.shape)


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """Kernel of `gemma4.ops.norms.norm_rope`: `x [T, heads, D]`, `cos/sin [T, D]` (or any leading dims
    shared by x and cos/sin, e.g. the model's `[1, T, heads, D]` with `[1, T, D]`)."""
    return torch.ops.gemma4.norm_rope(x, weight, cos, sin, eps)


# ----------------------------------------------------------------------------------------------------
# Per-Layer-Embedding inputs


@triton.jit
def _per_layer_inputs_kernel(
    ids_ptr,
    context_ptr,
    table_ptr,
    weight_ptr,
    out_ptr,
    num_rows,
    width,
    num_layers,
    vocab,
    context_row_stride,
    table_row_stride,
    eps,
    token_scale,
    context_scale,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """`ROWS` (token, layer) rows (row `token * num_layers + layer`):
    `(norm(context * context_scale) + table[id] * token_scale) * 2^-0.5`."""
    rows, row_mask = row_block(num_rows, ROWS)
    token = rows // num_layers
    layer = rows % num_layers
    dtype = out_ptr.dtype.element_ty
    token_id = tl.load(ids_ptr + token, mask=row_mask, other=0)
    token_id = tl.where((token_id >= 0) & (token_id < vocab), token_id, 0)
    cols = tl.arange(0, BLOCK)[None, :]
    col_mask = cols < width
    mask = row_mask & col_mask
    table_row = table_ptr + token_id * table_row_stride + layer * width
    context_row = context_ptr + token * context_row_stride + layer * width
    token_part = _round(_load_f32(table_row, cols, mask) * token_scale, dtype)
    context = _round(_load_f32(context_row, cols, mask) * context_scale, dtype)
    inv_rms = _inv_rms(tl.sum(context * context, axis=1), width, eps)[:, None]
    normed = _round(context * inv_rms * _load_f32(weight_ptr, cols, col_mask), dtype)
    out = _round(normed + token_part, dtype) * _INV_SQRT2
    tl.store(out_ptr + rows * width + cols, out.to(dtype), mask=mask)


def per_layer_inputs_launch(width: int) -> Launch:
    block, rows, warps = row_tile(width, max_block=triton.next_power_of_2(width))
    return Launch({"ROWS": rows, "BLOCK": block}, warps)


def _per_layer_inputs_types(dtype: str) -> dict[str, str]:
    ptr = POINTER_TYPES[dtype]
    ints = ("num_rows", "width", "num_layers", "vocab", "context_row_stride", "table_row_stride")
    return {
        "ids_ptr": "*i64",
        **{name: ptr for name in ("context_ptr", "table_ptr", "weight_ptr", "out_ptr")},
        **{name: "i32" for name in ints},
        **{name: "fp32" for name in ("eps", "token_scale", "context_scale")},
    }


@torch.library.custom_op("gemma4::per_layer_inputs", mutates_args=())
def _per_layer_inputs_op(
    ids: torch.Tensor,
    context: torch.Tensor,
    table: torch.Tensor,
    norm_weight: torch.Tensor,
    num_layers: int,
    eps: float,
    token_scale: float,
    context_scale: float,
) -> torch.Tensor:
    width = table.shape[1] // num_layers
    out = context.new_empty((*ids.shape, num_layers, width))
    if out.numel() == 0:
        return out
    context_rows = as_rows(context, num_layers * width)
    num_rows = context_rows.shape[0] * num_layers
    launch = per_layer_inputs_launch(width)
    launch_kernel(
        _per_layer_inputs_kernel,
        row_grid(num_rows, launch),
        launch,
        ids.reshape(-1).to(torch.int64),
        context_rows,
        table,
        norm_weight,
        out,
        num_rows,
        width,
        num_layers,
        table.shape[0],
        context_rows.stride(0),
        table.stride(0),
        eps,
        token_scale,
        context_scale,
    )
    return out


@_per_layer_inputs_op.register_fake
def _(
    ids: torch.Tensor,
    context: torch.Tensor,
    table: torch.Tensor,
    norm_weight: torch.Tensor,
    num_layers: int,
    eps: float,
    token_scale: float,
    context_scale: float,
) -> torch.Tensor:
    return context.new_empty((*ids.shape, num_layers, table.shape[1] // num_layers))


def per_layer_inputs(
    ids: torch.Tensor,
    context: torch.Tensor,
    table: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    num_layers: int,
    eps: float,
    token_scale: float,
    context_scale: float,
) -> torch.Tensor:
    """Kernel of `gemma4.ops.norms.per_layer_inputs` (table rows with unit column stride; negative ids,
    which the reference rejects, read row 0 like ids >= Vp)."""
    return torch.ops.gemma4.per_layer_inputs(
        ids, context, table, norm_weight, num_layers, eps, token_scale, context_scale
    )


# ----------------------------------------------------------------------------------------------------
# Gated GELU and the logit softcap: (rows, chunk) grids


@triton.jit
def _chunk_tile(num_rows, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows (`[ROWS, 1]`), chunk columns (`[1, BLOCK]`) and their mask."""
    rows, row_mask = row_block(num_rows, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    return rows, cols, row_mask & (cols < width)


@triton.jit
def _gelu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, num_rows, width, gate_row_stride, up_row_stride, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    """`gelu_tanh(gate) * up` for one chunk of `ROWS` rows, the GELU rounded before the multiply."""
    rows, cols, mask = _chunk_tile(num_rows, width, ROWS, BLOCK)
    dtype = out_ptr.dtype.element_ty
    gate = _load_f32(gate_ptr + rows * gate_row_stride, cols, mask)
    inner = _SQRT_2_OVER_PI * (gate + _GELU_CUBIC * gate * gate * gate)
    gelu = _round(0.5 * gate * (1.0 + _tanh(inner)), dtype)
    out = gelu * _load_f32(up_ptr + rows * up_row_stride, cols, mask)
    tl.store(out_ptr + rows * width + cols, out.to(dtype), mask=mask)


@triton.jit
def _softcap_kernel(logits_ptr, out_ptr, num_rows, width, row_stride, cap, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """`tanh(logits / cap) * cap` for one chunk of `ROWS` rows, in fp32, stored as fp32."""
    rows, cols, mask = _chunk_tile(num_rows, width, ROWS, BLOCK)
    logits = _load_f32(logits_ptr + rows * row_stride, cols, mask)
    tl.store(out_ptr + rows * width + cols, _tanh(logits / cap) * cap, mask=mask)


def elementwise_launch(width: int) -> Launch:
    """Chunks up to `ELEMENTWISE_BLOCK` wide, as many rows as fill the tile (narrow rows take more)."""
    block, rows, warps = row_tile(width, max_block=ELEMENTWISE_BLOCK)
    return Launch({"ROWS": rows, "BLOCK": block}, warps)


def _gelu_mul_types(dtype: str) -> dict[str, str]:
    ptr = POINTER_TYPES[dtype]
    ints = {name: "i32" for name in ("num_rows", "width", "gate_row_stride", "up_row_stride")}
    return {"gate_ptr": ptr, "up_ptr": ptr, "out_ptr": ptr, **ints}


def _softcap_types(dtype: str) -> dict[str, str]:
    ints = {name: "i32" for name in ("num_rows", "width", "row_stride")}
    return {"logits_ptr": POINTER_TYPES[dtype], "out_ptr": "*fp32", **ints, "cap": "fp32"}


def _launch_chunks(kernel: Any, rows: torch.Tensor, pointers: tuple[torch.Tensor, ...], *scalars: Any) -> None:
    """Run an elementwise kernel over `rows [R, width]` (grid: row blocks x chunks) with its `pointers`,
    then `R, width`, then its other `scalars`."""
    num_rows, width = rows.shape
    launch = elementwise_launch(width)
    grid = row_grid(num_rows, launch, triton.cdiv(width, launch.constexprs["BLOCK"]))
    launch_kernel(kernel, grid, launch, *pointers, num_rows, width, *scalars)


@torch.library.custom_op("gemma4::gelu_mul", mutates_args=())
def _gelu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    out = gate.new_empty(gate.shape)
    if gate.numel() == 0:
        return out
    width = gate.shape[-1]
    gate_rows, up_rows = as_rows(gate, width), as_rows(up, width)
    _launch_chunks(_gelu_mul_kernel, gate_rows, (gate_rows, up_rows, out), gate_rows.stride(0), up_rows.stride(0))
    return out


@_gelu_mul_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("gemma4::softcap_logits", mutates_args=())
def _softcap_op(logits: torch.Tensor, cap: float) -> torch.Tensor:
    out = logits.new_empty(logits.shape, dtype=torch.float32)
    if logits.numel() == 0:
        return out
    width = logits.shape[-1]
    rows = as_rows(logits, width)
    _launch_chunks(_softcap_kernel, rows, (rows, out), rows.stride(0), cap)
    return out


@_softcap_op.register_fake
def _(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return logits.new_empty(logits.shape, dtype=torch.float32)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Kernel of `gemma4.ops.norms.gelu_mul` (gate/up may be row-strided views, e.g. of a packed gate_up)."""
    return torch.ops.gemma4.gelu_mul(gate, up)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Kernel of `gemma4.ops.norms.softcap_logits`, computed in fp32 from the loaded logits.

    Equal to the reference in fp32 (to rounding); in bf16/fp16 it is more accurate than the reference,
    which rounds `logits / cap`, the tanh and the product to the dtype before widening. `cap=None` is a
    plain fp32 cast (no kernel: nothing to fuse).
    """
    if cap is None:
        return logits.float()
    return torch.ops.gemma4.softcap_logits(logits, cap)


# ----------------------------------------------------------------------------------------------------


def _dtype_tag(dtype: str) -> str:
    return POINTER_TYPES[dtype].lstrip("*")


def _unique(configs: list[KernelConfig]) -> list[KernelConfig]:
    """Configs of distinct names (several real widths share a tile)."""
    return list({config.name: config for config in configs}.values())


def _launch_tag(launch: Launch) -> str:
    values = ",".join(f"{key.lower()}={value}" for key, value in launch.constexprs.items())
    return f"{values},w={launch.num_warps}"


def configs_for(
    name: str, kernel: Any, types: Callable[[str], dict[str, str]], launches: list[Launch]
) -> list[KernelConfig]:
    """Every (launch, shipped dtype) compilation of `kernel`, named `name[constexprs,warps,dtype]`."""
    return _unique(
        [
            kernel_config(f"{name}[{_launch_tag(launch)},{_dtype_tag(dtype)}]", kernel, types(dtype), launch)
            for launch in launches
            for dtype in SHIPPED_DTYPES
        ]
    )


def shipped_configs() -> list[KernelConfig]:
    """What the launchers pick for the real models, in bf16 and fp16.

    Norms at the hidden sizes: weighted, weightless (the MoE router input), and the residual add with and
    without the layer scalar. QK-norm + RoPE at both head dims; PLE at p = 256; GELU at the MLP widths and
    softcap at the vocabulary (one tile each: all are wider than a chunk).
    """
    norm_flags = ((True, False, False), (False, False, False), (True, True, False), (True, True, True))
    return [
        *configs_for(
            "rms_norm",
            _rms_norm_kernel,
            _rms_norm_types,
            [rms_norm_launch(width, *flags) for width in HIDDEN_SIZES for flags in norm_flags],
        ),
        *configs_for("norm_rope", _norm_rope_kernel, _norm_rope_types, [norm_rope_launch(d, True) for d in HEAD_DIMS]),
        *configs_for(
            "per_layer_inputs", _per_layer_inputs_kernel, _per_layer_inputs_types, [per_layer_inputs_launch(PLE_WIDTH)]
        ),
        *configs_for("gelu_mul", _gelu_mul_kernel, _gelu_mul_types, [elementwise_launch(w) for w in MLP_WIDTHS]),
        *configs_for("softcap_logits", _softcap_kernel, _softcap_types, [elementwise_launch(VOCAB_SIZE)]),
    ]
