"""What the engine reports: per-request incremental outputs and engine-wide statistics."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

from gemma4.chat import ChatDelta
from gemma4.engine.request import FinishReason
from gemma4.engine.sampler import TokenLogprobs


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestMetrics:
    """Timings in seconds (monotonic clock); `inter_token_times` are the gaps between output tokens."""

    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    inter_token_times: tuple[float, ...]
    num_preemptions: int

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True)
class RequestOutput:
    """One request's progress: everything so far plus what is new since the previous output.

    `text` is the text streamed so far (every `delta_text` joined), always a prefix of the final
    text: possible stop-string prefixes are held back until decided. `logprobs` covers every output
    token so far (`delta_logprobs` the new ones). `chat_deltas` holds the chat parser's events for
    this delta (thinking text, answer text, completed tool calls) when the request asked for chat parsing.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    usage: Usage
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs] | None = None
    chat_deltas: list[ChatDelta] = field(default_factory=list)

    @property
    def delta_logprobs(self) -> list[TokenLogprobs] | None:
        if self.logprobs is None:
            return None
        return self.logprobs[len(self.logprobs) - len(self.delta_token_ids) :]


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
class EngineStats:
    """Engine-wide state and cumulative counters; small and fixed-size (it crosses processes on health checks)."""

    num_waiting: int
    num_running: int
    kv_cache: list[CacheGroupStats]
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_requests: dict[str, int]
    time_to_first_token: LatencyHistogram  # finished requests that produced a token: arrival to first token
    inter_token_latency: LatencyHistogram  # gaps between consecutive output tokens of finished requests
    e2e_latency: LatencyHistogram  # finished requests: arrival to finish

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """The fullest group's usage: what limits admission."""
        return max((g.usage for g in self.kv_cache), default=0.0)
