"""Continuous batching: which requests compute how many tokens in the next step.

Each step has a token budget. Running requests go first, in priority order (a decode costs one
token; an unfinished prompt continues as a chunk), then waiting requests are admitted while the
budget, `max_num_seqs` and the KV pools allow, their prompts chunked to fit (chunked prefill mixed
with decode). When a pool runs out, the lowest-priority running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later with the same output.
A decoding request's draft tokens (speculative decoding) are computed with its last token, as far
as the budget allows; when their blocks do not fit, the request decodes without them rather than
preempting another.

Media items are never split across steps: a chunk ends before an item it cannot take whole (an
image's bidirectional block must lie within one step; the item's soft tokens are then read in one
step only). Items the workers do not hold yet in their encoder cache are encoded in the step that
reads them, within `max_num_encoder_tokens` soft tokens per step; a chunk ends before an item past
that budget.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gemma4.engine.encoder_cache import EncoderCacheManager, overlapping_items
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    max_num_encoder_tokens: int = 2048

    @property
    def max_media_item_tokens(self) -> int:
        """The longest media item the scheduler can always make progress with: one step's encoder budget,
        and a chunk's tokens once the other running requests (at most `max_num_seqs - 1`) each decode."""
        return min(self.max_num_encoder_tokens, self.max_num_batched_tokens - self.max_num_seqs + 1)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_num_encoder_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ScheduledBatch:
    """One step's work: `num_tokens[i]` tokens of `requests[i]` starting at its computed count."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Media items to encode before the forward (request, index into its media), and the content
    # hashes of encoder-cache entries to drop (none of which this step reads).
    encoder_inputs: list[tuple[Request, int]] = field(default_factory=list)
    encoder_frees: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, encoder: EncoderCacheManager | None = None) -> None:
        self.config = config
        self.kv = kv
        self.encoder = encoder  # None: a model without towers, whose requests carry no media
        self._encoder_budget = config.max_num_encoder_tokens  # what is left of it in the step being built
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # sorted by Request.sort_key
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache on admission
        self.prefix_hit_tokens = 0  # ... of which were served from it

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of the queues and free its blocks (abort or finish)."""
        for queue in (self.waiting, self.running):
            for i, request in enumerate(queue):
                if request.request_id == request_id:
                    del queue[i]
                    self.kv.free(request_id)
                    return request
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_token_ids.clear()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        self._encoder_budget = self.config.max_num_encoder_tokens
        preempted: set[int] = set()  # ids of requests preempted earlier in this loop
        for request in list(self.running):
            if budget == 0:
                break
            if id(request) in preempted:
                continue
            n = self._fit_media(request, min(request.num_tokens_with_spec - request.num_computed_tokens, budget))
            if n == 0:
                continue  # its next media item waits for a step with room for it
            del request.spec_token_ids[max(n - 1, 0) :]  # drafts ride on a decode: those past the budget go
            while not self.kv.allocate(
                request.request_id, request.token_ids, request.num_computed_tokens, n, request.cache_salt
            ):
                if request.spec_token_ids:  # drafts never cost another request its place
                    request.spec_token_ids.clear()
                    n = 1
                    continue
                victim = self.running[-1]  # lowest priority, not yet scheduled this step
                self._preempt(victim)
                preempted.add(id(victim))
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                self._add(batch, request, n)
                budget -= n
        if batch.preempted:
            return self._with_evictions(batch)  # no admissions while memory is short: the preempted go first
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed_tokens == 0:
                cached = self.kv.find_cached_prefix(request.token_ids, request.cache_salt, request.media)
                request.num_computed_tokens = cached
                if request.num_output_tokens == 0:
                    request.num_cached_prompt_tokens = cached
            n = self._fit_media(request, min(request.num_tokens - request.num_computed_tokens, budget))
            if n == 0 or not self.kv.allocate(
                request.request_id,
                request.token_ids,
                request.num_computed_tokens,
                n,
                request.cache_salt,
                request.media,
            ):
                request.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            self._add(batch, request, n)
            budget -= n
        return self._with_evictions(batch)

    def _fit_media(self, request: Request, n: int) -> int:
        """`n`, or fewer tokens so that the chunk ends before a media item it cannot take whole: one that
        does not fit the chunk, or whose encoding does not fit what is left of the step's encoder budget
        (0 when the chunk starts inside such an item)."""
        if not request.media:
            return n
        assert self.encoder is not None, "a request with media on an engine without an encoder cache"
        start = request.num_computed_tokens
        end, cost = start + n, 0
        for _, item in overlapping_items(request, start, end):
            if item.end > end:
                return max(item.offset - start, 0)
            if item.features.content_hash not in self.encoder:
                cost += item.length
                if cost > self._encoder_budget:
                    return max(item.offset - start, 0)
        return n

    def _add(self, batch: ScheduledBatch, request: Request, n: int) -> None:
        """Schedule `n` tokens of `request`, and the encoding of the media they read that is not cached."""
        batch.add(request, n)
        start = request.num_computed_tokens
        for index, item in overlapping_items(request, start, start + n):
            assert self.encoder is not None
            if self.encoder.use(item.features):
                batch.encoder_inputs.append((request, index))
                self._encoder_budget -= item.length

    def _with_evictions(self, batch: ScheduledBatch) -> ScheduledBatch:
        """Drop encoder-cache entries over its capacity, keeping every item this step reads."""
        if self.encoder is not None:
            keep = {
                item.features.content_hash
                for request, n in zip(batch.requests, batch.num_tokens)
                for _, item in overlapping_items(request, request.num_computed_tokens, request.num_computed_tokens + n)
            }
            batch.encoder_frees = self.encoder.evict(keep)
        return batch
