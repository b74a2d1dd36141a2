"""The gRPC API end to end: real grpc.aio servers on 127.0.0.1 over a tiny checkpoint's engine.

The servers share one event loop in a background thread; the tests call them with the generated
sync stub. A scripted backend stands in for the model where exact chat events (thinking, tool calls)
or the request the engine receives must be known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from gemma4 import LLM, AsyncEngine, SamplingParams
from gemma4.chat import ChatDelta, ToolCall
from gemma4.engine import FinishReason, RequestOutput, Usage
from gemma4.engine.outputs import RequestMetrics
from gemma4.tiny import write_tiny_checkpoint
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1.serving_pb2_grpc import Gemma4ServingStub
from gemma4_platform.auth import ApiKeys
from gemma4_platform.backend import EngineRequest, LocalBackend
from gemma4_platform.errors import ServingError
from gemma4_platform.frontend import Frontend, ModelDescription
from gemma4_platform.grpc_service import Gemma4ServingService, GrpcServicer, add_servicer_to_server

VOCAB = 512
MAX_MODEL_LEN = 512
API_KEY = "s3cret"
PROMPT_IDS = [2, 323, 367, 311, 412, 434]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# ---------------------------------------------------------------------- fixtures


class ServerLoop:
    """An event loop in a thread hosting this module's grpc.aio servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-servers", daemon=True)
        self.thread.start()
        self.servers: list[grpc.aio.Server] = []
        self.channels: list[grpc.Channel] = []

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def serve(self, service: Gemma4ServingService) -> Gemma4ServingStub:
        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            add_servicer_to_server(server, service)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = self.run(start())
        self.servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return Gemma4ServingStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for server in self.servers:
            self.run(server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class ScriptedBackend:
    """Replays fixed chat events as engine outputs (one output per step) and records each request."""

    def __init__(self, steps: list[list[ChatDelta]], finish_reason: FinishReason = FinishReason.STOP) -> None:
        self.steps = steps
        self.finish_reason = finish_reason
        self.requests: list[EngineRequest] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        for i, deltas in enumerate(self.steps, start=1):
            delta = RequestOutput(request.request_id, delta_token_ids=[i - 1], chat_deltas=deltas)
            if i < len(self.steps):
                yield delta
                continue
            yield dataclasses.replace(
                delta,
                finished=True,
                finish_reason=self.finish_reason,
                stop_reason=106,
                prompt_token_ids=request.prompt_token_ids,
                token_ids=list(range(i)),
                text="",
                usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=i),
                metrics=RequestMetrics(0.0, None, None, (), 0),
            )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), variant="e2b")


def load(checkpoint: Path) -> LLM:
    return LLM(checkpoint, dtype=torch.float32, max_num_batched_tokens=256, num_kv_blocks=256)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> LLM:
    """A second engine for offline generation (the served one is stepped by its own thread)."""
    return load(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(load(checkpoint).engine)
    yield async_engine
    async_engine.shutdown()


def make_frontend(engine: AsyncEngine, backend: Any = None) -> Frontend:
    model = ModelDescription(name="tiny", variant="e2b", max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB)
    return Frontend(engine.engine.tokenizer, model, backend or LocalBackend(engine))


@pytest.fixture(scope="module")
def frontend(engine: AsyncEngine) -> Frontend:
    return make_frontend(engine)


@pytest.fixture(scope="module")
def servers() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def stub(servers: ServerLoop, frontend: Frontend) -> Gemma4ServingStub:
    return servers.serve(Gemma4ServingService(frontend))


@pytest.fixture(scope="module")
def auth_stub(servers: ServerLoop, frontend: Frontend) -> Gemma4ServingStub:
    return servers.serve(Gemma4ServingService(frontend, api_keys=ApiKeys([API_KEY])))


def greedy(max_tokens: int, **fields: Any) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0, max_tokens=max_tokens, **fields)


def text_message(role: pb.Role, text: str) -> pb.Message:
    return pb.Message(role=role, parts=[pb.Part(text=text)])


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


