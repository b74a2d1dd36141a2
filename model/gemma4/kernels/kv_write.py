"""The fused KV-cache write: a layer's raw key/value projections normed, the keys rotated, both stored
into the paged cache, in one launch (the kernel of `gemma4.ops.norms.write_kv_normed`).

Design. One program per `ROWS` (token, kv head) rows of width D (256 or 512), the pair flattened into
one row index `token * kv_heads + head`: a `[ROWS, D / 2]` tile pair holding the rows' two halves (the
rotate_half pairing is then elementwise, as in `gemma4.kernels.norms`, which also sizes the tiles:
16 rows of D = 256, 8 of D = 512; tail rows past the last are masked off). A program loads each
raw key row once and computes the key's QK-norm + RoPE and, on K-as-V layers, the value's
weightless norm from the same registers (the two norms share the row's sum of squares); otherwise it
loads the value row. It then stores both rows at the token's slot: `slot // block_size` picks the
cache row, `slot % block_size` the position in it, addressed through the caches' strides. Padded
tokens (`token_mask` zero) store zeros, so the null block stays all-zero, as `write_kv` keeps it.
Replacing the reference's norm, RoPE (mul, cat, mul, add), mask and `index_copy_` kernels, it reads
each input once and writes each cache row once.

Constexprs: `ROWS` (rows a program), `BLOCK_HALF` (D / 2 rounded up to a power of two), `HAS_V` (a value
projection exists; else values are the keys' raw rows), `STORE_K` (the layer has a key cache), `K_WEIGHTED` (k_norm has
a weight; only meaningful with `STORE_K`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gemma4.kernels.configs import POINTER_TYPES, KernelConfig
from gemma4.kernels.norms import (
    HEAD_DIMS,
    Launch,
    as_rows,
    configs_for,
    head_tile,
    halves_inv_rms,
    launch_kernel,
    load_halves,
    norm_halves,
    rope_halves,
    row_block,
    row_grid,
    store_halves,
)


@triton.jit
def _cache_row(cache_ptr, slot, head, block_size, block_stride, slot_stride, head_stride):
    """Addresses of (slot, head) rows in a `[rows, block_size, kv_heads, D]` cache (any row/slot/head strides)."""
    return cache_ptr + (slot // block_size) * block_stride + (slot % block_size) * slot_stride + head * head_stride


@triton.jit
def _write_kv_normed_kernel(
    k_ptr,
    v_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    token_mask_ptr,
    num_rows,
    kv_heads,
    half,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cos_token_stride,
    sin_token_stride,
    block_size,
    key_block_stride,
    key_slot_stride,
    key_head_stride,
    value_block_stride,
    value_slot_stride,
    value_head_stride,
    eps,
    ROWS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_V: tl.constexpr,
    STORE_K: tl.constexpr,
    K_WEIGHTED: tl.constexpr,
):
    """`ROWS` (token, kv head) rows: keys `RoPE(norm(k) * w)` and values `norm(v or k)` to the token's slot."""
    rows, row_mask = row_block(num_rows, ROWS)
    token = rows // kv_heads
    head = rows % kv_heads
    offsets = tl.arange(0, BLOCK_HALF)[None, :]
    col_mask = offsets < half
    mask = row_mask & col_mask
    dtype = k_ptr.dtype.element_ty
    real = tl.load(token_mask_ptr + token, mask=row_mask, other=0) != 0
    slot = tl.load(slot_mapping_ptr + token, mask=row_mask, other=0)
    k1, k2 = load_halves(k_ptr + token * k_token_stride + head * k_head_stride, offsets, mask, half)
    k_inv_rms = halves_inv_rms(k1, k2, half, eps)
    if STORE_K:
        n1, n2 = norm_halves(k1, k2, k_inv_rms, k_weight_ptr, offsets, col_mask, half, K_WEIGHTED, dtype)
        cos_row = cos_ptr + token * cos_token_stride
        sin_row = sin_ptr + token * sin_token_stride
        key1, key2 = rope_halves(n1, n2, cos_row, sin_row, offsets, mask, half, dtype)
        key_row = _cache_row(key_cache_ptr, slot, head, block_size, key_block_stride, key_slot_stride, key_head_stride)
        store_halves(key_row, tl.where(real, key1, 0.0), tl.where(real, key2, 0.0), offsets, mask, half)
    if HAS_V:
        v1, v2 = load_halves(v_ptr + token * v_token_stride + head * v_head_stride, offsets, mask, half)
        v_inv_rms = halves_inv_rms(v1, v2, half, eps)
    else:
        v1, v2, v_inv_rms = k1, k2, k_inv_rms
    value1, value2 = norm_halves(v1, v2, v_inv_rms, v_ptr, offsets, col_mask, half, False, dtype)
    value_row = _cache_row(
        value_cache_ptr, slot, head, block_size, value_block_stride, value_slot_stride, value_head_stride
    )
    store_halves(value_row, tl.where(real, value1, 0.0), tl.where(real, value2, 0.0), offsets, mask, half)


