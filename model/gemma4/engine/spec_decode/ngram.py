"""Prompt-lookup (n-gram) drafting: the model-free fallback for checkpoints without an assistant drafter.

The drafts are the tokens that followed the most recent earlier occurrence of the sequence's last n
tokens (n from `max_n` down to `min_n`, the longest match first) in its own prompt and output. Cheap
and often right where outputs copy their input (code edits, extraction, summaries with quotes).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` drafts to follow `token_ids` (none without an earlier match)."""
        if num_tokens <= 0 or len(token_ids) < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows starting before the suffix itself, each followed by at least one token.
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + num_tokens].tolist()
        return []
