"""Per-request grammar state where sampling happens (rank 0's worker), and each step's token masks.

`StructuredOutputs` keeps one matcher per constrained request, caught up with the request's kept
output tokens at each step (from the worker's mirror `Request`, as the sampler keeps penalty state: a
request seen for the first time, or again after `remove`, is rebuilt from all its tokens, so
preemption and recomputation need nothing special). A matcher only ever holds tokens the engine kept:
drafts are tried and rolled back.

In thinking mode (`params.thinking`) a thought block may open at the first output token
(`<|channel>`); everything up to and including its end token (`<channel|>`) is free but stop tokens
(the request cannot end inside its thought), and the constraint applies from the next token. A first
token that opens no thought starts the constrained answer at once, so the answer is always constrained.

`start(rows)` fills a step's masks on a background thread (llguidance releases the GIL) while the
forward runs: one row per sampling row, `(request, drafts)` giving 1 + len(drafts) rows, row j the mask
after the request's tokens and drafts d_0..d_{j-1}; rows after a draft the grammar rejects allow every
token (they are never kept). Rows of unconstrained requests allow every token.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch

from gemma4.engine.request import Request
from gemma4.engine.structured_output.bitmask import allocate, bitmask_words, set_tokens
from gemma4.engine.structured_output.compiler import GrammarCompiler

logger = logging.getLogger(__name__)

# A step's sampling rows: each request with the draft tokens its later rows are conditioned on.
Rows = Sequence[tuple[Request, Sequence[int]]]


class _Phase(enum.Enum):
    OPENING = "opening"  # thinking mode, nothing written yet: a thought block may open here
    THOUGHT = "thought"  # inside the thought block: free text
    ANSWER = "answer"  # the constrained part


@dataclass
class _Tracked:
    """One constrained request: its matcher, where its output is, and how much of it has been applied."""

    matcher: llguidance.LLMatcher
    phase: _Phase
    applied: int = 0  # output tokens applied
    consumed: int = 0  # tokens the matcher holds (the answer's, less a final EOS)
    failed: bool = False  # a kept token the grammar rejected: the request may only stop


def sampling_rows(requests: Sequence[Request], num_tokens: Sequence[int]) -> list[tuple[Request, Sequence[int]]]:
    """The rows a step samples, before its forward: each request whose computed tokens reach its end
    (the runner's rule), without drafts."""
    return [(r, ()) for r, n in zip(requests, num_tokens) if r.num_computed_tokens + n == r.num_tokens]


class MaskJob:
    """A step's masks being filled on the background thread."""

    def __init__(self, future: Future[torch.Tensor], request_ids: list[str]) -> None:
        self._future = future
        self._request_ids = request_ids

    def result(self, requests: Sequence[Request]) -> torch.Tensor:
        """Wait for the host bitmask `[rows, words]`; `requests` are the rows' requests, as started."""
        masks = self._future.result()
        if [r.request_id for r in requests] != self._request_ids:
            raise RuntimeError("the step samples other rows than its structured-output masks were started for")
        return masks


class StructuredOutputs:
    """Constrained requests' matchers on rank 0; `remove` a request when it ends (between steps)."""

    def __init__(self, compiler: GrammarCompiler, *, pin_memory: bool = False, threads: int | None = None) -> None:
        self.compiler = compiler
        self.vocab_size = compiler.vocab_size
        self._pin = pin_memory
        self._tracked: dict[str, _Tracked] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="structured-masks")
        self._parallel = llguidance.LLExecutor(threads)

    def remove(self, request_id: str) -> None:
        """Forget a request's matcher (unknown ids are ignored)."""
        self._tracked.pop(request_id, None)

    def start(self, rows: Rows) -> MaskJob | None:
        """Begin filling the masks of `rows` in the background; None when no request in them is constrained."""
        if not any(request.sampling_params.structured is not None for request, _ in rows):
            return None
        ids = [request.request_id for request, drafts in rows for _ in range(1 + len(drafts))]
        return MaskJob(self._thread.submit(self.masks, list(rows)), ids)

    def masks(self, rows: Rows) -> torch.Tensor:
        """The host bitmask of `rows` (see the module docstring), computed now."""
        words = bitmask_words(self.vocab_size)
        mask = allocate(sum(1 + len(drafts) for _, drafts in rows), self.vocab_size, pin=self._pin)
        batched: list[tuple[_Tracked, int]] = []  # rows whose masks llguidance computes in parallel
        row = 0
        for request, drafts in rows:
            tracked = self._caught_up(request)
            if tracked is None:
                pass
            elif drafts:
                self._fill_drafts(tracked, request, drafts, mask, row)
            elif tracked.failed or tracked.phase is _Phase.THOUGHT:
                self._fill(tracked, request, mask, row)
            else:
                batched.append((tracked, row))
            row += 1 + len(drafts)
        if batched:
            matchers = [(tracked.matcher, index) for tracked, index in batched]
            self._parallel.unsafe_compute_mask_ptr(matchers, mask.data_ptr(), words * 4, mask.shape[0])
            for tracked, index in batched:
                if tracked.phase is _Phase.OPENING:
                    set_tokens(mask[index], [self.compiler.thought_markers.start], True)
        return mask

    def accepts(self, request: Request, tokens: Sequence[int]) -> int:
        """How many leading `tokens` (drafts after the request's tokens) the constraint accepts (between steps)."""
        tracked = self._caught_up(request)
        if tracked is None:
            return len(tokens)
        if tracked.failed:
            return 0
        saved = (tracked.phase, tracked.consumed)
        accepted = 0
        for token in tokens:
            if not self._advance(tracked, request, token):
                break
            accepted += 1
        self._restore(tracked, saved)
        return accepted

    # ------------------------------------------------------------------ per request
    def _caught_up(self, request: Request) -> _Tracked | None:
        """The request's state with its kept output tokens applied (built on first sight); None if unconstrained."""
        params = request.sampling_params.structured
        if params is None:
            return None
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            phase = _Phase.OPENING if params.thinking else _Phase.ANSWER
            tracked = self._tracked[request.request_id] = _Tracked(self.compiler.matcher(params), phase)
        outputs = request.output_token_ids
        for token in outputs[tracked.applied :]:
            if not tracked.failed and not self._advance(tracked, request, token):
                tracked.failed = True
                logger.warning(
                    "request %s kept token %d, which its grammar rejects (%s); it may only stop now",
                    request.request_id, token, tracked.matcher.get_error() or "not allowed there",
                )
        tracked.applied = len(outputs)
        return tracked

    def _advance(self, tracked: _Tracked, request: Request, token: int) -> bool:
        """Apply one token to the state; False (state unchanged) if the constraint rejects it."""
        markers = self.compiler.thought_markers
        if tracked.phase is _Phase.THOUGHT:
            if token == markers.end:
                tracked.phase = _Phase.ANSWER
            return token not in request.stop_token_ids
        if tracked.phase is _Phase.OPENING and token == markers.start:
            tracked.phase = _Phase.THOUGHT
            return True
        matcher = tracked.matcher
        if token in self.compiler.ll_tokenizer.eos_tokens and matcher.is_accepting():
            tracked.phase = _Phase.ANSWER  # the grammar is done: EOS is allowed (and repeats under ignore_eos)
            return True
        if matcher.try_consume_tokens([token]) != 1:
            return False
        tracked.phase = _Phase.ANSWER
        tracked.consumed += 1
        return True

    def _restore(self, tracked: _Tracked, saved: tuple[_Phase, int]) -> None:
        """Undo the drafts applied since `saved` (phase, consumed)."""
        phase, consumed = saved
        if tracked.consumed > consumed:
            tracked.matcher.rollback(tracked.consumed - consumed)
        tracked.phase, tracked.consumed = phase, consumed

    def _fill(self, tracked: _Tracked, request: Request, mask: torch.Tensor, row: int) -> None:
        """Row `row` of `mask` (all allowed on entry) for the request's current state."""
        stops = sorted(t for t in request.stop_token_ids if t < self.vocab_size)
        if tracked.failed:
            if stops:
                mask[row] = 0
                set_tokens(mask[row], stops, True)
        elif tracked.phase is _Phase.THOUGHT:
            set_tokens(mask[row], stops, False)
        else:
            target = mask[row]
            tracked.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)
            if tracked.phase is _Phase.OPENING:
                set_tokens(target, [self.compiler.thought_markers.start], True)

    def _fill_drafts(
        self, tracked: _Tracked, request: Request, drafts: Sequence[int], mask: torch.Tensor, row: int
    ) -> None:
        """Rows `row .. row + len(drafts)`: after each prefix of the drafts, until one is rejected."""
        saved = (tracked.phase, tracked.consumed)
        for j in range(len(drafts) + 1):
            self._fill(tracked, request, mask, row + j)
            if j == len(drafts) or tracked.failed or not self._advance(tracked, request, drafts[j]):
                break
        self._restore(tracked, saved)
