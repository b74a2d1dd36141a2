"""Paged attention for a whole step in one varlen Triton launch per layer (plus a split-K combine).

Tiling. A step's tokens are one flat row `[T]`; each sequence's queries are the rows
`[query_start, query_start + query_len)`. A program owns one query tile of one sequence and one KV
head: `BLOCK_M` rows holding `BLOCK_M // group` consecutive query tokens times the `group` query
heads that share the KV head (GQA packed as extra tile rows, so K/V are read once per KV head and
the 16-row minimum of `tl.dot` is met even by a single decode token). It walks the keys its rows
may see in steps of `BLOCK_N`, reading each key's cache block id from the block table (a key step
may span several cache blocks; any `block_size` works), with fp32 online softmax, and writes
`[rows, D]` of the output in its dtype. Scale is 1.0 (Gemma 4's QK-norm replaces 1/sqrt(d)).

Grid `(query tiles, kv_heads, splits)`. The first axis has the static bound `cdiv(T, tokens per
tile) + S`: sequence `s` owns the slots from `cu_query_len[s] // tokens_per_tile + s` on, which
leaves room for its `cdiv(query_len, tokens_per_tile)` tiles; a program finds its sequence by binary
search over those starts, and a program past its sequence's tiles has no work. The slots after the
last sequence's (at least `cdiv(padded tokens, tokens per tile)` of them) write zeros to the rows of
padded tokens, so no output row is left uninitialised (callers drop them, but NaN must not appear).

Key range. A tile's queries at positions `[p0, p1]` see keys `[max(0, p0 - W + 1), p1]` (W the
sliding window, unbounded for full attention): only the blocks inside the union of the tile's
windows are read. With bidirectional spans, a tile holding a span query reads on to the sequence's
context end (a span's later keys are this step's own); the span mask itself is exact
(`(k > q - W) & (k <= q | same span)`, keys written before this step have no span).

Split-K (flash-decoding). When the step has too few (tile, KV head) programs to fill the GPU (decode
of a few long sequences), each tile's key range is cut into `splits` contiguous parts; every split
writes its fp32 partial (running max in log2 units, sum, unnormalised accumulator) per (token,
head) and `_combine_splits_kernel` merges them into the output. `num_splits` is chosen from static
shapes only (`choose_num_splits`), so the launch is CUDA-graph and torch.compile friendly. With one
split the attention kernel writes the output directly.

K-as-V layers (global layers of 26B/31B) store only the normed values; their keys are derived
in-kernel as RoPE(values * key_scale) at the key positions (`angle = pos * inv_freq[d % (D/2)]`,
fp32). The scores are accumulated over chunks of `ROPE_CHUNK` rotate_half pairs: a chunk loads the
value columns `c` and their partners `c + D/2` (a second load of the half-swapped columns), scales
both, rotates them with one fp32 sin/cos of their shared angles (`_sincos`) and adds both halves'
dots with the matching query columns. Rotating the whole `[BLOCK_N, D]` tile at once held too
much fp32 state (Triton computes it in the dot operand's replicated layout) and spilled. The value
tile itself, unscaled and unrotated, is V.

Loads are cast to fp32 at once (the interpreter's bf16 arithmetic is wrong); the tiles are cast
back to the cache dtype only as `tl.dot` operands, accumulation stays fp32. Every `[rows, D]`
tile access is hinted as 16-byte aligned runs (`_tile_ptrs`; the launcher checks the pointers and
strides), which makes loads and stores vectorise also in ahead-of-time compiles, where Triton
cannot see the arguments' alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from gemma4.backends import rocm_build
from gemma4.kernels.configs import POINTER_TYPES, KernelConfig
from gemma4.ops.paged_attention import SequenceLayout, slot_mapping

NO_WINDOW = 1 << 30  # the window passed for full attention: wider than any context
MAX_SPLITS = 16
# Split-K: enough programs for a few per SM (H200: 132 SMs; MI300X: 304 CUs), each split at least
# this many keys (a split with fewer spends more on its partial than on its keys).
TARGET_PROGRAMS = 512
MIN_KEYS_PER_SPLIT = 256


# ---------------------------------------------------------------------------------------------------
# Tile tables: the only place tile sizes are chosen (launcher and `shipped_configs` both read them).


@dataclass(frozen=True)
class Tile:
    """One attention tile shape and its launch options."""

    block_m: int  # rows: query tokens x the query heads of one KV head
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


# (head_dim bound, K-as-V) -> (decode tile, prefill tile); a head_dim uses the first bound >= it.
# Decode-only steps (every query grid of length 1) take the small-row tile, steps with prefill
# chunks the wide one; K-as-V tiles hold the fp32 rotation of their keys as well. Every entry fits
# gfx942's 64 KiB of LDS and compiles without spills for sm_90 and gfx942.
_TILES: dict[str, dict[tuple[int, bool], tuple[Tile, Tile]]] = {
    "cuda": {
        (128, False): (Tile(16, 16, 4, 2), Tile(32, 16, 4, 2)),
        (128, True): (Tile(16, 16, 4, 2), Tile(32, 16, 4, 2)),
        (256, False): (Tile(16, 32, 4, 2), Tile(64, 16, 8, 2)),
        (256, True): (Tile(16, 16, 8, 2), Tile(64, 16, 8, 2)),
        (512, False): (Tile(16, 16, 4, 2), Tile(32, 16, 8, 2)),
        (512, True): (Tile(16, 16, 8, 2), Tile(32, 16, 8, 2)),
    },
}
# One table serves both vendors: each entry above already fits gfx942's LDS without spills, and the
# AOT check compiles every shipped config for both targets anyway. ROCm-only tiles would go here.
_TILES["hip"] = _TILES["cuda"]
COMBINE_WARPS = 4
ROPE_CHUNK = 16  # K-as-V: rotate_half pairs rotated per chunk (bounds the fp32 rotation's registers)
# The layer kinds of the real models (head_dim, K-as-V, spans): sliding d=256 (with bidirectional
# spans on 26B/31B), global d=512 with separate keys (E2B/E4B) or K-as-V (26B/31B).
REAL_LAYERS = ((256, False, False), (256, False, True), (512, False, False), (512, True, False))
SHIPPED_DTYPES = (torch.bfloat16, torch.float16)


def vendor() -> str:
    """The tile table to use: "hip" on ROCm builds of torch, else "cuda"."""
    return "hip" if rocm_build() else "cuda"


def select_tile(head_dim: int, k_as_v: bool, decode: bool, vendor_name: str) -> Tile:
    """The tile for `head_dim` (a power of two, 32..512) in a decode-only or a prefill step."""
    if head_dim & (head_dim - 1) or not 32 <= head_dim <= 512:
        raise ValueError(f"head_dim must be a power of two in [32, 512], not {head_dim}")
    table = _TILES[vendor_name]
    bound = min(bound for bound, _ in table if bound >= head_dim)
    decode_tile, prefill_tile = table[bound, k_as_v]
    return decode_tile if decode else prefill_tile


def tile_rows(tile: Tile, group: int) -> int:
    """Rows of the query tile: the table's, widened to hold every query head of one KV head."""
    return max(tile.block_m, triton.next_power_of_2(group))