def write_kv_normed_launch(head_dim: int, has_v: bool, store_k: bool, k_weighted: bool) -> Launch:
    block_half, rows, warps = head_tile(head_dim)
    flags = {"HAS_V": has_v, "STORE_K": store_k, "K_WEIGHTED": store_k and k_weighted}
    constexprs = {"ROWS": rows, "BLOCK_HALF": block_half, **flags}
    return Launch(constexprs, warps)


def _write_kv_normed_types(dtype: str) -> dict[str, str]:
    ptr = POINTER_TYPES[dtype]
    pointers = ("k_ptr", "v_ptr", "k_weight_ptr", "cos_ptr", "sin_ptr", "key_cache_ptr", "value_cache_ptr")
    ints = (
        "num_rows",
        "kv_heads",
        "half",
        "k_token_stride",
        "k_head_stride",
        "v_token_stride",
        "v_head_stride",
        "cos_token_stride",
        "sin_token_stride",
        "block_size",
        "key_block_stride",
        "key_slot_stride",
        "key_head_stride",
        "value_block_stride",
        "value_slot_stride",
        "value_head_stride",
    )
    return {
        **{name: ptr for name in pointers},
        "slot_mapping_ptr": "*i64",
        "token_mask_ptr": "*i64",
        **{name: "i32" for name in ints},
        "eps": "fp32",
    }


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("gemma4::write_kv_normed", mutates_args=("key_cache", "value_cache"))
def _write_kv_normed_op(
    k_raw: torch.Tensor,
    v_raw: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    key_cache: Optional[torch.Tensor],
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    token_mask: torch.Tensor,
) -> None:
    num_tokens, kv_heads, head_dim = k_raw.shape
    if num_tokens == 0:
        return
    if value_cache.stride(-1) != 1 or (key_cache is not None and key_cache.stride(-1) != 1):
        raise ValueError("KV caches need a unit stride along head_dim")
    k_rows = _unit_last_stride(k_raw)
    v_rows = k_rows if v_raw is None else _unit_last_stride(v_raw)
    cos_rows, sin_rows = as_rows(cos, head_dim), as_rows(sin, head_dim)
    if cos_rows.shape[0] != num_tokens or sin_rows.shape[0] != num_tokens:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not match {num_tokens} tokens")
    keys = value_cache if key_cache is None else key_cache
    launch = write_kv_normed_launch(head_dim, v_raw is not None, key_cache is not None, k_weight is not None)
    launch_kernel(
        _write_kv_normed_kernel,
        row_grid(num_tokens * kv_heads, launch),
        launch,
        k_rows,
        v_rows,
        k_rows if k_weight is None else k_weight,
        cos_rows,
        sin_rows,
        keys,
        value_cache,
        slot_mapping.to(torch.int64),
        token_mask.to(torch.int64),
        num_tokens * kv_heads,
        kv_heads,
        head_dim // 2,
        k_rows.stride(0),
        k_rows.stride(1),
        v_rows.stride(0),
        v_rows.stride(1),
        cos_rows.stride(0),
        sin_rows.stride(0),
        value_cache.shape[1],
        *keys.stride()[:3],
        *value_cache.stride()[:3],
        eps,
    )


@_write_kv_normed_op.register_fake
def _(
    k_raw: torch.Tensor,
    v_raw: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    key_cache: Optional[torch.Tensor],
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    token_mask: torch.Tensor,
) -> None:
    return None


def write_kv_normed(
    k_raw: torch.Tensor,
    v_raw: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    token_mask: torch.Tensor,
) -> None:
    """Kernel of `gemma4.ops.norms.write_kv_normed`: `k_raw/v_raw [T, kv_heads, D]`, `cos/sin [T, D]`,
    caches `[rows, block_size, kv_heads, D]` (unit stride along D), `slot_mapping`/`token_mask [T]`."""
    torch.ops.gemma4.write_kv_normed(
        k_raw, v_raw, k_weight, cos, sin, eps, key_cache, value_cache, slot_mapping, token_mask
    )


def shipped_configs() -> list[KernelConfig]:
    """Both head dims, bf16 and fp16: layers with a value projection (keys and values stored), K-as-V layers
    storing values only (26B/31B global layers) and, should a K-as-V group keep a key cache, both of those."""
    kinds = ((True, True), (False, False), (False, True))  # (has_v, store_k)
    launches = [write_kv_normed_launch(d, has_v, store_k, True) for d in HEAD_DIMS for has_v, store_k in kinds]
    return configs_for("write_kv_normed", _write_kv_normed_kernel, _write_kv_normed_types, launches)
