"""Token bitmasks: one bit per vocabulary id (bit `t % 32` of int32 word `t // 32`), 1 = allowed.

Filled on the host by the grammar library, copied to the logits' device and applied there with plain
torch ops (the libraries' own helpers go through torch.compile: a slow cold start on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch

ALLOW_ALL = -1  # a word with every bit set


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row for a vocabulary of `vocab_size`."""
    return (vocab_size + 31) // 32


def allocate(rows: int, vocab_size: int, *, pin: bool = False) -> torch.Tensor:
    """A host bitmask `[rows, words]` allowing every token (pinned when the device copy should not wait)."""
    return torch.full((rows, bitmask_words(vocab_size)), ALLOW_ALL, dtype=torch.int32, pin_memory=pin)


def set_tokens(row: torch.Tensor, token_ids: list[int], allowed: bool) -> None:
    """Allow (or forbid) `token_ids` in one host row, in place."""
    if not token_ids:
        return
    words = row.numpy().view(np.uint32)
    ids = np.asarray(token_ids, dtype=np.int64)
    bits = np.left_shift(np.uint32(1), (ids % 32).astype(np.uint32))
    if allowed:
        np.bitwise_or.at(words, ids // 32, bits)
    else:
        np.bitwise_and.at(words, ids // 32, ~bits)


def allowed_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    """The ids a host row allows (tests and debugging)."""
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits [n, V]` with the tokens `bitmask [n, words]` (on the logits' device) forbids set to -inf."""
    n, vocab = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:n, :, None] >> shifts) & 1).view(n, -1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))