async def wait_for_abort(engine: AsyncEngine, aborts_before: int, timeout: float = 5.0) -> None:
    """Until an abort was counted and no KV block is held (an aborted request frees its blocks)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.finished_requests["abort"] > aborts_before and all(g.used_blocks == 0 for g in stats.kv_cache):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the request was not aborted within {timeout}s: {stats}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- generation


def test_generate_matches_offline_generation(stub: Gemma4ServingStub, reference: LLM) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=greedy(16, ignore_eos=True), request_id="parity-1"
    )
    response = stub.Generate(request, timeout=10)
    offline = reference.generate(PROMPT_IDS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert list(response.token_ids) == offline.token_ids
    assert response.text == offline.text
    assert response.request_id == "parity-1"
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(PROMPT_IDS), 16)


def test_generate_stream_concatenates_to_unary(stub: Gemma4ServingStub) -> None:
    request = pb.GenerateRequest(text="hello world", sampling=greedy(12, ignore_eos=True, logprobs=2))
    unary = stub.Generate(request, timeout=10)
    chunks = list(stub.GenerateStream(request, timeout=10))
    assert "".join(c.delta_text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.delta_token_ids] == list(unary.token_ids)
    assert [c.HasField("usage") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens == 12
    for chunk in chunks:
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.delta_token_ids)
        assert all(len(lp.top) == 2 for lp in chunk.logprobs)
    assert len(unary.logprobs) == len(unary.token_ids)


def test_chat_stream_concatenates_to_chat(stub: Gemma4ServingStub) -> None:
    request = pb.ChatRequest(
        messages=[text_message(pb.ROLE_SYSTEM, "Be brief."), text_message(pb.ROLE_USER, "Hi there")],
        sampling=greedy(24),
    )
    unary = stub.Chat(request, timeout=10)
    chunks = list(stub.ChatStream(request, timeout=10))
    assert "".join(c.text for c in chunks) == unary.text
    assert "".join(c.thinking for c in chunks) == unary.thinking
    final = chunks[-1]
    assert final.WhichOneof("delta") is None and final.HasField("usage")
    assert not any(c.HasField("usage") for c in chunks[:-1])
    assert final.finish_reason == unary.finish_reason
    assert unary.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        unary.usage.prompt_tokens,
        unary.usage.completion_tokens,
    )  # the second run may hit the prefix cache
    assert unary.usage.prompt_tokens == stub.CountTokens(request, timeout=10).prompt_tokens
    assert 0 < unary.usage.completion_tokens <= 24


# ---------------------------------------------------------------------- utilities


def test_tokenize_model_info_and_health(stub: Gemma4ServingStub, frontend: Frontend) -> None:
    tokens = stub.Tokenize(pb.TokenizeRequest(text="hello world"), timeout=10)
    assert list(tokens.token_ids) == frontend.tokenizer.encode("hello world")
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert (info.model, info.variant, info.max_model_len, info.vocab_size) == ("tiny", "e2b", MAX_MODEL_LEN, VOCAB)
    assert list(info.modalities) == ["text"]
    assert stub.Health(pb.HealthRequest(), timeout=10) == pb.HealthResponse(ready=True, ready_replicas=1)


def test_health_asks_the_host(servers: ServerLoop, frontend: Frontend) -> None:
    async def none_ready() -> dict[str, Any]:
        return {"ready": False, "ready_replicas": 0}

    stub = servers.serve(Gemma4ServingService(frontend, health=none_ready))
    assert stub.Health(pb.HealthRequest(), timeout=10) == pb.HealthResponse(ready=False, ready_replicas=0)


def test_count_tokens_converts_a_tool_conversation(stub: Gemma4ServingStub, frontend: Frontend) -> None:
    """Proto messages render exactly as the equivalent OpenAI-style messages."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    request = pb.ChatRequest(
        messages=[
            text_message(pb.ROLE_SYSTEM, "You check the weather."),
            text_message(pb.ROLE_USER, "Paris and Rome?"),
            pb.Message(
                role=pb.ROLE_MODEL,
                reasoning="Two cities.",
                tool_calls=[
                    pb.ToolCall(id="a", name="weather", arguments_json='{"city": "Paris"}'),
                    pb.ToolCall(id="b", name="weather", arguments_json='{"city": "Rome"}'),
                ],
            ),
            pb.Message(
                role=pb.ROLE_TOOL,
                tool_responses=[
                    pb.ToolResponse(tool_call_id="a", response_json='{"temp": 20}'),
                    pb.ToolResponse(name="weather", response_json="[1, 2]"),
                ],
            ),
            text_message(pb.ROLE_MODEL, "20 and warm."),
            text_message(pb.ROLE_USER, "Thanks"),
        ],
        tools=[pb.Tool(name="weather", description="Current weather", parameters_json=json.dumps(schema))],
        thinking=True,
    )
    calls = [
        {"id": "a", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You check the weather."}]},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": "Two cities."},
        {"role": "tool", "tool_call_id": "a", "content": {"temp": 20}},
        {"role": "tool", "name": "weather", "content": {"value": [1, 2]}},
        {"role": "assistant", "content": "20 and warm."},
        {"role": "user", "content": "Thanks"},
    ]
    tools = [
        {"type": "function", "function": {"name": "weather", "description": "Current weather", "parameters": schema}}
    ]
    expected = asyncio.run(frontend.chat_prompt(messages, tools=tools, thinking=True)).token_ids
    assert stub.CountTokens(request, timeout=10).prompt_tokens == len(expected)


