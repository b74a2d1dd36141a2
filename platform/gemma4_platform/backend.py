"""What the gateway sends to an engine, and the interface of whatever runs it.

The gateway tokenizes and validates; a backend only runs token ids. In the Ray graph the backend is
the pool of replica deployments (`gemma4_platform.graph`); `LocalBackend` runs an `AsyncEngine`
in-process (tests of the front ends, the bare-engine benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from gemma4.engine import AsyncEngine, RequestOutput, SamplingParams, Usage
from gemma4.engine.async_engine import EngineDeadError
from gemma4.media.inputs import MediaPlaceholder, MultimodalPrompt

from gemma4_platform.errors import Unavailable, invalid_from_value_error


@dataclass(frozen=True)
class EngineRequest:
    """A validated, tokenized request (picklable: it crosses process boundaries).

    `request_id` is the gateway's own unique id (what the engine tracks); `client_request_id` is what the
    client sent or was given, echoed in responses, so one client can never collide with another's ids.
    `cache_salt` is the prefix-cache namespace: KV is shared only between requests with the same salt.
    `media` are the preprocessed images, audio clips and video frames placed in `prompt_token_ids`
    (whose soft-token slots they fill); the request travels to a replica once, tensors included.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    parse_chat: bool = False
    trace_context: dict[str, str] = field(default_factory=dict)
    client_request_id: str = ""
    cache_salt: str | None = None  # prefix-cache namespace (None: shared); the router keys on it too
    media: tuple[MediaPlaceholder, ...] = ()

    @property
    def prompt(self) -> list[int] | MultimodalPrompt:
        """What the engine takes: the ids, or the ids with their media."""
        return MultimodalPrompt(self.prompt_token_ids, self.media) if self.media else self.prompt_token_ids


def media_tokens(usage: Usage) -> dict[str, int]:
    """The prompt's soft tokens per modality, as the engine counts them (the usage fields' names)."""
    return {"image_tokens": usage.image_tokens, "audio_tokens": usage.audio_tokens, "video_tokens": usage.video_tokens}


class GenerationBackend(Protocol):
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; closing the iterator aborts the request."""
        ...


async def stream_from_engine(engine: AsyncEngine, request: EngineRequest) -> AsyncIterator[RequestOutput]:
    """Run one request on an in-process engine, turning engine errors into serving errors."""
    try:
        stream = await engine.add_request(
            request.prompt,
            request.params,
            request_id=request.request_id,
            priority=request.priority,
            parse_chat=request.parse_chat,
            cache_salt=request.cache_salt,
        )
    except ValueError as exc:
        raise invalid_from_value_error(exc) from exc
    except EngineDeadError as exc:
        raise Unavailable(f"the engine is not running: {exc}") from exc
    try:
        async for output in stream:
            yield output
    except EngineDeadError as exc:
        raise Unavailable(str(exc)) from exc
    finally:
        await stream.aclose()


class LocalBackend:
    """An `AsyncEngine` in this process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        return stream_from_engine(self.engine, request)
