"""Property-based fuzzing of the served platform: generated gRPC messages and HTTP bodies, hostile ones
included, against real Ray Serve (tiny MoE model, CPU, loopback).

Every answer must be a success or a clear client error (gRPC INVALID_ARGUMENT and friends, HTTP 4xx in
OpenAI's error format), never INTERNAL / UNKNOWN / 5xx, never a traceback and never a hang (each call
has a deadline; missing it fails the property). Meanwhile well-formed streams run alongside and must
get exactly the tokens they get on a quiet platform; afterwards the platform must be healthy with no
KV blocks held. Bounded: a fixed number of examples per property, derandomized so CI runs the same
inputs every time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc
from platform_fixtures import TINY_MOE_SETTINGS, kv_used_and_aborted, served_platform, wait_until

KEY = "fuzz-key-1"
CALL_TIMEOUT_S = 60
CLIENT_CODES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND,
}
FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
METHODS = ("Generate", "GenerateStream", "Chat", "ChatStream", "Tokenize", "CountTokens", "GetModelInfo", "Health")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    keys = tmp_path_factory.mktemp("fuzz") / "keys"
    keys.write_text(f"{KEY} name=fuzz priority=-2..2\n")
    config = {
        **TINY_MOE_SETTINGS,
        "gateway": {"api_keys_file": str(keys), "default_max_tokens": 4, "max_pending_requests": 64},
        "limits": {"max_request_bytes": 256 << 10, "max_output_tokens": 16},
    }
    with served_platform(config) as served, grpc.insecure_channel(served.grpc_target) as channel:
        yield {"served": served, "channel": channel, "stub": pb_grpc.Gemma4ServingStub(channel)}


# ---------------------------------------------------------------------------- inputs
text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "<|turn>", "<turn|>", "<|tool_call>call:f{", '<|"|>', "<bos>", "\x00", "\ud7ff\ue000",
                     "🎉" * 30, "a" * 3000, "<|image|>" * 5]),
)
small_int = st.one_of(st.integers(-3, 40), st.sampled_from([0, 2**31 - 1, -(2**31)]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=True), text)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=20)
deep_json = st.integers(1, 400).map(lambda depth: "[" * depth + "]" * depth)
json_text = st.one_of(json_value.map(lambda v: json.dumps(v)), deep_json, text)


def sampling() -> st.SearchStrategy[pb.SamplingParams]:
    return st.builds(
        pb.SamplingParams,
        temperature=st.one_of(st.floats(-1, 3), st.just(0.0), st.just(float("nan")), st.just(float("inf"))),
        top_p=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
        top_k=small_int,
        max_tokens=st.integers(-2, 20),
        min_tokens=st.integers(-2, 20),
        stop=st.lists(text, max_size=5),
        stop_token_ids=st.lists(st.integers(-5, 700), max_size=8),
        logprobs=st.integers(-1, 25),
        seed=st.integers(-5, 2**63 - 1),
        ignore_eos=st.booleans(),
    )


part = st.one_of(
    st.builds(pb.Part, text=text),
    st.builds(pb.Part, image=st.builds(pb.ImageInput, data=st.binary(max_size=64))),
    st.builds(pb.Part),
)
message = st.builds(
    pb.Message,
    role=st.integers(0, 6),
    parts=st.lists(part, max_size=3),
    tool_calls=st.lists(st.builds(pb.ToolCall, id=text, name=text, arguments_json=json_text), max_size=2),
    tool_responses=st.lists(st.builds(pb.ToolResponse, tool_call_id=text, name=text, response_json=json_text), max_size=2),
    reasoning=text,
)
chat_request = st.builds(
    pb.ChatRequest,
    messages=st.lists(message, max_size=4),
    tools=st.lists(st.builds(pb.Tool, name=text, description=text, parameters_json=json_text), max_size=3),
    thinking=st.booleans(),
    sampling=sampling(),
    request_id=text,
    priority=small_int,
    cache_salt=text,
)
generate_request = st.one_of(
    st.builds(pb.GenerateRequest, text=text, sampling=sampling(), request_id=text, priority=small_int, cache_salt=text),
    st.builds(pb.GenerateRequest, token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20)),
              sampling=sampling()),
)


def corrupted(data: bytes, draw: Any) -> bytes:
    """The serialized message with bytes flipped: invalid UTF-8 in strings, broken lengths, unknown fields."""
    if not data:
        return draw(st.binary(max_size=32))
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.sampled_from([0x80, 0xC0, 0xFF, 0xFE, 0x0A, 0x12]))
    return bytes(raw)


@st.composite
def grpc_call(draw: Any) -> tuple[str, bytes, tuple[tuple[str, str], ...]]:
    method = draw(st.sampled_from(METHODS))
    if method.startswith("Generate"):
        body = draw(generate_request).SerializeToString()
    elif method in ("Chat", "ChatStream", "CountTokens"):
        body = draw(chat_request).SerializeToString()
    elif method == "Tokenize":
        body = pb.TokenizeRequest(text=draw(text)).SerializeToString()
    else:
        body = b""
    if draw(st.integers(0, 4)) == 0:
        body = corrupted(body, draw)
    metadata = draw(st.sampled_from([
        (("authorization", f"Bearer {KEY}"),), (("x-api-key", KEY),), (), (("authorization", "Bearer nope"),),
        (("authorization", "Basic " + KEY),),
    ]))
    return method, body, metadata


# ---------------------------------------------------------------------------- well-formed traffic alongside
def well_formed(stub: pb_grpc.Gemma4ServingStub) -> list[int]:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[2, 105, 40, 41, 42]),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    )
    stream = stub.GenerateStream(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=CALL_TIMEOUT_S)
    return [t for message in stream for t in message.delta_token_ids]


class Bystander:
    """Well-formed streams in a loop, from before the first fuzzed call until `finish`."""

    def __init__(self, stub: pb_grpc.Gemma4ServingStub) -> None:
        self.stub = stub
        self.expected = well_formed(stub)  # on a quiet platform
        self.results: list[list[int] | BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(well_formed(self.stub))
            except BaseException as exc:  # noqa: BLE001 - reported by finish()
                self.results.append(exc)

    def finish(self) -> list[list[int] | BaseException]:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S * 2)
        return self.results


@pytest.fixture(scope="module")
def bystander(platform) -> Iterator[Bystander]:
    streams = Bystander(platform["stub"])
    yield streams
    streams.finish()


# ---------------------------------------------------------------------------- properties
def assert_client_error_only(code: grpc.StatusCode, details: str) -> None:
    assert code in CLIENT_CODES, f"{code}: {details}"
    assert "Traceback" not in details and 'File "' not in details, details


@FUZZ
@given(call=grpc_call())
def test_grpc_answers_are_results_or_client_errors(platform, bystander, call) -> None:
    method, body, metadata = call
    path = f"/gemma4.serving.v1.Gemma4Serving/{method}"
    channel = platform["channel"]
    try:
        if method.endswith("Stream"):
            list(channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=CALL_TIMEOUT_S))
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert_client_error_only(exc.code(), exc.details() or "")


http_field = st.sampled_from([
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
    "stream", "stream_options", "tools", "tool_choice", "logprobs", "top_logprobs", "n", "seed", "priority",
    "cache_salt", "stop_token_ids", "min_tokens", "chat_template_kwargs", "reasoning_effort", "response_format",
])
hostile_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bot"]), "content": json_value}),
    st.fixed_dictionaries({
        "role": st.just("assistant"),
        "tool_calls": st.lists(st.fixed_dictionaries({
            "id": text, "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": text, "arguments": st.one_of(json_text, json_value)}),
        }), max_size=2),
    }),
    json_value,
)
hostile_tool = st.one_of(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({
        "name": text, "parameters": st.one_of(json_value, deep_json.map(json.loads))})}),
    json_value,
)


@st.composite
def http_call(draw: Any) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    body: dict[str, Any] = {"model": "tiny-moe", "max_tokens": draw(st.integers(1, 6))}
    if path.endswith("chat/completions"):
        body["messages"] = draw(st.lists(hostile_message, max_size=4))
        if draw(st.booleans()):
            body["tools"] = draw(st.lists(hostile_tool, max_size=3))
    else:
        body["prompt"] = draw(st.one_of(text, st.lists(st.integers(-5, 700), max_size=10), json_value))
    for field in draw(st.lists(http_field, max_size=4)):
        body[field] = draw(json_value)
    raw = json.dumps(body).encode()
    choice = draw(st.integers(0, 9))
    if choice == 0:
        raw = corrupted(raw, draw)
    elif choice == 1:
        raw = draw(st.binary(max_size=64))
    return path, raw


@FUZZ
@given(call=http_call())
def test_http_answers_are_results_or_client_errors(platform, bystander, call) -> None:
    path, raw = call
    response = httpx.post(
        platform["served"].http + path, content=raw, timeout=CALL_TIMEOUT_S,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
        assert "Traceback" not in error["message"], error
    elif '"stream": true' not in raw.decode(errors="replace"):
        assert response.json()["choices"], response.text


# ---------------------------------------------------------------------------- after (runs last in this module)
def test_well_formed_streams_were_undisturbed_and_the_platform_is_healthy(platform, bystander) -> None:
    results = bystander.finish()
    assert results and all(result == bystander.expected for result in results), [r for r in results if r != bystander.expected][:3]
    http = platform["served"].http
    assert httpx.get(http + "/readyz", timeout=10).status_code == 200
    assert well_formed(platform["stub"]) == bystander.expected

    def kv_free() -> bool:
        return kv_used_and_aborted(httpx.get(http + "/metrics", timeout=10).text)[0] == 0

    wait_until(kv_free, 60, what="every KV block to be free after fuzzing")
