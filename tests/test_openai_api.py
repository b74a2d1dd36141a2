"""The OpenAI HTTP API, served by uvicorn on 127.0.0.1 and called with the real `openai` client and httpx.

Two servers: one over the tiny checkpoint's engine (outputs must equal the offline engine's, errors and
disconnects must behave), and one over a scripted backend, because a random-weight model never writes a
tool call or a thought on purpose.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import openai
import pytest
import torch
import uvicorn

import gemma4
from gemma4.chat import ChatDelta, ToolCall, parse
from gemma4.engine import ChatPrompt, FinishReason, RequestOutput, SamplingParams, Usage
from gemma4.engine.outputs import RequestMetrics
from gemma4.tiny import write_tiny_checkpoint
from gemma4.tokenizer import Gemma4Tokenizer, load_tokenizer
from gemma4_platform.auth import ApiKeys
from gemma4_platform.backend import EngineRequest, LocalBackend
from gemma4_platform.errors import Unavailable
from gemma4_platform.frontend import Frontend, ModelDescription
from gemma4_platform.openai_api import build_openai_app

API_KEY = "test-key"
MAX_MODEL_LEN = 4096
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on an ephemeral 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start within 10 s"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def model_description() -> ModelDescription:
    return ModelDescription(name="tiny", variant="e2b", max_model_len=MAX_MODEL_LEN, vocab_size=512)


def poll(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ------------------------------------------------------------------------------------ real engine
@dataclass
class Served:
    url: str
    engine: gemma4.AsyncEngine
    frontend: Frontend
    reference: gemma4.LLM  # a second engine on the same weights, for offline expectations

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-e2b"))


def load_llm(checkpoint: Path) -> gemma4.LLM:
    return gemma4.LLM(checkpoint, dtype=torch.float32, max_num_batched_tokens=256, num_kv_blocks=256)


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[Served]:
    llm = load_llm(checkpoint)
    engine = gemma4.AsyncEngine(llm.engine)
    frontend = Frontend(llm.tokenizer, model_description(), LocalBackend(engine))
    app = build_openai_app(lambda: frontend, api_keys=ApiKeys([API_KEY]))
    try:
        with serving(app) as url:
            yield Served(url, engine, frontend, load_llm(checkpoint))
    finally:
        engine.shutdown()


def offline(served: Served, prompt: Any, max_tokens: int) -> RequestOutput:
    return served.reference.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def test_models_list(served: Served) -> None:
    models = served.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "google"
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_completion_equals_offline_engine(served: Served, thinking: bool) -> None:
    response = served.client().chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=24,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )
    expected = offline(served, ChatPrompt(MESSAGES, thinking=thinking), 24)
    parsed = parse(expected.text)
    choice = response.choices[0]
    assert (choice.message.content or "") == parsed.content
    assert choice.message.model_extra["reasoning_content"] == (parsed.thinking or None)
    assert [c.function.name for c in choice.message.tool_calls or []] == [c.name for c in parsed.tool_calls]
    assert choice.finish_reason == ("tool_calls" if parsed.tool_calls else expected.finish_reason.value)
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.id.startswith("chatcmpl-") and response.model == "tiny"


def test_streamed_chat_equals_unary(served: Served) -> None:
    client = served.client()
    request = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 32}
    unary = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert content == (unary.choices[0].message.content or "")
    assert reasoning == (unary.choices[0].message.model_extra["reasoning_content"] or "")
    assert chunks[-2].choices[0].finish_reason == unary.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("prompt", ["The capital of France is", [5, 17, 300, 42, 8]], ids=["text", "token_ids"])
def test_completions_equal_offline_engine(served: Served, prompt: str | list[int]) -> None:
    client = served.client()
    expected = offline(served, prompt, 16)
    unary = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=16)
    assert unary.choices[0].text == expected.text
    assert unary.choices[0].finish_reason == expected.finish_reason.value
    assert unary.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert unary.usage.completion_tokens == len(expected.token_ids)
    stream = client.completions.create(
        model="tiny", prompt=prompt, temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == expected.finish_reason.value
    assert chunks[-1].usage == unary.usage


def test_logprobs(served: Served) -> None:
    client = served.client()
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token

    completion = client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=8, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n"),
        ("/v1/chat/completions", {**CHAT, "stop": ["ok", 3]}, 400, "stop[1]"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            501,
            "messages[0].content[0]",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": [7] * MAX_MODEL_LEN}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 999]}, 400, "prompt"),
    ],
)
def test_error_format(served: Served, path: str, body: dict[str, Any], status: int, param: str) -> None:
    with served.http() as http:
        response = http.post(path, json={**body, "user": "ignored", "unknown_field": 1})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"] and error["code"]


def test_malformed_json_body(served: Served) -> None:
    with served.http() as http:
        response = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}])
def test_unauthenticated(served: Served, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
        response = httpx.request(method, served.url + path, json=CHAT, headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        served.client(api_key="wrong").models.list()


def _aborted_and_freed(served: Served, aborts_before: int) -> bool:
    stats = served.engine.stats()
    return (
        stats.finished_requests["abort"] > aborts_before
        and all(group.used_blocks == 0 for group in stats.kv_cache)
        and served.frontend.pending == 0
    )


def test_stream_disconnect_aborts_request(served: Served) -> None:
    aborts = served.engine.stats().finished_requests["abort"]
    body = {**CHAT, "stream": True, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    with served.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in itertools.islice(response.iter_lines(), 20):
            if '"content":"' in line and '"role"' not in line:
                break  # the model is generating: leave now
    assert poll(lambda: _aborted_and_freed(served, aborts)), served.engine.stats()


def test_unary_disconnect_aborts_request(served: Served) -> None:
    aborts = served.engine.stats().finished_requests["abort"]
    body = {**CHAT, "max_tokens": 3000, "ignore_eos": True}
    with served.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=0.5)
    assert poll(lambda: _aborted_and_freed(served, aborts)), served.engine.stats()


# -------------------------------------------------------------------------------- scripted backend
THINKING = [ChatDelta("thinking", "The user wants "), ChatDelta("thinking", "the weather.")]
SCRIPT = [
    THINKING,
    [ChatDelta("content", "Checking.")],
    [],
    [ChatDelta("tool_call", tool_call=ToolCall("get_weather", {"city": "Paris"}))],
    [ChatDelta("tool_call", tool_call=ToolCall("get_weather", {"city": "Zürich"}))],
]


@dataclass
class ScriptedBackend:
    """Yields one output per script entry (each one token); `fail_after` outputs, it raises Unavailable."""

    script: list[list[ChatDelta]] = field(default_factory=lambda: SCRIPT)
    fail_after: int | None = None
    requests: list[EngineRequest] = field(default_factory=list)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        tokens: list[int] = []
        for i, deltas in enumerate(self.script):
            if i == self.fail_after:
                raise Unavailable("replica lost")
            tokens.append(100 + i)
            delta = RequestOutput(request.request_id, delta_token_ids=[tokens[-1]], chat_deltas=deltas)
            if i < len(self.script) - 1:
                yield delta
                continue
            yield dataclasses.replace(
                delta,
                finished=True,
                finish_reason=FinishReason.STOP,
                stop_reason=106,
                prompt_token_ids=request.prompt_token_ids,
                token_ids=tokens,
                text="",
                usage=Usage(len(request.prompt_token_ids), len(tokens), cached_prompt_tokens=4),
                metrics=RequestMetrics(0.0, None, None, (), 0),
            )


@dataclass
class Scripted:
    url: str
    backend: ScriptedBackend
    frontend: Frontend
    tokenizer: Gemma4Tokenizer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def scripted(scripted_server: Scripted) -> Scripted:
    scripted_server.backend.script, scripted_server.backend.fail_after = SCRIPT, None
    scripted_server.backend.requests.clear()
    return scripted_server


@pytest.fixture(scope="module")
def scripted_server(checkpoint: Path) -> Iterator[Scripted]:
    tokenizer = load_tokenizer(checkpoint)
    backend = ScriptedBackend()
    frontend = Frontend(tokenizer, model_description(), backend)
    with serving(build_openai_app(lambda: frontend)) as url:  # no api_keys: open
        yield Scripted(url, backend, frontend, tokenizer)


def test_tool_calls_unary(scripted: Scripted) -> None:
    response = scripted.client().chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Zürich"}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert response.usage.completion_tokens == len(SCRIPT)
    assert response.usage.prompt_tokens_details.cached_tokens == 4
    assert scripted.backend.requests[0].prompt_token_ids == scripted.tokenizer.encode_chat(MESSAGES, tools=TOOLS)


def test_tool_calls_stream(scripted: Scripted) -> None:
    chunks = list(scripted.client().chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The user wants the weather."
    assert "".join(d.content or "" for d in deltas) == "Checking."
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [(c.index, c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "function", "get_weather", {"city": "Paris"}),
        (1, "function", "get_weather", {"city": "Zürich"}),
    ]
    assert all(c.id.startswith("call_") for c in calls)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]
    assert len(chunks) == 1 + 4 + 1  # role, one per output that adds something, finish


def test_no_tool_calls_finish_with_stop(scripted: Scripted) -> None:
    scripted.backend.script = [THINKING, [ChatDelta("content", "Paris.")]]
    message = scripted.client().chat.completions.create(model="tiny", messages=MESSAGES).choices[0]
    assert message.finish_reason == "stop"
    assert message.message.content == "Paris." and message.message.tool_calls is None


@pytest.mark.parametrize(
    ("extra", "thinking"),
    [
        ({}, False),
        ({"thinking": True}, True),
        ({"chat_template_kwargs": {"enable_thinking": True}}, True),
        ({"reasoning_effort": "high"}, True),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, False),
    ],
)
def test_thinking_switch(scripted: Scripted, extra: dict[str, Any], thinking: bool) -> None:
    with httpx.Client(base_url=scripted.url, timeout=10) as http:
        assert http.post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200
    expected = scripted.tokenizer.encode_chat(CHAT["messages"], thinking=thinking)
    assert scripted.backend.requests[0].prompt_token_ids == expected


def test_sampling_fields_reach_the_engine(scripted: Scripted) -> None:
    body = {
        **CHAT,
        "tools": TOOLS,
        "tool_choice": "none",
        "max_completion_tokens": 7,
        "max_tokens": 99,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": -1,
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
        "seed": 3,
        "stop": "END",
        "logprobs": True,
        "top_logprobs": 2,
    }
    with httpx.Client(base_url=scripted.url, timeout=10) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    request = scripted.backend.requests[0]
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p) == (7, 0.5, 0.9, 0, 0.1)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert (params.seed, params.stop, params.logprobs, request.priority) == (3, ("END",), 2, 0)
    assert request.parse_chat
    assert request.prompt_token_ids == scripted.tokenizer.encode_chat(CHAT["messages"])  # tool_choice none: no tools


def test_trace_context_reaches_the_backend(scripted: Scripted) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    with httpx.Client(base_url=scripted.url, timeout=10) as http:
        assert http.post("/v1/completions", json={"prompt": "Hi"}, headers=headers).status_code == 200
    assert scripted.backend.requests[0].trace_context["traceparent"].split("-")[1] == trace_id


@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_first_output_gets_its_status(scripted: Scripted, stream: bool) -> None:
    scripted.backend.fail_after = 0
    with httpx.Client(base_url=scripted.url, timeout=10) as http:
        response = http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "replica lost",
        "type": "server_error",
        "param": None,
        "code": "unavailable",
    }
    assert scripted.frontend.pending == 0


def test_failure_mid_stream_is_an_error_event(scripted: Scripted) -> None:
    scripted.backend.fail_after = 2
    with httpx.Client(base_url=scripted.url, timeout=10) as http:
        response = http.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "replica lost"


def test_queue_full_is_429(scripted: Scripted) -> None:
    policy = scripted.frontend.policy
    scripted.frontend.policy = dataclasses.replace(policy, max_pending_requests=0)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            scripted.client().completions.create(model="tiny", prompt="Hi")
    finally:
        scripted.frontend.policy = policy
    assert caught.value.status_code == 429
    assert caught.value.body["type"] == "rate_limit_error"
    assert caught.value.response.headers["retry-after"] == "1"
