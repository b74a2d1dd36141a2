"""What the engine reports: per-request incremental outputs and engine-wide statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_cache: list[CacheGroupStats]
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_requests: dict[str, int]
    recent_requests: list[RequestMetrics]  # timings (TTFT, inter-token) of the last finished requests

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """The fullest group's usage: what limits admission."""
        return max((g.usage for g in self.kv_cache), default=0.0)