def test_scripted_chat_events_become_thinking_text_and_tool_calls(
    servers: ServerLoop, engine: AsyncEngine, frontend: Frontend
) -> None:
    backend = ScriptedBackend(
        [
            [ChatDelta("thinking", "let me ")],
            [ChatDelta("thinking", "check"), ChatDelta("content", "Calling.")],
            [
                ChatDelta("tool_call", tool_call=ToolCall("weather", {"city": "Paris"})),
                ChatDelta("content", "<|tool_call>broken"),
                ChatDelta("error", "unparsable tool call"),
                ChatDelta("tool_call", tool_call=ToolCall("time", {})),
            ],
        ]
    )
    stub = servers.serve(Gemma4ServingService(make_frontend(engine, backend)))
    request = pb.ChatRequest(messages=[text_message(pb.ROLE_USER, "weather?")], request_id="scripted")
    metadata = (("traceparent", TRACEPARENT),)
    chunks = list(stub.ChatStream(request, timeout=10, metadata=metadata))
    assert [c.WhichOneof("delta") for c in chunks] == [
        "thinking",
        "thinking",
        "text",
        "tool_call",
        "text",
        "tool_call",
        None,
    ]
    assert chunks[3].tool_call == pb.ToolCall(id="call_0", name="weather", arguments_json='{"city": "Paris"}')
    assert chunks[5].tool_call == pb.ToolCall(id="call_1", name="time", arguments_json="{}")
    assert {c.request_id for c in chunks} == {"scripted"}
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert chunks[-1].usage.thinking_tokens == len(frontend.tokenizer.encode("let me check"))
    assert chunks[-1].usage.completion_tokens == 3

    unary = stub.Chat(request, timeout=10)
    assert (unary.thinking, unary.text) == ("let me check", "Calling.<|tool_call>broken")
    assert list(unary.tool_calls) == [chunks[3].tool_call, chunks[5].tool_call]
    assert unary.finish_reason == pb.FINISH_REASON_TOOL_CALLS and unary.usage == chunks[-1].usage

    trace_id = TRACEPARENT.split("-")[1]
    assert backend.requests[0].trace_context["traceparent"].split("-")[1] == trace_id


def test_generate_stream_reports_stop_reason(servers: ServerLoop, engine: AsyncEngine) -> None:
    stub = servers.serve(Gemma4ServingService(make_frontend(engine, ScriptedBackend([[], []]))))
    chunks = list(stub.GenerateStream(pb.GenerateRequest(text="hi"), timeout=10))
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == (pb.FINISH_REASON_STOP, "106")
    unary = stub.Generate(pb.GenerateRequest(text="hi"), timeout=10)
    assert (unary.finish_reason, unary.stop_reason, list(unary.token_ids)) == (pb.FINISH_REASON_STOP, "106", [0, 1])


# ---------------------------------------------------------------------- errors


def tool_turns(arguments_json: str = "{}", response_json: str = "{}") -> list[pb.Message]:
    return [
        text_message(pb.ROLE_USER, "go"),
        pb.Message(role=pb.ROLE_MODEL, tool_calls=[pb.ToolCall(id="c", name="f", arguments_json=arguments_json)]),
        pb.Message(role=pb.ROLE_TOOL, tool_responses=[pb.ToolResponse(tool_call_id="c", response_json=response_json)]),
    ]


