"""The gateway's guards one by one: key grants, admission, request limits, the body limit, error mapping,
one-line logs and the refusal to serve unauthenticated beyond loopback."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from gemma4_platform.admission import Admission
from gemma4_platform.auth import ANONYMOUS, ApiKeys, KeyGrant, parse_key_entry, presented_keys
from gemma4_platform.body_limit import BodyLimit
from gemma4_platform.errors import InvalidArgument, RateLimited, ServingError, Unauthenticated
from gemma4_platform.graph import check_exposure
from gemma4_platform.request_limits import check_chat, check_prompt_bound, json_depth, rendered_chars
from gemma4_platform.serve_logs import ClientErrorsAsOneLine
from gemma4_platform.settings import LimitSettings, PlatformSettings


# ---------------------------------------------------------------------------- keys and grants
def test_key_entries_carry_their_grants() -> None:
    key, grant = parse_key_entry("sk-1  name=batch priority=0..10 rate=2 burst=4 streams=8 cache_salt=t1")
    assert key == "sk-1"
    assert grant == KeyGrant("batch", (0, 10), rate=2.0, burst=4.0, max_streams=8, cache_salt="t1")
    key, grant = parse_key_entry("sk-2")
    assert grant.priority_range == (0, 0) and grant.name.startswith("key-") and "sk-2" not in grant.name


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sk-s3cret colour=blue", "unknown attribute 'colour=blue'"),
        ("sk-s3cret priority=5..1", "empty"),
        ("sk-s3cret rate=-1", "rate must be positive"),
        ("sk-s3cret streams=x", "invalid literal"),
    ],
)
def test_malformed_key_entries_name_the_attribute_not_the_key(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_key_entry(entry)
    assert "sk-s3cret" not in str(info.value)


def test_priority_is_granted_per_key() -> None:
    ops = KeyGrant("ops", (-5, 5))
    assert (ops.priority(None), ops.priority(-5), ops.priority(5)) == (0, -5, 5)
    assert KeyGrant("batch", (3, 10)).priority(None) == 3  # the value in range nearest to 0
    for grant, asked in ((ops, 6), (ANONYMOUS, 1), (ANONYMOUS, -1)):
        with pytest.raises(InvalidArgument) as info:
            grant.priority(asked)
        assert info.value.field == "priority"
    assert ANONYMOUS.priority(0) == 0


def test_api_keys_authenticate_in_constant_time_and_by_either_header() -> None:
    keys = ApiKeys(["sk-a name=a", "sk-b name=b"])
    assert keys.authenticate(presented_keys([("authorization", "Bearer sk-b")])).name == "b"
    assert keys.authenticate(presented_keys({"x-api-key": "sk-a"})).name == "a"
    for headers in ([], [("authorization", "sk-a")], [("authorization", "Basic sk-a")], [("x-api-key", "sk-c")]):
        with pytest.raises(Unauthenticated):
            keys.authenticate(presented_keys(headers))
    assert ApiKeys([]).authenticate([]) is ANONYMOUS


# ---------------------------------------------------------------------------- admission
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_is_a_token_bucket_with_a_retry_hint() -> None:
    clock = Clock()
    admission = Admission(clock)
    grant = KeyGrant("k", rate=1.0, burst=2.0)
    for _ in range(2):
        with admission.admit(grant):
            pass
    with pytest.raises(RateLimited) as info:
        with admission.admit(grant):
            pass
    assert info.value.retry_after_s == pytest.approx(1.0) and info.value.grpc_code == "RESOURCE_EXHAUSTED"
    clock.now += 1.0
    with admission.admit(grant):
        pass
    with admission.admit(KeyGrant("other", rate=1.0)):  # another key has its own bucket
        pass


def test_stream_limit_counts_requests_in_flight() -> None:
    admission = Admission(Clock())
    grant = KeyGrant("k", max_streams=2)
    with admission.admit(grant), admission.admit(grant):
        with pytest.raises(RateLimited, match="2 requests in flight"):
            with admission.admit(grant):
                pass
    with admission.admit(grant):  # released when the earlier ones ended
        pass


# ---------------------------------------------------------------------------- request limits
def test_json_depth_is_measured_without_recursion() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_000
    assert (json_depth(1), json_depth([]), json_depth({"a": [1, {"b": 2}]})) == (0, 1, 3)


def call(arguments: Any) -> dict[str, Any]:
    return {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}


def test_chat_checks_decode_arguments_and_refuse_what_would_render_wrongly() -> None:
    limits = LimitSettings(max_json_depth=4)
    messages, tools = check_chat([{"role": "user", "content": "x"}, call('{"a": [1]}')], None, limits)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": [1]}
    assert tools is None
    refusals = {
        "messages[0].tool_calls[0].function.arguments": ([call("[1, 2]")], None),
        "tools[0].function.parameters": ([], [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
        "messages[0].content": ([{"role": "tool", "content": {"a": {"b": {"c": {"d": {"e": 1}}}}}}], None),
    }
    for field, (conversation, tool_list) in refusals.items():
        with pytest.raises(InvalidArgument) as info:
            check_chat(conversation, tool_list, limits)
        assert info.value.field == field


def test_the_prompt_bound_counts_only_text_the_template_writes() -> None:
    messages = [
        {"role": "system", "content": "  sys  "},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image", "image": "..."}]},
        {"role": "assistant", "content": "<|channel>a long thought<channel|>ok", **call({"city": "Paris"})},
        {"role": "tool", "tool_call_id": "c", "content": {"temp": "20"}},
    ]
    assert rendered_chars(messages) == len("sys") + len("hello") + len("cityParis") + len("temp20")
    check_prompt_bound(100, longest_token_chars=10, max_prompt_tokens=10, where="messages")
    with pytest.raises(InvalidArgument, match="at least 11 tokens"):
        check_prompt_bound(101, longest_token_chars=10, max_prompt_tokens=10, where="messages")


# ---------------------------------------------------------------------------- the body limit
async def _run_asgi(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes], path: str = "/v1/x") -> tuple[list[dict], list[dict]]:
    sent: list[dict] = []
    received: list[dict] = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": headers, "method": "POST"}
    await BodyLimit(_recording_app(received), max_bytes=10)(scope, receive, send)
    return sent, received


def _recording_app(received: list[dict]) -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        if received[-1]["type"] != "http.disconnect":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_body_limit_refuses_from_the_declared_length_without_reading() -> None:
    sent, received = asyncio.run(_run_asgi(None, [(b"content-length", b"11")], [b"x" * 11]))
    assert sent[0]["status"] == 413 and received == []
    assert json.loads(sent[1]["body"])["error"]["type"] == "invalid_request_error"


def test_body_limit_counts_an_undeclared_body_and_stops_the_app() -> None:
    sent, received = asyncio.run(_run_asgi(None, [], [b"x" * 6, b"x" * 6]))
    assert [m["type"] for m in received] == ["http.request", "http.disconnect"]
    assert sent[0]["status"] == 413
    sent, _ = asyncio.run(_run_asgi(None, [(b"content-length", b"4")], [b"abcd"]))
    assert sent[0]["status"] == 200
    sent, _ = asyncio.run(_run_asgi(None, [], [b""], path="/-/routes"))
    assert sent[0]["status"] == 404


# ---------------------------------------------------------------------------- errors and logs
def test_a_serving_error_keeps_its_class_and_retry_hint_under_a_new_message() -> None:
    error = RateLimited("slow down", retry_after_s=2.5)
    renamed = error.with_message("slower", field="sampling")
    assert type(renamed) is RateLimited and renamed.retry_after_s == 2.5
    assert (renamed.message, renamed.field, str(renamed)) == ("slower", "sampling", "slower")


def record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException as raised:  # noqa: BLE001
        return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", (), (type(raised), raised, raised.__traceback__))


class Wrapped(Exception):
    """Like Ray's RayTaskError: the replica's exception is its `cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("wrapped")
        self.cause = cause


def test_client_errors_become_one_line_and_unexpected_ones_keep_their_traceback() -> None:
    quiet = ClientErrorsAsOneLine()
    for exc in (InvalidArgument("temperature must be in [0, 100]"), Wrapped(Unauthenticated("no key"))):
        line = record(exc)
        assert quiet.filter(line) and line.exc_info is None and line.levelno == logging.INFO
        assert line.getMessage().startswith("Request failed. ") and exc.__class__.__name__ not in line.getMessage()
    for exc in (RuntimeError("bug"), ServingError("internal")):
        line = record(exc)
        assert quiet.filter(line) and line.exc_info is not None and line.levelno == logging.ERROR


# ---------------------------------------------------------------------------- exposure
def test_serving_anyone_beyond_loopback_takes_an_explicit_setting(caplog: pytest.LogCaptureFixture) -> None:
    check_exposure(PlatformSettings(), ApiKeys([]))  # 127.0.0.1: the local default stays open
    exposed = {"server": {"host": "0.0.0.0"}}
    with pytest.raises(ValueError, match="allow_unauthenticated"):
        check_exposure(PlatformSettings.model_validate(exposed), ApiKeys([]))
    check_exposure(PlatformSettings.model_validate(exposed), ApiKeys(["sk-1"]))
    with caplog.at_level(logging.WARNING):
        check_exposure(PlatformSettings.model_validate({**exposed, "gateway": {"allow_unauthenticated": True}}), ApiKeys([]))
    assert "WITHOUT authentication" in caplog.text
    grpc_only = {"server": {"grpc_host": "::"}}
    with pytest.raises(ValueError):
        check_exposure(PlatformSettings.model_validate(grpc_only), ApiKeys([]))
