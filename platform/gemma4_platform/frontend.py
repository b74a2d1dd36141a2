"""The protocol-independent half of the gateway: admit, bound, render, tokenize, validate, stream.

The gRPC servicer and the OpenAI HTTP routes both turn their wire format into calls here, so a
request is checked the same way whichever door it came through, and every failure is a
`ServingError` that each front end maps to its own status.

Untrusted input is bounded before any costly work: counts and sizes (`LimitSettings`) and a cheap
lower bound on the prompt's token count come first; rendering and tokenization of anything larger than
a small inline budget then run on a thread pool (the tokenizer releases the GIL), so one huge request
never stalls the event loop that every other stream is served from.

Media parts (images, audio, video) are checked where they are found (counts, sizes, types, URL hosts:
`gemma4_platform.media_input`), then fetched, decoded and preprocessed on a second bounded pool
(`gateway.media_threads`); the template renders one marker per part, which becomes the item's
delimited soft-token slots. The `EngineRequest` carries the items with their places in the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gemma4.engine import RequestOutput, SamplingParams
from gemma4.engine.llm_engine import MAX_CACHE_SALT_CHARS
from gemma4.media.inputs import (
    MediaError,
    MediaFeatures,
    MediaPlaceholder,
    MultimodalPrompt,
    VideoFeatures,
    encoder_items,
)
from gemma4.media.prompt import MediaTokenIds, encode_multimodal_chat
from gemma4.special_tokens import AUDIO, AUDIO_END, AUDIO_START, IMAGE, IMAGE_END, IMAGE_START, VIDEO
from gemma4.tokenizer import Gemma4Tokenizer

from gemma4_platform import tracing
from gemma4_platform.admission import Admission
from gemma4_platform.auth import KeyGrant
from gemma4_platform.backend import EngineRequest, GenerationBackend
from gemma4_platform.errors import (
    InvalidArgument,
    QueueFull,
    ServingError,
    Unimplemented,
    invalid_from_value_error,
)
from gemma4_platform.media_input import MediaOptions, MediaSource, find_media, load_media, part_modality
from gemma4_platform.metrics import GatewayMetrics
from gemma4_platform.request_limits import (
    check_chat,
    check_prompt_bound,
    check_sampling,
    rendered_chars,
    string_chars,
)
from gemma4_platform.settings import LimitSettings

INLINE_CHARS = 16_384  # text up to this size is rendered and tokenized on the event loop (well under 1 ms)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelDescription:
    """What clients may ask about the served model (gRPC GetModelInfo, OpenAI /v1/models)."""

    name: str
    variant: str
    max_model_len: int
    vocab_size: int
    modalities: tuple[str, ...] = ("text",)


@dataclass(frozen=True)
class GatewayPolicy:
    """How the gateway bounds and isolates requests (from `PlatformSettings`)."""

    limits: LimitSettings = LimitSettings()
    max_pending_requests: int = 256
    default_max_tokens: int = 1024
    cache_salt_per_key: bool = True
    tokenizer_threads: int = 2
    media_threads: int = 2


class Frontend:
    def __init__(
        self,
        tokenizer: Gemma4Tokenizer,
        model: ModelDescription,
        backend: GenerationBackend,
        *,
        policy: GatewayPolicy = GatewayPolicy(),
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model = model
        self.backend = backend
        self.policy = policy
        self.limits = policy.limits
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or model.max_model_len, model.max_model_len - 1)
        self.longest_token_chars = max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size))
        self.admission = Admission()
        self.pending = 0
        self._pool = ThreadPoolExecutor(max_workers=policy.tokenizer_threads, thread_name_prefix="gemma4-tokenize")
        self._media_pool = ThreadPoolExecutor(max_workers=policy.media_threads, thread_name_prefix="gemma4-media")
        self.media_ids = media_token_ids(tokenizer)

    # ------------------------------------------------------------------ admission
    @contextlib.contextmanager
    def admit(self, caller: KeyGrant) -> Iterator[None]:
        """One request in flight for `caller`: within its key's rate and streams, and the gateway's queue."""
        if self.pending >= self.policy.max_pending_requests:
            raise QueueFull(
                f"{self.pending} requests are in flight (max_pending_requests={self.policy.max_pending_requests}); "
                "retry later",
                retry_after_s=1.0,
            )
        with self.admission.admit(caller):
            self.pending += 1
            try:
                yield
            finally:
                self.pending -= 1

    # ------------------------------------------------------------------ building requests
    async def completion(
        self,
        prompt: str | Sequence[int],
        sampling: Mapping[str, Any],
        *,
        caller: KeyGrant,
        request_id: str | None = None,
        priority: int | None = None,
        cache_salt: str | None = None,
    ) -> EngineRequest:
        """A text or token-id prompt; `sampling` holds SamplingParams fields (None = unset)."""
        check_sampling(sampling, self.limits, self.model.max_model_len)
        if isinstance(prompt, str):
            check_prompt_bound(len(prompt), self.longest_token_chars, self.max_prompt_tokens, "prompt")
            token_ids = await self._offload(self._encode_raw, len(prompt), prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        bad = next((t for t in token_ids if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"prompt token id {bad} is outside the vocabulary [0, {self.model.vocab_size})", field="prompt"
            )
        return self._request(token_ids, sampling, caller, request_id, priority, cache_salt, parse_chat=False)

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling: Mapping[str, Any],
        *,
        caller: KeyGrant,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        media: MediaOptions = MediaOptions(),
        request_id: str | None = None,
        priority: int | None = None,
        cache_salt: str | None = None,
    ) -> EngineRequest:
        """A conversation rendered with the checkpoint's chat template; the output is chat-parsed."""
        check_sampling(sampling, self.limits, self.model.max_model_len)
        prompt = await self.chat_prompt(messages, tools=tools, thinking=thinking, media=media)
        return self._request(
            prompt.token_ids, sampling, caller, request_id, priority, cache_salt, parse_chat=True, media=prompt.media
        )

    async def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        media: MediaOptions = MediaOptions(),
    ) -> MultimodalPrompt:
        """The prompt of a conversation with its media placed; client text never becomes special tokens."""
        if not messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        messages, tools = check_chat(messages, tools, self.limits)
        self._reject_media(messages)
        try:
            messages, sources = find_media(messages, self.limits)
        except MediaError as exc:
            raise invalid_from_value_error(exc) from None
        check_prompt_bound(rendered_chars(messages), self.longest_token_chars, self.max_prompt_tokens, "messages")
        if sources and self.media_ids is None:
            raise InvalidArgument("this checkpoint's tokenizer has no media tokens", field=sources[0].where)
        items = await self._load_all(sources, media)

        def encode() -> MultimodalPrompt:
            try:
                return self._encode_chat(messages, items, tools, thinking)
            except MediaError as exc:
                raise invalid_from_value_error(exc) from None
            except ValueError as exc:
                raise InvalidArgument(str(exc), field=_leading_field(str(exc), "messages")) from None

        prompt = await self._offload(encode, string_chars(messages) + string_chars(tools))
        if len(prompt.token_ids) > self.max_prompt_tokens and prompt.media:
            self._refuse_long_media(prompt, sources, items)
        return prompt

    async def _load_all(
        self, sources: Sequence[MediaSource], options: MediaOptions
    ) -> list[MediaFeatures | VideoFeatures]:
        """Every part fetched, decoded and preprocessed on the media pool; the first failing part (in prompt
        order) is the error, once all are done (none is left running unobserved)."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._media_pool, load_media, s, self.limits, options) for s in sources]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, MediaError):
                raise invalid_from_value_error(result) from None
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    def _encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        items: Sequence[MediaFeatures | VideoFeatures],
        tools: Sequence[Mapping[str, Any]] | None,
        thinking: bool,
    ) -> MultimodalPrompt:
        """Render and tokenize; each marker the template wrote becomes its item's soft-token slots."""
        ids = self.media_ids
        if not items or ids is None:  # (items without media ids were refused before loading)
            return MultimodalPrompt(self.tokenizer.encode_chat(messages, tools=tools, thinking=thinking))
        return encode_multimodal_chat(self.tokenizer, messages, items, ids, tools=tools, thinking=thinking)

    def _refuse_long_media(
        self, prompt: MultimodalPrompt, sources: Sequence[MediaSource], items: Sequence[MediaFeatures | VideoFeatures]
    ) -> None:
        """Name the first part whose soft tokens do not fit in the prompt limit (if the text alone is too
        long, `_request` refuses the prompt as a whole)."""
        owners = [source.where for source, item in zip(sources, items) for _ in encoder_items([item])]
        for where, placed in zip(owners, prompt.media):
            if placed.end > self.max_prompt_tokens:
                raise InvalidArgument(
                    f"{where}: with this part's {placed.length} soft tokens the prompt has {len(prompt.token_ids)} "
                    f"tokens, more than the prompt limit ({self.max_prompt_tokens} tokens)",
                    field=where,
                )

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of a raw text (the Tokenize RPC), as a Generate text prompt would be tokenized."""
        check_prompt_bound(len(text), self.longest_token_chars, self.model.max_model_len, "text")
        return await self._offload(self._encode_raw, len(text), text)

    def _encode_raw(self, text: str) -> list[int]:
        """A raw prompt's ids: special-token strings parsed, unless `limits.strict_raw_prompts`."""
        return self.tokenizer.encode_plain(text) if self.limits.strict_raw_prompts else self.tokenizer.encode(text)

    async def count_tokens(self, text: str) -> int:
        """Tokens of a piece of output text (e.g. the thinking part, for usage and metrics)."""
        if not text:
            return 0
        return len(await self._offload(self.tokenizer.encode_plain, len(text), text))

    async def _offload(self, fn: Callable[..., T], size: int, *args: Any) -> T:
        if size <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _reject_media(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Parts of a modality this deployment does not serve (its checkpoint has no tower for them)."""
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, Mapping) else None
            if not isinstance(content, (list, tuple)):
                continue
            for j, part in enumerate(content):
                modality = part_modality(part)
                if modality is not None and modality not in self.model.modalities:
                    raise Unimplemented(
                        f"messages[{i}].content[{j}]: {part['type']} input is not supported by this deployment "
                        f"(modalities: {', '.join(self.model.modalities)})",
                        field=f"messages[{i}].content[{j}]",
                    )

    def _request(
        self,
        token_ids: list[int],
        sampling: Mapping[str, Any],
        caller: KeyGrant,
        request_id: str | None,
        priority: int | None,
        cache_salt: str | None,
        *,
        parse_chat: bool,
        media: tuple[MediaPlaceholder, ...] = (),
    ) -> EngineRequest:
        if len(token_ids) > self.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt ({len(token_ids)} tokens) exceeds the prompt limit ({self.max_prompt_tokens} tokens)",
                field="prompt",
            )
        fields = {k: v for k, v in sampling.items() if v is not None}
        room = self.model.max_model_len - len(token_ids)
        fields.setdefault("max_tokens", min(self.policy.default_max_tokens, room))
        try:
            params = SamplingParams(**fields)
        except TypeError as exc:
            raise InvalidArgument(f"unknown sampling field: {exc}", field="sampling") from None
        except ValueError as exc:
            raise invalid_from_value_error(exc) from None
        if params.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens ({params.max_tokens}) + prompt ({len(token_ids)} tokens) exceeds max_model_len "
                f"({self.model.max_model_len})",
                field="max_tokens",
            )
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise InvalidArgument(f"priority must be an integer, got {priority!r}", field="priority")
        return EngineRequest(
            request_id=f"req-{uuid.uuid4().hex}",
            client_request_id=_client_request_id(request_id),
            prompt_token_ids=token_ids,
            params=params,
            priority=caller.priority(priority),
            parse_chat=parse_chat,
            cache_salt=self._cache_salt(caller, cache_salt),
            media=media,
        )

    def _cache_salt(self, caller: KeyGrant, requested: str | None) -> str | None:
        """The prefix-cache namespace: the caller's key's own (when isolated) combined with the request's."""
        if requested is not None and (not isinstance(requested, str) or len(requested) > MAX_CACHE_SALT_CHARS):
            raise InvalidArgument(
                f"cache_salt must be a string of at most {MAX_CACHE_SALT_CHARS} characters", field="cache_salt"
            )
        key_salt = caller.cache_salt or (caller.name if self.policy.cache_salt_per_key else None)
        if key_salt is None:
            return requested or None
        # Hashing keeps one key's namespace out of every other's whatever salt a request sends.
        return hashlib.sha256(f"{key_salt}\0{requested or ''}".encode()).hexdigest()

    # ------------------------------------------------------------------ running
    async def stream(
        self, request: EngineRequest, *, trace_context: Mapping[str, str] | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Run an admitted request on the backend."""
        thinking: list[str] = []
        try:
            with tracing.span("gateway.generate", parent=trace_context, request_id=request.request_id) as carrier:
                request = dataclasses.replace(request, trace_context=carrier)
                async with contextlib.aclosing(self.backend.generate(request)) as outputs:
                    async for output in outputs:
                        thinking += [d.text for d in output.chat_deltas if d.kind == "thinking"]
                        self._observe_chat(output)
                        yield output
        finally:
            if self.metrics is not None and thinking:  # counted off the loop, whenever the pool gets to it
                self._pool.submit(self._count_thinking, "".join(thinking))

    def _count_thinking(self, text: str) -> None:
        assert self.metrics is not None
        self.metrics.thinking_tokens.labels(self.model.name).inc(len(self.tokenizer.encode_plain(text)))

    def _observe_chat(self, output: RequestOutput) -> None:
        if self.metrics is None:
            return
        for delta in output.chat_deltas:
            if delta.kind == "tool_call":
                self.metrics.tool_calls.labels(self.model.name).inc()
            elif delta.kind == "error":
                self.metrics.tool_call_failures.labels(self.model.name).inc()

    async def run(self, request: EngineRequest, *, trace_context: Mapping[str, str] | None = None) -> RequestOutput:
        """Run to completion; returns the final output (whose `token_ids`/`text` are complete)."""
        final = None
        async for final in self.stream(request, trace_context=trace_context):
            pass
        if final is None:
            raise ServingError("the engine returned no output")
        return final


def _client_request_id(request_id: str | None) -> str:
    """The id echoed to the client: its own (bounded, printable) or a fresh one."""
    if not request_id:
        return f"req-{uuid.uuid4().hex}"
    if len(request_id) > 128 or not request_id.isprintable():
        raise InvalidArgument("request_id must be at most 128 printable characters", field="request_id")
    return request_id


def _leading_field(message: str, default: str) -> str:
    head = message.split(" ", 1)[0].rstrip(":")
    return head if head.startswith(("messages", "tools")) else default


def media_token_ids(tokenizer: Gemma4Tokenizer) -> MediaTokenIds | None:
    """The media control tokens as this tokenizer spells them (what the template's markers encode to),
    or None when its vocabulary lacks any of them."""
    tokens = (IMAGE, AUDIO, VIDEO, IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END)
    ids = [tokenizer.token_to_id(token.text) for token in tokens]
    return None if None in ids else MediaTokenIds(*ids)  # type: ignore[arg-type]
