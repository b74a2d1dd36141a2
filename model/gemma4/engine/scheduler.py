"""Continuous batching: which requests compute how many tokens in the next step.

Each step has a token budget. Running requests go first, in priority order (a decode costs one
token; an unfinished prompt continues as a chunk), then waiting requests are admitted while the
budget, `max_num_seqs` and the KV pools allow, their prompts chunked to fit (chunked prefill mixed
with decode). When a pool runs out, the lowest-priority running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later with the same output.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ScheduledBatch:
    """One step's work: `num_tokens[i]` tokens of `requests[i]` starting at its computed count."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
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
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted: set[int] = set()  # ids of requests preempted earlier in this loop
        for request in list(self.running):
            if budget == 0:
                break
            if id(request) in preempted:
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(
                request.request_id, request.token_ids, request.num_computed_tokens, n, request.cache_salt
            ):
                victim = self.running[-1]  # lowest priority, not yet scheduled this step
                self._preempt(victim)
                preempted.add(id(victim))
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                batch.add(request, n)
                budget -= n
        if batch.preempted:
            return batch  # no admissions while memory is short: the preempted go first next step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed_tokens == 0:
                cached = self.kv.find_cached_prefix(request.token_ids, request.cache_salt)
                request.num_computed_tokens = cached
                if request.num_output_tokens == 0:
                    request.num_cached_prompt_tokens = cached
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate(
                request.request_id, request.token_ids, request.num_computed_tokens, n, request.cache_salt
            ):
                request.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            batch.add(request, n)
            budget -= n
        return batch
