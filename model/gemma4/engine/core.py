"""The engine core: schedule a step, run the model over the paged cache, sample, apply token stops.

Per step it produces one plain `CoreOutput` per request that sampled a token or finished: the new
token ids and logprobs and the few numbers an output needs. It does no text work: detokenizing,
stop strings and chat parsing belong to `gemma4.engine.output_processor`, which may run on another
thread. The core ends requests on stop tokens (after `min_tokens`), `max_tokens`, `max_model_len`
and abort; when the output processor finds a stop string, `stop_request` ends the request here and
frees it (the output processor drops whatever the core sampled after the completing token).

The model runs behind an `Executor` (`gemma4.engine.executor`): each step goes to the workers as a
`WorkerStep` of what changed since the last (`gemma4.engine.worker_step`), and rank 0's sampled
tokens come back. With expert parallelism and `expert_rebalance_interval`, an `ExpertRebalancer`
re-places the experts between steps by the load measured since its last placement. A failed worker
(`WorkerFailure`) leaves the core dead: that step and every later one raise `EngineDeadError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Container, TypeVar

from gemma4.engine.executor import Executor, WorkerFailure
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.outputs import CacheGroupStats, CoreStats
from gemma4.engine.request import FinishReason, Request, RequestStatus
from gemma4.engine.sampler import SampleResult, TokenLogprobs
from gemma4.engine.scheduler import Scheduler
from gemma4.engine.worker_step import StepDeltas
from gemma4.parallel.placement import ExpertPlacement, plan_placements


T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine's step loop failed or was shut down; the request cannot complete."""


