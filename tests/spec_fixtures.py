"""Speculative decoding test helpers: a proposer that knows the reference continuation, and swapping an
engine's proposer."""

from __future__ import annotations

import random

from gemma4.engine.llm_engine import LLMEngine
from gemma4.engine.spec_decode.decoder import SpeculativeDecoder, TokenProposer


class OracleProposer:
    """Drafts the reference continuation of a request's tokens, each draft replaced by a wrong token
    with probability `error` (seeded by the sequence length, so runs repeat)."""

    def __init__(self, references: list[list[int]], error: float, vocab: int) -> None:
        self.references = references
        self.error = error
        self.vocab = vocab

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        n = len(token_ids)
        for reference in self.references:
            if len(reference) > n and reference[:n] == token_ids:
                rng = random.Random(n * 7919 + len(reference))
                return [t if rng.random() >= self.error else (t + 1) % self.vocab for t in reference[n : n + num_tokens]]
        return []


def with_proposer(engine: LLMEngine, proposer: TokenProposer, num_tokens: int) -> LLMEngine:
    """`engine` drafting with `proposer` (`num_tokens` drafts a step) instead of its own proposer."""
    worker = engine.executor.worker
    worker.spec = SpeculativeDecoder(
        num_tokens, engine.max_model_len, tokens=proposer, grammar=worker.structured
    )
    return engine
