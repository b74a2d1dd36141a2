"""Rank 0's side of speculative decoding: after a step's drafts are verified, propose the drafts each
request computes in its next step.

A request gets up to `num_tokens` drafts, fewer where its `max_tokens` or the context limit leave less
room (a step keeps at most its drafts plus one token), and none when it uses penalties (each row's
penalty state would depend on the drafts before it). The assistant drafter reads the step's final
hidden states at each request's last kept row and the target's KV cache; the n-gram proposer reads
the tokens alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from gemma4.engine.request import Request
from gemma4.engine.spec_decode.verify import Verified

if TYPE_CHECKING:
    from gemma4.engine.spec_decode.assistant_proposer import AssistantProposer


class BlockTables(Protocol):
    def block_tables(self, seq_id: str) -> list[list[int]]: ...


class GrammarCheck(Protocol):
    """Structured outputs' view of drafts (`StructuredOutputs.accepts`)."""

    def accepts(self, request: Request, tokens: Sequence[int]) -> int: ...


class TokenProposer(Protocol):
    """Drafts from a request's tokens alone (`NgramProposer`)."""

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]: ...


class SpeculativeDecoder:
    def __init__(
        self,
        num_tokens: int,
        max_model_len: int,
        *,
        tokens: TokenProposer | None = None,
        assistant: AssistantProposer | None = None,
        grammar: GrammarCheck | None = None,
    ) -> None:
        """Drafts come from `tokens` or `assistant`; with `grammar`, a constrained request's drafts end
        before the first one its constraint rejects (it could never be kept)."""
        if (tokens is None) == (assistant is None):
            raise ValueError("a speculative decoder drafts with exactly one of a token proposer or an assistant")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        self.tokens = tokens
        self.assistant = assistant
        self.grammar = grammar

    def room(self, verified: Verified) -> int:
        """How many drafts the request can use next step."""
        request, kept = verified.request, len(verified.kept)
        params = request.sampling_params
        if params.uses_penalties:
            return 0
        outputs, tokens = request.num_output_tokens + kept, request.num_tokens + kept
        return max(0, min(self.num_tokens, params.max_tokens - outputs - 1, self.max_model_len - tokens - 1))

    def propose(
        self, verified: list[Verified], hidden: torch.Tensor | None, tables: BlockTables
    ) -> list[list[int]]:
        """Drafts per verified request (in order); `hidden` holds the step's sampling rows' final hidden
        states (needed by the assistant), `tables` the requests' block tables."""
        drafts = self._draft(verified, hidden, tables)
        if self.grammar is None:
            return drafts
        for i, (v, row) in enumerate(zip(verified, drafts)):
            if row and v.request.sampling_params.structured is not None:
                kept = [r.token_id for r in v.kept]
                drafts[i] = row[: max(0, self.grammar.accepts(v.request, kept + row) - len(kept))]
        return drafts

    def _draft(
        self, verified: list[Verified], hidden: torch.Tensor | None, tables: BlockTables
    ) -> list[list[int]]:
        rooms = [self.room(v) for v in verified]
        if self.tokens is not None:
            return [
                self.tokens.propose(v.request.token_ids + [r.token_id for r in v.kept], k)
                for v, k in zip(verified, rooms)
            ]
        assert self.assistant is not None and hidden is not None, "the assistant drafts from the step's hidden states"
        drafting = [i for i, k in enumerate(rooms) if k > 0]
        drafts: list[list[int]] = [[] for _ in verified]
        if not drafting:
            return drafts
        rows = torch.tensor([verified[i].last_row for i in drafting], device=hidden.device)
        last = torch.tensor([verified[i].kept[-1].token_id for i in drafting], device=hidden.device)
        positions = [verified[i].request.num_tokens + len(verified[i].kept) - 1 for i in drafting]
        proposed = self.assistant.propose(
            hidden.index_select(0, rows),
            last,
            positions,
            [tables.block_tables(verified[i].request.request_id) for i in drafting],
            max(rooms[i] for i in drafting),
        ).tolist()
        for i, row in zip(drafting, proposed):
            drafts[i] = row[: rooms[i]]
        return drafts
