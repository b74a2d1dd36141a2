"""What the engine reports: per-request delta outputs (totals on the final one) and engine-wide statistics."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields
from typing import Iterable

from gemma4.chat import ChatDelta
from gemma4.engine.request import FinishReason
from gemma4.engine.sampler import TokenLogprobs


@dataclass(frozen=True)
class Usage:
    """Token counts of a request; the media counts are the prompt's soft tokens per modality (also
    counted in `prompt_tokens`)."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    video_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestMetrics:
    """A finished request's timings in seconds (monotonic clock); `inter_token_times` are the gaps
    between its output tokens (final outputs only carry this, so its length costs once per request)."""

    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    inter_token_times: tuple[float, ...]
    num_preemptions: int

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


_TOTALS = ("prompt_token_ids", "token_ids", "text", "usage", "metrics")


@dataclass(frozen=True)
class RequestOutput:
    """One request's progress since its previous output; the final output adds the totals.

    Every output carries only what is new: `delta_token_ids`, `delta_text` (possible stop-string
    prefixes are held back until decided, so the joined deltas are always a prefix of the final
    text), `delta_logprobs` (None unless logprobs were requested) and `chat_deltas` (the chat
    parser's events for this delta, when the request is chat-parsed). Its size does not grow with
    the generation, so streaming costs the same per token however long the output gets.

    The totals (`prompt_token_ids`, all `token_ids`, the full `text`, all `logprobs`, `usage`,
    `metrics`) are set on the final output (`finished`) and are None on every other one: joining
    the deltas of all outputs, the final one included, gives them. `logprobs` is also None on a
    final output when logprobs were not requested. `text` is "" for an engine without a tokenizer.
    """

    request_id: str
    delta_token_ids: list[int]
    delta_text: str = ""
    delta_logprobs: list[TokenLogprobs] | None = None
    chat_deltas: list[ChatDelta] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    text: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    usage: Usage | None = None
    metrics: RequestMetrics | None = None

    def __post_init__(self) -> None:
        missing = [name for name in _TOTALS if getattr(self, name) is None]
        if self.finished and (missing or self.finish_reason is None):
            raise ValueError(f"a final output needs a finish reason and totals; missing: {missing or ['finish_reason']}")
        ends = (self.finish_reason, self.stop_reason, self.logprobs)
        if not self.finished and (len(missing) < len(_TOTALS) or any(v is not None for v in ends)):
            raise ValueError("only the final output carries totals, logprobs and a finish or stop reason")


@dataclass(frozen=True)
class CacheGroupStats:
    name: str
    num_blocks: int
    used_blocks: int
    usage: float


LATENCY_BUCKET_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LatencyHistogram:
    """Latencies (seconds) observed since the engine started, in a fixed number of buckets.

    `counts[i]` counts values in (bucket_bounds[i - 1], bucket_bounds[i]] and the last entry those
    above the last bound, so stats stay the same size however many requests finished.
    """

    bucket_bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    count: int

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bucket_bounds) + 1:
            raise ValueError(f"counts needs {len(self.bucket_bounds) + 1} entries, got {len(self.counts)}")

    @classmethod
    def empty(cls, bucket_bounds: tuple[float, ...] = LATENCY_BUCKET_BOUNDS) -> LatencyHistogram:
        return cls(bucket_bounds, (0,) * (len(bucket_bounds) + 1), 0.0, 0)

    def add(self, values: Iterable[float]) -> LatencyHistogram:
        """This histogram with `values` observed as well."""
        counts, total, count = list(self.counts), self.total, self.count
        for value in values:
            counts[bisect.bisect_left(self.bucket_bounds, value)] += 1
            total += value
            count += 1
        return LatencyHistogram(self.bucket_bounds, tuple(counts), total, count)


@dataclass(frozen=True)
class CoreStats:
    """What the engine core knows: its queues, KV pools, prefix cache and token counters.

    `generation_tokens_total` counts every token the model sampled, also one an asynchronously
    found stop string then cut (usage counts only the tokens a request kept).
    `expert_placement_changes` counts the MoE layers the load-aware placement moved experts of.
    Media: requests added with media and their items per modality (a video counts its frames), the
    items actually encoded (encoder-cache misses), encoder-cache lookups and hits, the encoders'
    seconds, and the fraction of the encoder cache's capacity in use.
    Speculative decoding (vLLM's counters): verifications of requests that carried drafts, the draft
    tokens proposed, those accepted, and the accepted ones per draft position (index 0 = first draft).
    """

    num_waiting: int
    num_running: int
    kv_cache: list[CacheGroupStats]
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    expert_placement_changes: int = 0
    media_requests_total: int = 0
    media_items_total: dict[str, int] = field(default_factory=dict)
    encoder_items_total: dict[str, int] = field(default_factory=dict)
    encoder_cache_queries_total: int = 0
    encoder_cache_hits_total: int = 0
    encoder_seconds_total: float = 0.0
    encoder_cache_usage: float = 0.0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()


@dataclass(frozen=True)
class FinishedStats:
    """Finished requests as their final outputs reported them (the output processor's view).

    Immutable: `add` returns a new value, so another thread can read the latest one at any time.
    """

    finished_requests: dict[str, int]
    time_to_first_token: LatencyHistogram  # finished requests that produced a token: arrival to first token
    inter_token_latency: LatencyHistogram  # gaps between consecutive output tokens of finished requests
    e2e_latency: LatencyHistogram  # finished requests: arrival to finish

    @classmethod
    def empty(cls) -> FinishedStats:
        none = LatencyHistogram.empty()
        return cls({reason.value: 0 for reason in FinishReason}, none, none, none)

    def add(self, final: RequestOutput, finish_time: float) -> FinishedStats:
        """These stats with the request of `final` (a finished output) counted as well."""
        assert final.metrics is not None and final.finish_reason is not None
        ttft = final.metrics.time_to_first_token
        counts = dict(self.finished_requests)
        counts[final.finish_reason.value] += 1
        return FinishedStats(
            finished_requests=counts,
            time_to_first_token=self.time_to_first_token.add([] if ttft is None else [ttft]),
            inter_token_latency=self.inter_token_latency.add(final.metrics.inter_token_times),
            e2e_latency=self.e2e_latency.add([finish_time - final.metrics.arrival_time]),
        )


@dataclass(frozen=True)
class EngineStats(CoreStats, FinishedStats):
    """Engine-wide state and cumulative counters; small and fixed-size (it crosses processes on health checks)."""

    @classmethod
    def of(cls, core: CoreStats, finished: FinishedStats) -> EngineStats:
        parts = {f.name: getattr(core, f.name) for f in fields(CoreStats)}
        return cls(**parts, **{f.name: getattr(finished, f.name) for f in fields(FinishedStats)})

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """The fullest group's usage: what limits admission."""
        return max((g.usage for g in self.kv_cache), default=0.0)