@dataclass(frozen=True)
class CoreOutput:
    """What one step did for one request; `finish_reason` is set when the core ended it.

    `stop_token` is the stop token id that ended it (finish_reason STOP); that token is the last of
    `new_token_ids`. `timestamp` is when the tokens were sampled (or the request was aborted).
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None  # None unless the request asked for logprobs
    timestamp: float
    num_cached_prompt_tokens: int
    num_preemptions: int
    finish_reason: FinishReason | None = None
    stop_token: int | None = None


@dataclass(frozen=True)
class StopRequest:
    """The output processor's order to end a request that a stop string finished (its final output,
    cut where the string completed, is already out; what the core sampled since is dropped there)."""

    request_id: str
    stop_string: str


class SpecStats:
    """Speculative decoding's counters (vLLM's): verifications with drafts, drafts, accepted drafts,
    and accepted drafts per position."""

    def __init__(self) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position: list[int] = []

    def count(self, num_drafts: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for position in range(accepted):
            self.accepted_per_position[position] += 1


def check_request_id(request_id: str, in_use: Container[str]) -> None:
    """Request ids are unique among the requests an engine is running (ValueError naming the field)."""
    if request_id in in_use:
        raise ValueError(f"request_id {request_id!r} is already in use")


class ExpertRebalancer:
    """Load-aware expert placement: every `interval` steps, plan placements from the per-expert load
    routed since the last plan (`gemma4.parallel.placement.plan_placements`, EPLB-style with
    `redundant` extra slots) and apply those that changed. Runs between steps, so no request sees a
    placement change inside a forward; outputs stay those of the old placement (up to summation order).
    """

    def __init__(self, executor: Executor, interval: int, expert_parallel: int, redundant: int) -> None:
        self.executor = executor
        self.interval = interval
        self.expert_parallel = expert_parallel
        self.redundant = redundant
        self.placements: dict[int, ExpertPlacement] = executor.expert_placements()
        self._mark = executor.expert_load()  # the cumulative load at the last plan
        self._steps = 0
        self.num_changes = 0  # MoE layers whose placement changed, summed over rebalances

    def after_step(self) -> None:
        self._steps += 1
        if self._steps % self.interval == 0:
            self.rebalance()

    def rebalance(self) -> None:
        load = self.executor.expert_load()
        recent = {layer: [now - then for now, then in zip(counts, self._mark[layer])] for layer, counts in load.items()}
        self._mark = load
        if not any(any(counts) for counts in recent.values()):
            return  # nothing routed since the last plan: nothing to learn from
        planned = plan_placements(recent, self.expert_parallel, self.redundant, self.placements)
        changed = {layer: p for layer, p in planned.items() if p != self.placements[layer]}
        if changed:
            self.executor.apply_expert_placements(changed)
            self.placements.update(changed)
            self.num_changes += len(changed)


class EngineCore:
    """Owns the requests being scheduled; every method runs on one thread (the step thread)."""

    def __init__(
        self,
        kv: KVCacheManager,
        scheduler: Scheduler,
        executor: Executor,
        max_model_len: int,
        rebalancer: ExpertRebalancer | None = None,
    ) -> None:
        self.kv = kv
        self.scheduler = scheduler
        self.executor = executor
        self.max_model_len = max_model_len
        self.rebalancer = rebalancer
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.media_requests_total = 0
        self.media_items_total: dict[str, int] = {}
        self.encoder_items_total: dict[str, int] = {}
        self.encoder_seconds_total = 0.0
        self._deltas = StepDeltas()
        self._failure: WorkerFailure | None = None
        self.spec = SpecStats()

    def add_request(self, request: Request) -> None:
        """Queue a validated request (its id must not be in use here)."""
        check_request_id(request.request_id, self.requests)
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        self.prompt_tokens_total += request.num_prompt_tokens
        if request.media:
            self.media_requests_total += 1
            for item in request.media:
                modality = item.features.modality
                self.media_items_total[modality] = self.media_items_total.get(modality, 0) + 1

    def abort_request(self, request_id: str) -> CoreOutput | None:
        """End a request now and free its blocks; its final record (None if it is not here)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, FinishReason.ABORT)
        return self._record(request, [], [], time.monotonic())

    def stop_request(self, stop: StopRequest) -> None:
        """End a request a stop string finished and free its blocks (no-op if the core ended it already)."""
        request = self.requests.get(stop.request_id)
        if request is not None:
            self._finish(request, FinishReason.STOP, stop_reason=stop.stop_string)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[CoreOutput]:
        """One scheduled forward pass; a record for every request that sampled a token."""
        if self._failure is not None:
            raise self._dead()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        step = self._deltas.build(batch, [self.kv.block_tables(r.request_id) for r in batch.requests])
        output = self._on_workers(lambda: self.executor.execute(step))
        self.encoder_seconds_total += output.encoder_seconds
        for request, index in batch.encoder_inputs:
            modality = request.media[index].features.modality
            self.encoder_items_total[modality] = self.encoder_items_total.get(modality, 0) + 1
        sampling = []
        for request, n in zip(batch.requests, batch.num_tokens):
            if request.num_computed_tokens + n == request.num_tokens_with_spec:  # a finished prefill or a decode
                sampling.append(request)
            else:  # a prefill chunk
                request.num_computed_tokens += n
                self.kv.commit(request.request_id, request.token_ids, request.num_computed_tokens)
        results = output.samples
        assert len(results) == len(sampling), f"{len(results)} sampled requests, {len(sampling)} expected"
        drafts = output.drafts or [[] for _ in sampling]
        now = time.monotonic()
        records = []
        for request, kept, proposed in zip(sampling, results, drafts):
            records.append(self._keep(request, kept, proposed, now))
        if self.rebalancer is not None:
            self._on_workers(self.rebalancer.after_step)
        return records

    def _keep(self, request: Request, kept: list[SampleResult], proposed: list[int], now: float) -> CoreOutput:
        """Apply what a sampling request's step produced: its KV now covers its tokens and the accepted
        drafts (the blocks only rejected drafts used are freed), the kept tokens are appended up to a
        stop, and the drafts proposed for its next step are attached."""
        num_drafts, accepted = len(request.spec_token_ids), len(kept) - 1
        if num_drafts:
            self.spec.count(num_drafts, accepted)
        request.num_computed_tokens = request.num_tokens + accepted
        request.spec_token_ids = []
        tokens = [r.token_id for r in kept]
        if num_drafts:
            self.kv.truncate(request.request_id, request.num_computed_tokens)
        self.kv.commit(request.request_id, request.token_ids + tokens, request.num_computed_tokens)
        new_tokens: list[int] = []
        logprobs: list[TokenLogprobs] = []
        for result in kept:
            request.append_token(result.token_id)
            self.generation_tokens_total += 1
            new_tokens.append(result.token_id)
            if result.logprobs is not None:
                logprobs.append(result.logprobs)
            self._check_stop(request, result.token_id)
            if request.finished:
                break
        if not request.finished:
            request.spec_token_ids = list(proposed)
        return self._record(request, new_tokens, logprobs or None, now)

    def _on_workers(self, call: Callable[[], T]) -> T:
        """Run an executor call; a worker failure leaves the core dead (this and every later step raise)."""
        try:
            return call()
        except WorkerFailure as exc:
            self._failure = exc
            raise self._dead() from exc

    def _dead(self) -> EngineDeadError:
        return EngineDeadError(f"the engine's workers failed: {self._failure}")

    def _check_stop(self, request: Request, token: int) -> None:
        """A stop token ends a request only after its first `min_tokens` output tokens (the sampler
        never draws one before); then max_tokens and max_model_len."""
        params = request.sampling_params
        if token in request.stop_token_ids and request.num_output_tokens > params.min_tokens:
            self._finish(request, FinishReason.STOP, stop_reason=token)
        elif request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            self._finish(request, FinishReason.LENGTH)

    def _finish(self, request: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        self.scheduler.remove(request.request_id)
        self._deltas.finish(request.request_id)
        del self.requests[request.request_id]

    @staticmethod
    def _record(
        request: Request, tokens: list[int], logprobs: list[TokenLogprobs] | None, now: float
    ) -> CoreOutput:
        finished = request.finished
        return CoreOutput(
            request_id=request.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs if request.sampling_params.logprobs is not None else None,
            timestamp=now,
            num_cached_prompt_tokens=request.num_cached_prompt_tokens,
            num_preemptions=request.num_preemptions,
            finish_reason=request.finish_reason if finished else None,
            stop_token=request.stop_reason if finished and isinstance(request.stop_reason, int) else None,
        )

    def stats(self) -> CoreStats:
        encoder = self.scheduler.encoder
        return CoreStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_cache=[CacheGroupStats(u.name, u.num_blocks, u.used_blocks, u.usage) for u in self.kv.usage()],
            prefix_query_tokens=self.scheduler.prefix_query_tokens,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            expert_placement_changes=self.rebalancer.num_changes if self.rebalancer is not None else 0,
            media_requests_total=self.media_requests_total,
            media_items_total=dict(self.media_items_total),
            encoder_items_total=dict(self.encoder_items_total),
            encoder_cache_queries_total=encoder.queries if encoder is not None else 0,
            encoder_cache_hits_total=encoder.hits if encoder is not None else 0,
            encoder_seconds_total=self.encoder_seconds_total,
            encoder_cache_usage=encoder.usage if encoder is not None else 0.0,
            spec_num_drafts=self.spec.num_drafts,
            spec_num_draft_tokens=self.spec.num_draft_tokens,
            spec_num_accepted_tokens=self.spec.num_accepted_tokens,
            spec_accepted_per_position=tuple(self.spec.accepted_per_position),
        )