def choose_num_splits(programs: int, max_keys: int) -> int:
    """Split-K factor from static shapes: 1 when `programs` (query tiles x KV heads) already fill the
    GPU, else the power of two (at most `MAX_SPLITS`) that brings them to about `TARGET_PROGRAMS`,
    limited so each split keeps `MIN_KEYS_PER_SPLIT` of the `max_keys` a tile may read."""
    wanted = min(MAX_SPLITS, -(-TARGET_PROGRAMS // max(programs, 1)), max(1, max_keys // MIN_KEYS_PER_SPLIT))
    return 1 << (wanted.bit_length() - 1)


# ---------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _find_tile(cu_query_ptr, num_seqs, pid, tokens_per_tile):
    """(sequence, its tile index) of program `pid`: sequence `s`'s tiles start at
    `cu_query[s] // tokens_per_tile + s` (strictly increasing in `s`), binary-searched."""
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        start = tl.load(cu_query_ptr + mid) // tokens_per_tile + mid
        lo = tl.where(start <= pid, mid, lo)
        hi = tl.where(start <= pid, hi, mid)
    return lo, pid - (tl.load(cu_query_ptr + lo) // tokens_per_tile + lo)


# pi/2 = _PIO2_HI + _PIO2_MID + _PIO2_LO, the first two short (12 and 10 significant bits) so that
# their products with either 10-bit half of a quadrant count are exact in fp32, fused or not.
_PIO2_HI = tl.constexpr(1.57080078125)
_PIO2_MID = tl.constexpr(-4.455447196960449e-06)
_PIO2_LO = tl.constexpr(9.920935184482005e-10)


@triton.jit
def _sincos(angle):
    """fp32 (sin, cos) of `angle`, within ~1e-7 of the correctly rounded values for |angle| < 1.6e6.

    Not `tl.sin`/`tl.cos`: libdevice's large-argument path uses a stack array (CUDA), and RoPE angles
    reach 1e5 and more. Cody-Waite reduction by pi/2 (exact for |quadrant| < 2^20), then minimax
    polynomials on [-pi/4, pi/4] and the quadrant's symmetry.
    """
    x = tl.abs(angle)  # (the reduction is exact for x >= 0; sin is odd, cos even)
    quadrant = tl.floor(x * 0.6366197723675814 + 0.5)
    k = quadrant.to(tl.int32)
    k_hi = (k & -1024).to(tl.float32)
    k_lo = (k & 1023).to(tl.float32)
    r = x - k_hi * _PIO2_HI
    r = r - k_lo * _PIO2_HI
    r = r - k_hi * _PIO2_MID
    r = r - k_lo * _PIO2_MID
    r = r - quadrant * _PIO2_LO
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    odd = (k & 1) != 0
    sin = tl.where(odd, cos_r, sin_r)
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where(((k & 2) != 0) ^ (angle < 0), -sin, sin)
    cos = tl.where(((k + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def _tile_ptrs(base_ptr, row_offsets, cols):
    """Pointers to a `[rows, len(cols)]` tile whose rows are 16-byte aligned runs of 16+ contiguous
    elements (the launcher checks the base pointers and strides), so loads and stores vectorise."""
    return tl.max_contiguous(tl.multiple_of(base_ptr + row_offsets[:, None] + cols[None, :], [1, 16]), [1, 16])


@triton.jit
def _rotated_scores(q_ptr, q_rows, row_valid, value_ptr, slots, key_valid, key_pos, key_scale_ptr, inv_freq_ptr,
                    HALF: tl.constexpr, CHUNK: tl.constexpr):
    """K-as-V scores `q . RoPE(values * key_scale)` of a key tile, fp32 `[rows, keys]`.

    Walks the rotate_half pairs (column d with d + D/2) in chunks of `CHUNK`: both halves of a chunk
    share their angles (so sin/cos are computed for D/2 columns), and only `[keys, CHUNK]` tiles are
    live at a time; the scores are the sum of both halves' dots over the chunks.
    """
    scores = tl.zeros([q_rows.shape[0], key_pos.shape[0]], dtype=tl.float32)
    for start in range(0, HALF, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        x1 = tl.load(_tile_ptrs(value_ptr, slots, cols), mask=key_valid[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(_tile_ptrs(value_ptr, slots, cols + HALF), mask=key_valid[:, None], other=0.0).to(tl.float32)
        x1 = x1 * tl.load(key_scale_ptr + cols).to(tl.float32)[None, :]
        x2 = x2 * tl.load(key_scale_ptr + HALF + cols).to(tl.float32)[None, :]
        sin, cos = _sincos(key_pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + cols)[None, :])
        k1 = (x1 * cos - x2 * sin).to(value_ptr.dtype.element_ty)  # rotate_half: [x1, x2] -> [-x2, x1]
        k2 = (x2 * cos + x1 * sin).to(value_ptr.dtype.element_ty)
        q1 = tl.load(_tile_ptrs(q_ptr, q_rows, cols), mask=row_valid[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(_tile_ptrs(q_ptr, q_rows, cols + HALF), mask=row_valid[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q1.to(value_ptr.dtype.element_ty), tl.trans(k1), scores)
        scores = tl.dot(q2.to(value_ptr.dtype.element_ty), tl.trans(k2), scores)
    return scores


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    key_ptr,
    value_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    block_table_ptr,
    query_start_ptr,
    query_len_ptr,
    context_len_ptr,
    cu_query_ptr,
    padding_rows_ptr,
    span_ptr,
    key_scale_ptr,
    inv_freq_ptr,
    num_seqs,
    num_tokens,
    num_heads,
    group,
    window,
    block_size,
    table_cols,
    stride_q_token,
    stride_q_head,
    stride_cache_block,
    stride_cache_pos,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_AS_V: tl.constexpr,
    SPANS: tl.constexpr,
    ROPE_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    tokens_per_tile = BLOCK_M // group

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_token = rows // group  # token of the tile each row holds
    row_head = kv_head * group + rows % group
    row_in_tile = rows < tokens_per_tile * group

    seq, tile = _find_tile(cu_query_ptr, num_seqs, pid, tokens_per_tile)
    tail_start = tl.load(cu_query_ptr + num_seqs) // tokens_per_tile + num_seqs
    if pid >= tail_start:
        # After the last sequence's slots: zero a share of the padded tokens' rows.
        if split == 0:
            pad_index = (pid - tail_start) * tokens_per_tile + row_token
            pad_row = tl.load(padding_rows_ptr + pad_index, mask=row_in_tile & (pad_index < num_tokens), other=-1)
            out_rows = (pad_row.to(tl.int64) * num_heads + row_head) * HEAD_DIM
            zeros = tl.zeros([BLOCK_M, HEAD_DIM], dtype=out_ptr.dtype.element_ty)
            tl.store(_tile_ptrs(out_ptr, out_rows, cols), zeros, mask=(pad_row >= 0)[:, None])
        return
    query_len = tl.load(query_len_ptr + seq)
    if tile * tokens_per_tile >= query_len:
        return
    query_start = tl.load(query_start_ptr + seq)
    context_len = tl.load(context_len_ptr + seq)
    first_query_pos = context_len - query_len

    # The tile's queries [BLOCK_M, HEAD_DIM].
    query_offset = tile * tokens_per_tile + row_token
    row_valid = row_in_tile & (query_offset < query_len)
    query_pos = first_query_pos + query_offset
    token_row = (query_start + query_offset).to(tl.int64)
    q_rows = token_row * stride_q_token + row_head * stride_q_head
    if not K_AS_V:  # (K-as-V tiles read the queries chunk by chunk)
        q = tl.load(_tile_ptrs(q_ptr, q_rows, cols), mask=row_valid[:, None], other=0.0).to(tl.float32)
        q = q.to(value_ptr.dtype.element_ty)

    # Keys the tile may see: [the first query's window start, the last query] (+ spans: the context end).
    last_offset = tl.minimum(tile * tokens_per_tile + tokens_per_tile, query_len) - 1
    key_lo = tl.maximum(first_query_pos + tile * tokens_per_tile - window + 1, 0)
    key_hi = first_query_pos + last_offset + 1
    if SPANS:
        span_q = tl.load(span_ptr + token_row, mask=row_valid, other=-1)
        if tl.max(span_q, axis=0) >= 0:
            key_hi = context_len
    first_step = key_lo // BLOCK_N
    steps = tl.cdiv(key_hi - first_step * BLOCK_N, BLOCK_N)
    steps_per_split = tl.cdiv(steps, num_splits)
    step_begin = first_step + split * steps_per_split
    step_end = tl.minimum(step_begin + steps_per_split, first_step + steps)

    LOG2E: tl.constexpr = 1.4426950408889634
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_row = block_table_ptr + seq * table_cols
    for step in range(step_begin, step_end):
        key_pos = step * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = (key_pos >= key_lo) & (key_pos < key_hi)
        block = tl.load(table_row + key_pos // block_size, mask=key_valid, other=0)
        slots = block.to(tl.int64) * stride_cache_block + (key_pos % block_size) * stride_cache_pos
        slots += kv_head * stride_cache_head
        if K_AS_V:
            scores = _rotated_scores(
                q_ptr, q_rows, row_valid, value_ptr, slots, key_valid, key_pos, key_scale_ptr, inv_freq_ptr,
                HEAD_DIM // 2, ROPE_CHUNK,
            )
        else:
            keys = tl.load(_tile_ptrs(key_ptr, slots, cols), mask=key_valid[:, None], other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(keys.to(value_ptr.dtype.element_ty)))
        scores *= LOG2E  # [BLOCK_M, BLOCK_N], in log2 units
        values = tl.load(_tile_ptrs(value_ptr, slots, cols), mask=key_valid[:, None], other=0.0).to(tl.float32)

        visible = key_pos[None, :] <= query_pos[:, None]
        if SPANS:
            key_offset = key_pos - first_query_pos
            span_k = tl.load(span_ptr + query_start + key_offset, mask=(key_offset >= 0) & key_valid, other=-1)
            visible |= (span_q[:, None] == span_k[None, :]) & (span_q[:, None] >= 0)
        visible &= (query_pos[:, None] - key_pos[None, :] < window) & key_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet stay at 0
        probs = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(
            probs.to(value_ptr.dtype.element_ty), values.to(value_ptr.dtype.element_ty)
        )
        row_max = new_max

    head_rows = token_row * num_heads + row_head  # (token, head) index of each row
    if num_splits == 1:
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        out_ptrs = _tile_ptrs(out_ptr, head_rows * HEAD_DIM, cols)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        part_rows = split * num_tokens * num_heads + head_rows
        tl.store(part_max_ptr + part_rows, row_max, mask=row_valid)
        tl.store(part_sum_ptr + part_rows, row_sum, mask=row_valid)
        tl.store(_tile_ptrs(part_acc_ptr, part_rows * HEAD_DIM, cols), acc, mask=row_valid[:, None])


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    token_real_ptr,
    num_tokens,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
):
    """One (token, head): merge the splits' partials (fp32), `out = sum_s w_s acc_s / sum_s w_s sum_s`
    with `w_s = 2^(max_s - max)`. Padded tokens are skipped (the attention kernel zeroed them)."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(token_real_ptr + token) == 0:
        return
    cols = tl.arange(0, HEAD_DIM)
    total_max = float("-inf")
    for s in range(num_splits):
        row = (s * num_tokens + token).to(tl.int64) * num_heads + head
        total_max = tl.maximum(total_max, tl.load(part_max_ptr + row))
    total_sum = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in range(num_splits):
        row = (s * num_tokens + token).to(tl.int64) * num_heads + head
        weight = tl.exp2(tl.load(part_max_ptr + row) - total_max)
        total_sum += weight * tl.load(part_sum_ptr + row)
        acc += weight * tl.load(part_acc_ptr + row * HEAD_DIM + cols)
    out_row = token.to(tl.int64) * num_heads + head
    tl.store(out_ptr + out_row * HEAD_DIM + cols, (acc / total_sum).to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------
# Configurations: what the launcher picks, and what is shipped (the same function builds both).

_ATTENTION_INT_ARGS = (
    "num_seqs", "num_tokens", "num_heads", "group", "window", "block_size", "table_cols",
    "stride_q_token", "stride_q_head", "stride_cache_block", "stride_cache_pos", "stride_cache_head",
)


def _attention_signature(dtype: torch.dtype) -> dict[str, str]:
    data = POINTER_TYPES[str(dtype).removeprefix("torch.")]
    pointers = {
        "q_ptr": data, "key_ptr": data, "value_ptr": data, "out_ptr": data,
        "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
        "block_table_ptr": "*i32", "query_start_ptr": "*i32", "query_len_ptr": "*i32", "context_len_ptr": "*i32",
        "cu_query_ptr": "*i32", "padding_rows_ptr": "*i32", "span_ptr": "*i32",
        "key_scale_ptr": data, "inv_freq_ptr": "*fp32",
    }
    constexprs = dict.fromkeys(("HEAD_DIM", "BLOCK_M", "BLOCK_N", "K_AS_V", "SPANS", "ROPE_CHUNK"), "constexpr")
    return {**pointers, **dict.fromkeys(_ATTENTION_INT_ARGS, "i32"), **constexprs}


def attention_config(
    head_dim: int, group: int, decode: bool, k_as_v: bool, spans: bool, dtype: torch.dtype, vendor_name: str
) -> KernelConfig:
    """The attention kernel's compilation for a layer kind and step kind."""
    tile = select_tile(head_dim, k_as_v, decode, vendor_name)
    constexprs = {
        "HEAD_DIM": head_dim, "BLOCK_M": tile_rows(tile, group), "BLOCK_N": tile.block_n,
        "K_AS_V": k_as_v, "SPANS": spans, "ROPE_CHUNK": min(ROPE_CHUNK, head_dim // 2) if k_as_v else 0,
    }
    name = (
        f"paged_attention[d={head_dim},m={constexprs['BLOCK_M']},n={tile.block_n},kv={'v' if k_as_v else 'kv'},"
        f"spans={int(spans)},w={tile.num_warps},s={tile.num_stages},{str(dtype).removeprefix('torch.')}]"
    )
    return KernelConfig(
        name, _paged_attention_kernel, _attention_signature(dtype), constexprs, tile.num_warps, tile.num_stages
    )


def combine_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """The split-K combine kernel's compilation for `head_dim`."""
    data = POINTER_TYPES[str(dtype).removeprefix("torch.")]
    signature = {
        "out_ptr": data, "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
        "token_real_ptr": "*i32", "num_tokens": "i32", "num_heads": "i32", "num_splits": "i32",
        "HEAD_DIM": "constexpr",
    }
    name = f"paged_attention_combine[d={head_dim},{str(dtype).removeprefix('torch.')}]"
    return KernelConfig(name, _combine_splits_kernel, signature, {"HEAD_DIM": head_dim}, COMBINE_WARPS, 1)


def shipped_configs() -> list[KernelConfig]:
    """Every compilation the launcher picks for the real models (`REAL_LAYERS`, GQA up to 8 query
    heads per KV head, so the table's rows), bf16 and fp16, both vendors' tables, deduplicated."""
    configs: dict[tuple[Any, ...], KernelConfig] = {}
    for vendor_name in _TILES:
        for dtype in SHIPPED_DTYPES:
            for head_dim, k_as_v, spans in REAL_LAYERS:
                for decode in (True, False):
                    if decode and spans:
                        continue  # a decode-only step has no span to attend through
                    cfg = attention_config(head_dim, 8, decode, k_as_v, spans, dtype, vendor_name)
                    configs.setdefault(_config_key(cfg), cfg)
            for head_dim in sorted({d for d, _, _ in REAL_LAYERS}):
                cfg = combine_config(head_dim, dtype)
                configs.setdefault(_config_key(cfg), cfg)
    return list(configs.values())


def _config_key(cfg: KernelConfig) -> tuple[Any, ...]:
    return (cfg.kernel, tuple(cfg.signature.items()), tuple(cfg.constexprs.items()), cfg.num_warps, cfg.num_stages)


# ---------------------------------------------------------------------------------------------------
# The plan (once per cache group per step) and the launcher.


@dataclass(frozen=True)
class AttentionPlan:
    """A cache group's per-step inputs of the kernel: int32 device tensors and static sizes."""

    block_table: torch.Tensor  # [S, cols]
    query_start: torch.Tensor  # [S]
    query_len: torch.Tensor  # [S]
    context_len: torch.Tensor  # [S]
    cu_query_len: torch.Tensor  # [S + 1] query tokens of the sequences before each (sequence order)
    padding_rows: torch.Tensor  # [T] flat rows of the padded tokens, then -1
    token_real: torch.Tensor  # [T] 1 for real tokens
    span_ids: torch.Tensor | None  # [T] (-1 outside spans) where the group attends through spans
    key_inv_freq: torch.Tensor | None  # [D/2] fp32, K-as-V groups
    slot_mapping: torch.Tensor  # [T] cache slot each token writes (`ops.paged_attention.write_kv`)
    block_size: int
    sliding_window: int | None
    max_query_len: int  # the longest query grid: 1 in a decode-only step


def attention_plan(
    layout: SequenceLayout,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    *,
    block_size: int,
    sliding_window: int | None,
    key_inv_freq: torch.Tensor | None = None,
    spans: bool = False,
) -> AttentionPlan:
    """The kernel's plan of one cache group for a step (same arguments as `ops.paged_attention.group_metadata`).

    A few small shape-static torch ops: int32 copies, the cumulative query lengths the kernel's
    tile search reads, and the padded tokens' rows (a stable sort puts them first).
    """
    real = layout.token_mask != 0
    order = torch.argsort(real.to(torch.int8), stable=True)
    padding_rows = torch.where(real[order], -1, order)
    query_len = layout.query_len.to(torch.int32)
    cu_query_len = torch.cat([query_len.new_zeros(1), torch.cumsum(query_len, 0, dtype=torch.int32)])
    with_spans = spans and layout.span_ids is not None
    return AttentionPlan(
        block_table=block_table.to(torch.int32),
        query_start=layout.query_start.to(torch.int32),
        query_len=query_len,
        context_len=layout.context_len.to(torch.int32),
        cu_query_len=cu_query_len,
        padding_rows=padding_rows.to(torch.int32),
        token_real=real.to(torch.int32),
        span_ids=layout.span_ids.to(torch.int32) if with_spans else None,
        key_inv_freq=None if key_inv_freq is None else key_inv_freq.float(),
        slot_mapping=slot_mapping(layout, positions, block_table, block_size),
        block_size=block_size,
        sliding_window=sliding_window,
        max_query_len=max(q for _, q in layout.grids),
    )


def _check_tile_aligned(name: str, tensor: torch.Tensor) -> None:
    """What `_tile_ptrs` promises the compiler: rows of head_dim contiguous elements starting 16-byte aligned."""
    size = tensor.element_size()
    strides = tensor.stride()
    if strides[-1] != 1 or tensor.data_ptr() % 16 or any(stride * size % 16 for stride in strides[:-1]):
        raise ValueError(f"{name} must have contiguous, 16-byte aligned rows (strides {strides})")


@torch.library.custom_op("gemma4::paged_attention", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    key_cache: Optional[torch.Tensor],
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start: torch.Tensor,
    query_len: torch.Tensor,
    context_len: torch.Tensor,
    cu_query_len: torch.Tensor,
    padding_rows: torch.Tensor,
    token_real: torch.Tensor,
    span_ids: Optional[torch.Tensor],
    key_scale: Optional[torch.Tensor],
    key_inv_freq: Optional[torch.Tensor],
    sliding_window: int,
    decode: bool,
    num_splits: int,
) -> torch.Tensor:
    """The launch (see the module docstring); `sliding_window` 0 = full attention, `num_splits` 0 = heuristic."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = value_cache.shape
    group = num_heads // kv_heads
    k_as_v = key_cache is None
    if k_as_v and (key_scale is None or key_inv_freq is None):
        raise ValueError("K-as-V layers need key_scale and a plan built with key_inv_freq")
    if key_cache is not None and key_cache.stride() != value_cache.stride():
        raise ValueError("key and value caches must have the same layout")
    if q.dtype != value_cache.dtype:
        raise ValueError(f"q is {q.dtype}, the cache {value_cache.dtype}")
    for name, tensor in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor is not None:
            _check_tile_aligned(name, tensor)
    num_seqs, table_cols = block_table.shape
    spans = span_ids is not None and not decode
    cfg = attention_config(head_dim, group, decode, k_as_v, spans, value_cache.dtype, vendor())
    block_m, block_n = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    tokens_per_tile = block_m // group
    window = sliding_window or NO_WINDOW
    if num_splits == 0:
        max_keys = table_cols * block_size
        if sliding_window and not spans:
            max_keys = min(max_keys, sliding_window + tokens_per_tile + block_n)
        num_splits = choose_num_splits(triton.cdiv(num_tokens, tokens_per_tile) * kv_heads, max_keys)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    parts = (num_splits, num_tokens, num_heads)
    part_acc = q.new_empty((*parts, head_dim) if num_splits > 1 else (1,), dtype=torch.float32)
    part_max = q.new_empty(parts if num_splits > 1 else (1,), dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    grid = (triton.cdiv(num_tokens, tokens_per_tile) + num_seqs, kv_heads, num_splits)
    _paged_attention_kernel[grid](
        q, value_cache if k_as_v else key_cache, value_cache, out,
        part_acc, part_max, part_sum,
        block_table, query_start, query_len, context_len, cu_query_len, padding_rows,
        padding_rows if span_ids is None else span_ids,
        (value_cache if key_scale is None else key_scale.to(value_cache.dtype)),
        part_max if key_inv_freq is None else key_inv_freq,
        num_seqs, num_tokens, num_heads, group, window, block_size, table_cols,
        q.stride(0), q.stride(1), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        combine = combine_config(head_dim, value_cache.dtype)
        _combine_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_max, part_sum, token_real, num_tokens, num_heads, num_splits,
            **combine.constexprs, num_warps=combine.num_warps, num_stages=combine.num_stages,
        )
    return out


@_paged_attention_op.register_fake
def _(q: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor,
    plan: AttentionPlan,
    key_scale: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attend every step query `q [T, heads, D]` to the keys its sequence may see; `[T, heads, D]` in q's dtype.

    Same contract as `ops.paged_attention.paged_attention` (K-as-V layers pass `key_cache=None` and
    `key_scale`, with a plan built with `key_inv_freq`); rows of padded tokens are zeros.
    `num_splits` overrides the split-K heuristic (tests).
    """
    if plan.block_size != value_cache.shape[1]:
        raise ValueError(f"plan for block_size {plan.block_size}, cache blocks of {value_cache.shape[1]}")
    return torch.ops.gemma4.paged_attention(
        q, key_cache, value_cache, plan.block_table, plan.query_start, plan.query_len, plan.context_len,
        plan.cu_query_len, plan.padding_rows, plan.token_real, plan.span_ids, key_scale, plan.key_inv_freq,
        plan.sliding_window or 0, plan.max_query_len == 1, num_splits or 0,
    )