def generate(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(**fields)


def chat(messages: list[pb.Message], **fields: Any) -> pb.ChatRequest:
    return pb.ChatRequest(messages=messages, **fields)


def unary_and_streamed(
    stub: Gemma4ServingStub, request: pb.GenerateRequest | pb.ChatRequest
) -> list[Callable[[], Any]]:
    """The unary and the streaming RPC for the request's type, each run to the end."""
    if isinstance(request, pb.GenerateRequest):
        unary, streamed = stub.Generate, stub.GenerateStream
    else:
        unary, streamed = stub.Chat, stub.ChatStream
    return [lambda: unary(request, timeout=10), lambda: list(streamed(request, timeout=10))]


USER_HI = [text_message(pb.ROLE_USER, "hi")]
INVALID = {
    "temperature": (generate(text="hi", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    "stop": (generate(text="hi", sampling=pb.SamplingParams(stop=["ok", ""])), "sampling.stop[1]"),
    "stop token": (generate(text="hi", sampling=pb.SamplingParams(stop_token_ids=[VOCAB])), "sampling.stop_token_ids"),
    "no prompt": (generate(), "prompt"),
    "empty prompt": (generate(text=""), "prompt must not be empty"),
    "out of vocab": (generate(token_ids=pb.TokenIds(ids=[5, VOCAB])), "outside the vocabulary"),
    "prompt too long": (generate(token_ids=pb.TokenIds(ids=[5] * MAX_MODEL_LEN)), "exceeds the prompt limit"),
    "max_tokens too big": (generate(text="hi", sampling=greedy(MAX_MODEL_LEN)), "sampling.max_tokens"),
    "chat top_p": (chat(USER_HI, sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
    "no messages": (chat([]), "messages"),
    "role unset": (chat([pb.Message(parts=[pb.Part(text="hi")])]), "messages[0].role"),
    "empty part": (chat([pb.Message(role=pb.ROLE_USER, parts=[pb.Part()])]), "messages[0].parts[0]"),
    "no content": (chat([pb.Message(role=pb.ROLE_USER)]), "messages[0].parts"),
    "arguments": (chat(tool_turns(arguments_json="{oops")), "messages[1].tool_calls[0].arguments_json"),
    "arguments not object": (chat(tool_turns(arguments_json="[1]")), "messages[1].tool_calls[0].arguments_json"),
    "response": (chat(tool_turns(response_json="")), "messages[2].tool_responses[0].response_json"),
    "parameters": (chat(USER_HI, tools=[pb.Tool(name="f", parameters_json="nope")]), "tools[0].parameters_json"),
    "tool name": (chat(USER_HI, tools=[pb.Tool(name="")]), "tools[0].name"),
    "call name": (
        chat([*USER_HI, pb.Message(role=pb.ROLE_MODEL, tool_calls=[pb.ToolCall()])]),
        "messages[1].tool_calls[0].name",
    ),
    "orphan tool": (
        chat([*USER_HI, pb.Message(role=pb.ROLE_TOOL, tool_responses=[pb.ToolResponse(name="f", response_json="1")])]),
        "messages[1].tool_responses[0]",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_argument_names_the_field(stub: Gemma4ServingStub, case: str) -> None:
    request, field = INVALID[case]
    for invoke in unary_and_streamed(stub, request):
        error = rpc_error(invoke)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert field in error.details()


@pytest.mark.parametrize(
    "part",
    [
        pb.Part(image=pb.ImageInput(data=b"\x89PNG")),
        pb.Part(audio=pb.AudioInput(data=b"RIFF")),
        pb.Part(video=pb.VideoInput(data=b"x")),
    ],
)
def test_media_parts_are_unimplemented(stub: Gemma4ServingStub, part: pb.Part) -> None:
    """Named by their proto path, though the tool message before them expands into two chat messages."""
    tool_message = pb.Message(
        role=pb.ROLE_TOOL,
        tool_responses=[
            pb.ToolResponse(tool_call_id="c", response_json="1"),
            pb.ToolResponse(name="f", response_json="2"),
        ],
    )
    messages = [*tool_turns()[:2], tool_message, pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="see"), part])]
    request = pb.ChatRequest(messages=messages)
    for error in (
        rpc_error(lambda: stub.Chat(request, timeout=10)),
        rpc_error(lambda: stub.CountTokens(request, timeout=10)),
    ):
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "messages[3].parts[1]" in error.details()


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("x-api-key", "wrong"),), (("authorization", API_KEY),)],
    ids=["none", "wrong bearer", "wrong x-api-key", "no bearer scheme"],
)
def test_missing_or_wrong_api_key_is_unauthenticated(auth_stub: Gemma4ServingStub, metadata: tuple) -> None:
    for invoke in (
        lambda: auth_stub.Health(pb.HealthRequest(), metadata=metadata, timeout=10),
        lambda: list(auth_stub.GenerateStream(pb.GenerateRequest(text="hi"), metadata=metadata, timeout=10)),
    ):
        assert rpc_error(invoke).code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "metadata", [(("authorization", f"Bearer {API_KEY}"),), (("x-api-key", API_KEY),)], ids=["bearer", "x-api-key"]
)
def test_right_api_key_in_either_header(auth_stub: Gemma4ServingStub, metadata: tuple) -> None:
    assert auth_stub.Health(pb.HealthRequest(), metadata=metadata, timeout=10).ready
    request = pb.GenerateRequest(text="hi", sampling=greedy(2))
    assert list(auth_stub.GenerateStream(request, metadata=metadata, timeout=10))[-1].HasField("usage")


