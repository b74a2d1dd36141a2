"""The sampler's draw (top-k, top-p, min-p, then the seeded exponential race) without sorting a row.

Same tokens as `gemma4.ops.sampling.draw`, which sorts (or top-k's) each row of 262,144 logits; here
one program owns one row and streams it in chunks of `BLOCK` logits several times, keeping only scalars
between passes (a row is 1 MiB, so the re-reads come from L2):

1. the row's largest logit, hence the softmax shift `m = max / temperature`;
2. top-k (rows with `top_k < V`): the k-th largest logit, by a radix select on the logits' fp32 bit
   patterns mapped to uint32 keys in the floats' order. Each pass settles `RADIX_BITS` bits of the
   threshold: it counts, for the 2^RADIX_BITS candidate thresholds that extend the bits settled so
   far, how many logits reach each (a `[BLOCK, 2^RADIX_BITS]` comparison tile), and keeps the largest
   candidate still reached by `top_k` logits. 32 / RADIX_BITS passes give the exact key;
3. the softmax denominator over the logits at or above the top-k threshold (the reference
   normalises within the top-k set before top-p);
4. top-p (rows with `top_p < 1`): the same radix select, weighting each logit by its probability: the
   largest threshold whose kept mass still reaches `top_p`. The reference keeps a sorted candidate
   while the mass strictly before it is below `top_p`, i.e. down to and including the first token at
   which the running mass reaches `top_p`, which is exactly that threshold;
5. the race: among tokens at or above both thresholds with `p >= min_p * p_max`, the largest
   `p / E`, `E` the splitmix64 exponential noise of (row key, token id), bit for bit the reference's
   (wrapping uint64 multiplies, logical shifts, the uniform and `-log` in float64). The float64 log is
   costly on a GPU, so a chunk computes it only if some kept token could beat the best score so far,
   judged from a lower bound of `E` (`-log u >= 1 - u`, from the top 24 bits of the uniform).

Passes over chunks that cannot change a count (no key above the lowest candidate) skip the tile work.
Selecting on the raw logits keeps the reference's candidate order (sorted by logit, not by the
temperature-scaled value, which can tie where the logits do not). Where logits tie, the kernel keeps
every token tied at a threshold and breaks race ties by the lower token id; the reference keeps
exactly `top_k` tokens in `torch.topk`'s order and takes the first in sorted order. Rows with
`top_p >= 1` skip top-p outright (the reference's fp32 running mass can reach 1 a few ulps early and
then drop a tail of total mass ~1e-7).

Grid: one program per row; no value is read back to the host. fp32 logits only (the sampler's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma4.kernels.configs import POINTER_TYPES, KernelConfig
from gemma4.ops import sampling as reference

# Gemma 4's vocabulary: the size shipped configs are compiled for.
SHIPPED_VOCAB = 262_144
# Threshold bits settled per radix pass: 16 candidate thresholds per pass, 8 passes per selection.
RADIX_BITS = 4
# Chunk length on the GPU; a [BLOCK, 2^RADIX_BITS] fp32 comparison tile over 8 warps stays in registers.
_MAX_BLOCK = 2048
_NUM_WARPS = 8
# Shortest chunk, for tiny vocabularies.
_MIN_BLOCK = 16

_GOLDEN_GAMMA = tl.constexpr(reference._GOLDEN_GAMMA)
_MIX1 = tl.constexpr(reference._MIX1)
_MIX2 = tl.constexpr(reference._MIX2)


def block_for(vocab_size: int) -> int:
    """Chunk length for a vocabulary: `_MAX_BLOCK`, or a quarter of a smaller row (rounded up to a power
    of two), so that small rows still stream through several chunks like the real one does."""
    return max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(vocab_size) // 4))


@triton.jit
def _order_keys(x):
    """uint32 keys of fp32 values whose unsigned order is the floats' order (negatives bit-flipped,
    positives with the sign bit set)."""
    bits = x.to(tl.int32, bitcast=True)
    flip = (bits >> 31) | -2147483648  # arithmetic shift: all ones for negatives, else the sign bit
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _load_chunk(row_ptr, start, V: tl.constexpr, BLOCK: tl.constexpr):
    """Token ids, in-row mask and logits (-inf past the row) of the chunk at `start`."""
    tokens = start + tl.arange(0, BLOCK)
    valid = tokens < V
    logits = tl.load(row_ptr + tokens, mask=valid, other=float("-inf"))
    return tokens, valid, logits


@triton.jit
def _weights(logits, valid, floor, shift, temperature, MASS: tl.constexpr):
    """Per-logit weight within the kept set (keys >= floor): 1 (a count) or the unnormalised
    probability `exp(logit / temperature - shift)`; 0 outside it."""
    kept = valid & (_order_keys(logits) >= floor)
    if MASS:
        return tl.where(kept, tl.exp(logits / temperature - shift), 0.0)
    else:
        return tl.where(kept, 1.0, 0.0)


@triton.jit
def _radix_select(row_ptr, floor, target, shift, temperature, MASS: tl.constexpr, V: tl.constexpr,
                  BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The largest uint32 key `t` whose weight `W(t)` (count or mass of kept logits with key >= t)
    reaches `target`, or 0 when even the whole kept set falls short; exact, as weights of nested sets
    are computed by the same reduction (so `W` never increases with `t`)."""
    RADIX: tl.constexpr = 1 << RADIX_BITS
    digits = tl.arange(0, RADIX).to(tl.uint32)
    prefix = tl.full((), 0, tl.uint32)
    for level in range(32 // RADIX_BITS):
        step = tl.cast(32 - RADIX_BITS * (level + 1), tl.uint32)
        candidates = prefix + (digits << step)
        lowest = prefix + (tl.full((), 1, tl.uint32) << step)
        reach = tl.zeros([RADIX], tl.float32)
        for start in range(0, V, BLOCK):
            _, valid, logits = _load_chunk(row_ptr, start, V, BLOCK)
            keys = _order_keys(logits)
            weights = _weights(logits, valid, floor, shift, temperature, MASS)
            if tl.max(((weights > 0) & (keys >= lowest)).to(tl.int32), axis=0) > 0:
                reach += tl.sum(tl.where(keys[:, None] >= candidates[None, :], weights[:, None], 0.0), axis=0)
        taken = tl.max(tl.where((digits > 0) & (reach >= target), digits, 0), axis=0)
        prefix = prefix + (taken.to(tl.uint32) << step)
    return prefix


@triton.jit
def _noise_bits(row_key, tokens):
    """splitmix64's finaliser of `row_key + token * golden gamma`, in wrapping uint64 (logical shifts)."""
    x = row_key.to(tl.uint64, bitcast=True) + tokens.to(tl.uint64) * _GOLDEN_GAMMA
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    return x ^ (x >> 31)


@triton.jit
def _sample_draw_kernel(logits_ptr, top_k_ptr, temperature_ptr, top_p_ptr, min_p_ptr, keys_ptr, tokens_ptr,
                        row_stride, V: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """One row's token: max, top-k select, denominator, top-p select, then the race (module docstring)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    top_k = tl.load(top_k_ptr + row)
    temperature = tl.load(temperature_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    row_key = tl.load(keys_ptr + row)

    largest = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        _, _, logits = _load_chunk(row_ptr, start, V, BLOCK)
        largest = tl.maximum(largest, logits)
    shift = tl.max(largest, axis=0) / temperature

    floor = tl.full((), 0, tl.uint32)
    if top_k < V:
        floor = _radix_select(row_ptr, floor, top_k.to(tl.float32), shift, temperature, False, V, BLOCK, RADIX_BITS)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        _, valid, logits = _load_chunk(row_ptr, start, V, BLOCK)
        total += _weights(logits, valid, floor, shift, temperature, True)
    denominator = tl.sum(total, axis=0)
    if top_p < 1.0:
        floor = tl.maximum(
            floor, _radix_select(row_ptr, floor, top_p * denominator, shift, temperature, True, V, BLOCK, RADIX_BITS)
        )
    inv_denominator = 1.0 / denominator

    min_prob = min_p * inv_denominator  # min_p times the largest probability, exp(0) / denominator
    best_score = tl.full((), -1.0, tl.float32)
    best_token = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        tokens, valid, logits = _load_chunk(row_ptr, start, V, BLOCK)
        probs = _weights(logits, valid, floor, shift, temperature, True) * inv_denominator
        kept = valid & (_order_keys(logits) >= floor) & (probs >= min_prob)
        bits = _noise_bits(row_key, tokens)
        # 1 - u >= (2^24 - 1 - top 24 bits of u) / 2^24 and E = -log(u) >= 1 - u; 0.999 covers the roundings.
        least_noise = (16777215 - (bits >> 40).to(tl.int32)).to(tl.float32) * (0.999 / 16777216)
        if tl.max((kept & (probs >= best_score * least_noise)).to(tl.int32), axis=0) > 0:
            uniform = ((bits >> 11).to(tl.float64) + 0.5) * 2.0**-53
            noise = (-tl.log(uniform)).to(tl.float32)
            scores = tl.where(kept, probs / noise, -1.0)
            chunk_best = tl.max(scores, axis=0)
            if chunk_best > best_score:
                best_token = start + tl.argmax(scores, axis=0)
                best_score = chunk_best
    tl.store(tokens_ptr + row, best_token.to(tl.int64))


_SIGNATURE = {
    "logits_ptr": POINTER_TYPES["float32"],
    "top_k_ptr": "*i64",
    "temperature_ptr": "*fp32",
    "top_p_ptr": "*fp32",
    "min_p_ptr": "*fp32",
    "keys_ptr": "*i64",
    "tokens_ptr": "*i64",
    "row_stride": "i32",
    "V": "constexpr",
    "BLOCK": "constexpr",
    "RADIX_BITS": "constexpr",
}


def _config(vocab_size: int) -> KernelConfig:
    """The one compilation the launcher uses for a vocabulary (the same on both vendors)."""
    block = block_for(vocab_size)
    return KernelConfig(
        name=f"sample_draw[v={vocab_size},block={block},radix={RADIX_BITS},fp32]",
        kernel=_sample_draw_kernel,
        signature=_SIGNATURE,
        constexprs={"V": vocab_size, "BLOCK": block, "RADIX_BITS": RADIX_BITS},
        num_warps=_NUM_WARPS,
        num_stages=1,
    )


def shipped_configs() -> list[KernelConfig]:
    """Gemma 4's vocabulary, fp32 logits: what the sampler launches."""
    return [_config(SHIPPED_VOCAB)]


@torch.library.custom_op("gemma4::sample_draw", mutates_args=())
def _sample_draw(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
) -> torch.Tensor:
    """Launch one program per row; the parameters are made contiguous (the sampler passes table columns)."""
    if logits.dtype != torch.float32:
        raise ValueError(f"sample_draw takes fp32 logits, got {logits.dtype}")
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return tokens
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    cfg = _config(vocab)
    _sample_draw_kernel[(rows,)](
        logits,
        top_k.to(torch.int64).contiguous(),
        temperature.to(torch.float32).contiguous(),
        top_p.to(torch.float32).contiguous(),
        min_p.to(torch.float32).contiguous(),
        keys.to(torch.int64).contiguous(),
        tokens,
        logits.stride(0),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **cfg.constexprs,
    )
    return tokens


@_sample_draw.register_fake
def _(logits, top_k, temperature, top_p, min_p, keys) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def draw(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """`gemma4.ops.sampling.draw` without the sort: tokens `[M]` (int64) from fp32 `logits [M, V]`.

    `k` (the reference's candidate count) is not needed: the kernel filters the whole row.
    `top_k >= V` means no top-k; `top_k >= 1`, `temperature > 0`, `0 < top_p <= 1`, `0 <= min_p <= 1`.
    """
    del k
    return torch.ops.gemma4.sample_draw(logits, top_k, temperature, top_p, min_p, keys)
