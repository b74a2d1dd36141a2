"""Sampling as batched tensor work: penalties, the stop-token mask, filters, counter-based noise, the draw.

Every function takes per-row parameters as tensors, so one call serves a whole batch with mixed
settings, and none reads a value back to the host. Filters run on candidates sorted by logit (the
top-k of each row, or the whole sorted vocabulary when a row has no top-k), which equals filtering
the full vocabulary because everything outside the top-k has probability zero. The draw is an
exponential race: token `argmax(p / E)` with `E ~ Exp(1)` is distributed as `p`, and each `E` comes
from a hash of (row key, token id), so a row's draw depends on its seed, its output index and its own
logits only, whatever the batch around it or the candidate set it was computed on.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch integers are signed)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplies): a bijection that scrambles every bit."""
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Scrambled request seeds (int64), computed once per request so that nearby seeds share nothing."""
    return mix64(seeds + _signed(_GOLDEN_GAMMA))


def row_keys(keys: torch.Tensor, output_index: torch.Tensor) -> torch.Tensor:
    """One key per row from its request's `seed_keys` and the index of the token being drawn (int64 `[M]`)."""
    return mix64(keys ^ output_index)


def exponential_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`Exp(1)` noise `[M, K]` (fp32) for the candidates `token_ids [M, K]` of rows with `keys [M]`.

    Element (i, j) is the `token_ids[i, j]`-th value of a splitmix64 stream started at `keys[i]`, so the
    noise of a token is the same whichever candidates surround it; 53 bits make a uniform in (0, 1).
    """
    bits = mix64(keys[:, None] + token_ids.to(torch.int64) * _signed(_GOLDEN_GAMMA))
    uniform = (_shr(bits, 11).to(torch.float64) + 0.5) * 2.0**-53
    return (-torch.log(uniform)).to(torch.float32)


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of `logits [M, V]`.

    `seen [M, V]` (bool) marks prompt + output tokens, for the repetition penalty (positive logits
    divided, negative ones multiplied); `counts [M, V]` counts output tokens, for
    `logit - (frequency * count + presence * (count > 0))`. Penalties `[M]`; neutral values change nothing.
    """
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    counts = counts.to(logits.dtype)
    return logits - (frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype))


def record_tokens(
    seen: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor, is_output: torch.Tensor
) -> None:
    """Add tokens to penalty state in place: each `(rows[t], token_ids[t])` becomes seen and, for
    output tokens (`is_output[t]`), is counted once more."""
    seen[rows, token_ids] = True
    counts.index_put_((rows, token_ids), is_output.to(counts.dtype), accumulate=True)


def mask_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Copy of `logits` with each `(rows[t], token_ids[t])` set to -inf (stop ids before `min_tokens`)."""
    logits = logits.clone()
    logits[rows, token_ids] = float("-inf")
    return logits


def filtered_probs(
    sorted_logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Probabilities `[M, K]` over candidates sorted by descending logit, after temperature, top-k,
    top-p and min-p (zero where filtered out; not renormalised: the draw does not need it).

    `top_k [M]` (int, at most K) keeps that many candidates; top-p keeps the smallest prefix whose
    mass reaches `top_p`; min-p drops what is below `min_p` times the largest probability.
    """
    k = sorted_logits.shape[-1]
    beyond_k = torch.arange(k, device=sorted_logits.device)[None, :] >= top_k[:, None]
    scaled = (sorted_logits / temperature[:, None]).masked_fill(beyond_k, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)


def race(probs: torch.Tensor, token_ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from the (unnormalised) `probs [M, K]` over `token_ids [M, K]`: the
    candidate with the largest `p / E`, `E` the row's exponential noise for that token."""
    choice = torch.argmax(probs / exponential_noise(keys, token_ids), dim=-1, keepdim=True)
    return token_ids.gather(1, choice).squeeze(1)


def draw(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """One token per row (int64 `[M]`) drawn from `logits [M, V]` (fp32) after its filters.

    Candidates are each row's best `k` logits (`k` at least every row's `top_k`; `k >= V`: the whole
    sorted row), filtered by `filtered_probs` (`top_k >= V` means no top-k) and raced with the row
    `keys` (`row_keys`). Temperatures must be positive: greedy rows take the argmax elsewhere.
    """
    vocab = logits.shape[-1]
    if k < vocab:
        candidates, ids = torch.topk(logits, k, dim=-1)
    else:
        candidates, ids = torch.sort(logits, dim=-1, descending=True)
    probs = filtered_probs(candidates, top_k, temperature, top_p, min_p)
    return race(probs, ids, keys)