# ---------------------------------------------------------------------- cancellation and deadlines


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=greedy(200, ignore_eos=True))


def test_cancelled_stream_aborts_the_request(stub: Gemma4ServingStub, engine: AsyncEngine) -> None:
    aborts = engine.stats().finished_requests["abort"]
    call = stub.GenerateStream(long_request(), timeout=30)
    first = next(call)
    assert first.delta_token_ids
    call.cancel()
    asyncio.run(wait_for_abort(engine, aborts))


def test_deadline_mid_stream_aborts_the_request(stub: Gemma4ServingStub, engine: AsyncEngine) -> None:
    """The deadline is a quarter of the time this machine takes for the whole request (measured first),
    so the call is cut off mid-stream however fast or slow generation is here."""
    room = MAX_MODEL_LEN - len(PROMPT_IDS)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=greedy(room, ignore_eos=True))
    probe = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=greedy(32, ignore_eos=True))
    started = time.monotonic()
    stub.Generate(probe, timeout=60)
    deadline = (time.monotonic() - started) * room / 32 / 4
    aborts = engine.stats().finished_requests["abort"]
    received: list[pb.GenerateStreamResponse] = []

    def read_all() -> None:
        for chunk in stub.GenerateStream(request, timeout=deadline):
            received.append(chunk)

    error = rpc_error(read_all)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received and not received[-1].HasField("usage")  # cut off mid-stream, not finished
    asyncio.run(wait_for_abort(engine, aborts))


def test_closing_the_service_stream_aborts_the_request(frontend: Frontend, engine: AsyncEngine) -> None:
    """The Ray gateway's path: no grpc server, the consumer just stops iterating."""

    class Context:
        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("traceparent", TRACEPARENT)]

    async def scenario() -> None:
        aborts = engine.stats().finished_requests["abort"]
        stream = Gemma4ServingService(frontend).GenerateStream(long_request(), Context())
        assert (await anext(stream)).delta_token_ids
        await stream.aclose()
        await wait_for_abort(engine, aborts)

    asyncio.run(scenario())


def test_expired_deadline_is_refused_before_running(frontend: Frontend) -> None:
    class ExpiredContext:
        code: grpc.StatusCode | None = None

        def invocation_metadata(self) -> list[tuple[str, str]]:
            return []

        def time_remaining(self) -> float:
            return 0.0

        def set_trailing_metadata(self, metadata: tuple) -> None:
            pass

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.code = code
            raise ServingError(details)  # stands in for grpc's AbortError

    async def scenario() -> None:
        servicer = GrpcServicer(Gemma4ServingService(frontend))
        unary, streaming = ExpiredContext(), ExpiredContext()
        with pytest.raises(ServingError):
            await servicer.Generate(pb.GenerateRequest(text="hi"), unary)
        with pytest.raises(ServingError):
            await anext(servicer.GenerateStream(pb.GenerateRequest(text="hi"), streaming))
        assert unary.code == streaming.code == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- the event loop stays free


def test_large_tokenizations_do_not_hold_up_other_calls(servers: ServerLoop, engine: AsyncEngine) -> None:
    """Four 1 MB Tokenize calls are admitted and tokenizing (the test waits for that) when a Health call
    is made: it is answered before any of them finishes, because tokenization runs off the event loop."""
    model = ModelDescription(name="tiny", variant="e2b", max_model_len=10**7, vocab_size=VOCAB)  # no length cap
    frontend = Frontend(engine.engine.tokenizer, model, LocalBackend(engine))
    stub = servers.serve(Gemma4ServingService(frontend))
    finished: list[str] = []

    def tokenize() -> None:
        stub.Tokenize(pb.TokenizeRequest(text="the weather in Paris " * 50_000), timeout=120)
        finished.append("tokenize")

    workers = [threading.Thread(target=tokenize) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 60
        while frontend.pending < 4:  # all four are in the gateway, tokenizing or queued for the pool
            assert time.monotonic() < deadline, "the Tokenize calls were not all admitted"
            time.sleep(0.01)
        assert stub.Health(pb.HealthRequest(), timeout=30).ready
        finished.append("health")
    finally:
        for worker in workers:
            worker.join(120)
    assert finished[0] == "health" and finished.count("tokenize") == 4
