"""A request's state inside the engine core: tokens, progress through the cache, status (timings are the
output processor's)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gemma4.engine.sampling_params import SamplingParams
from gemma4.media.inputs import MediaPlaceholder


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """One generation request (compared by identity: the scheduler's queues test membership often).

    `token_ids` is prompt + output so far; `num_computed_tokens` of them have KV in the cache. A
    preempted request drops its cache and recomputes all its tokens later, outputs included.
    `cache_salt` is its prefix-cache namespace (None: shared by every unsalted request). `media` are
    the prompt's media items (in prompt order), whose soft tokens replace their placeholder positions.
    `spec_token_ids` are draft tokens proposed to follow `token_ids` (speculative decoding): the next
    decode step computes them with the last token and verifies them; they are not part of the output
    until accepted.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    stop_token_ids: frozenset[int]
    priority: int = 0
    cache_salt: str | None = None
    media: tuple[MediaPlaceholder, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.token_ids) + len(self.spec_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.priority, self.arrival_order)

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
