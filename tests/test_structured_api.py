"""Structured outputs through both doors of one served tiny random-weight model (OpenAI HTTP and gRPC).

A random-weight model only produces valid documents when the constraint really holds: every answer
to 200 requests over ten JSON schemas parses and validates, every forced tool call parses (the server
runs `gemma4.chat.parse`) and matches its tool's parameters, and invalid schemas are refused naming
the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
import torch

import gemma4
from gemma4.tiny import write_tiny_checkpoint
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1.serving_pb2_grpc import Gemma4ServingStub
from gemma4_platform.backend import LocalBackend
from gemma4_platform.frontend import Frontend, ModelDescription
from gemma4_platform.grpc_service import Gemma4ServingService
from gemma4_platform.openai_api import build_openai_app
from json_schemas import MAX_TOKENS, SCHEMAS
from test_grpc_service import ServerLoop
from test_openai_api import serving

NAMES = sorted(SCHEMAS)
CONCURRENCY = 16
PROMPT = "Answer with the requested data."


@dataclass
class Served:
    url: str
    stub: Gemma4ServingStub

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One engine and one Frontend behind both the OpenAI app and a gRPC server."""
    checkpoint: Path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-structured"))
    llm = gemma4.LLM(
        checkpoint, dtype=torch.float32, max_num_batched_tokens=512, num_kv_blocks=640, max_num_seqs=CONCURRENCY
    )
    engine = gemma4.AsyncEngine(llm.engine)
    model = ModelDescription(name="tiny", variant="e2b", max_model_len=2048, vocab_size=llm.tokenizer.vocab_size)
    frontend = Frontend(llm.tokenizer, model, LocalBackend(engine))
    servers = ServerLoop()
    try:
        stub = servers.serve(Gemma4ServingService(frontend))
        with serving(build_openai_app(lambda: frontend)) as url:
            yield Served(url, stub)
    finally:
        servers.close()
        engine.shutdown()


def sampling(seed: int) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])


def openai_chat(served: Served, name: str, seed: int) -> tuple[str, str]:
    response = served.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}},
        temperature=1.0,
        seed=seed,
        max_tokens=MAX_TOKENS,
    )
    return response.choices[0].message.content or "", response.choices[0].finish_reason


def openai_completion(served: Served, name: str, seed: int) -> tuple[str, str]:
    response = served.client().completions.create(
        model="tiny",
        prompt=PROMPT,
        temperature=1.0,
        seed=seed,
        max_tokens=MAX_TOKENS,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}},
    )
    return response.choices[0].text, response.choices[0].finish_reason


def grpc_chat(served: Served, name: str, seed: int) -> tuple[str, str]:
    response = served.stub.Chat(
        pb.ChatRequest(
            messages=[user(PROMPT)],
            sampling=sampling(seed),
            response_format=pb.StructuredOutput(json_schema=json.dumps(SCHEMAS[name])),
        ),
        timeout=120,
    )
    return response.text, pb.FinishReason.Name(response.finish_reason)


def grpc_generate(served: Served, name: str, seed: int) -> tuple[str, str]:
    response = served.stub.Generate(
        pb.GenerateRequest(
            text=PROMPT, sampling=sampling(seed), response_format=pb.StructuredOutput(json_schema=json.dumps(SCHEMAS[name]))
        ),
        timeout=120,
    )
    return response.text, pb.FinishReason.Name(response.finish_reason)


DOORS: list[Callable[[Served, str, int], tuple[str, str]]] = [openai_chat, openai_completion, grpc_chat, grpc_generate]


def test_200_requests_over_10_schemas_all_validate(served: Served) -> None:
    jobs = [(DOORS[i % len(DOORS)], NAMES[i % len(NAMES)], i) for i in range(200)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda job: (job, job[0](served, job[1], job[2])), jobs))
    for (door, name, seed), (text, finish) in results:
        where = f"{door.__name__} schema={name} seed={seed}: {text!r}"
        assert finish in ("stop", "FINISH_REASON_STOP"), where
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": f"Takes {name}", "parameters": SCHEMAS[name]}}


def test_forced_tool_calls_parse_and_match_their_schema(served: Served) -> None:
    tools = [tool(name) for name in NAMES[:4]]

    def openai_call(i: int) -> list[tuple[str, dict[str, Any]]]:
        forced = NAMES[i % 4]
        choice: Any = "required" if i % 2 else {"type": "function", "function": {"name": forced}}
        response = served.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Call a tool."}], tools=tools, tool_choice=choice,
            temperature=1.0, seed=i, max_tokens=MAX_TOKENS, parallel_tool_calls=False,
        )
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "tool_calls" and not message.content, message
        assert i % 2 or message.tool_calls[0].function.name == forced
        return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]

    def grpc_call(i: int) -> list[tuple[str, dict[str, Any]]]:
        forced = NAMES[i % 4]
        choice = pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED) if i % 2 else pb.ToolChoice(function_name=forced)
        response = served.stub.Chat(
            pb.ChatRequest(
                messages=[user("Call a tool.")],
                tools=[pb.Tool(name=t["function"]["name"], parameters_json=json.dumps(t["function"]["parameters"])) for t in tools],
                tool_choice=choice,
                sampling=sampling(1000 + i),
            ),
            timeout=120,
        )
        assert response.finish_reason == pb.FINISH_REASON_TOOL_CALLS and not response.text, response
        assert i % 2 or response.tool_calls[0].name == forced
        return [(call.name, json.loads(call.arguments_json)) for call in response.tool_calls]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        calls = [*pool.map(openai_call, range(12)), *pool.map(grpc_call, range(12))]
    for made in calls:
        assert made
        for name, arguments in made:
            jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}},
         "response_format.json_schema.schema"),
        ({"tools": [tool("weather")], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}}}],
          "tool_choice": "required"}, "tools[0].function.parameters.properties.a.format"),
    ],
)
def test_invalid_constraints_are_400_naming_the_field(served: Served, body: dict[str, Any], param: str) -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=request, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"response_format": pb.StructuredOutput(json_schema='{"type": "strin"}')}, "response_format.json_schema"),
        ({"response_format": pb.StructuredOutput(json_schema="[")}, "response_format.json_schema"),
        ({"response_format": pb.StructuredOutput(regex="a(?<=b)")}, "response_format.regex"),
        ({"tool_choice": pb.ToolChoice(function_name="nope")}, "tool_choice.function_name"),
        ({"tools": [pb.Tool(name="f", parameters_json='{"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}')],
          "tool_choice": pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)}, "tools[0].parameters_json.properties.a.format"),
    ],
)
def test_invalid_constraints_are_invalid_argument_naming_the_field(
    served: Served, request_fields: dict[str, Any], field: str
) -> None:
    fields = {"tools": [pb.Tool(name="weather", parameters_json=json.dumps(SCHEMAS["weather"]))], **request_fields}
    request = pb.ChatRequest(messages=[user("hi")], sampling=pb.SamplingParams(max_tokens=4), **fields)
    with pytest.raises(grpc.RpcError) as error:
        served.stub.Chat(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()


def test_other_constraint_kinds_through_both_doors(served: Served) -> None:
    client = served.client()
    messages = [{"role": "user", "content": PROMPT}]

    def chat(**extra: Any) -> str:
        response = client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, seed=7, **extra)
        return response.choices[0].message.content or ""

    assert chat(extra_body={"guided_choice": ["yes", "no", "maybe"]}) in ("yes", "no", "maybe")
    assert re.fullmatch(r"[a-z]{3,8}-[0-9]{2}", chat(extra_body={"guided_regex": "[a-z]{3,8}-[0-9]{2}"}))
    chunks = client.chat.completions.create(
        model="tiny", messages=messages, temperature=1.0, seed=8, max_tokens=MAX_TOKENS, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMAS["order"]}},
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(streamed), SCHEMAS["order"])

    def grpc_generate(constraint: pb.StructuredOutput) -> str:
        request = pb.GenerateRequest(text=PROMPT, sampling=sampling(9), response_format=constraint)
        return served.stub.Generate(request, timeout=120).text

    assert grpc_generate(pb.StructuredOutput(choice=pb.ChoiceList(options=["red", "green"]))) in ("red", "green")
    assert re.fullmatch(r"[0-9]{4}", grpc_generate(pb.StructuredOutput(regex="[0-9]{4}")))


def test_strict_tool_under_auto_is_constrained_when_called(served: Served) -> None:
    """Under "auto" the model may answer in text; whenever it calls the strict tool, the call is valid."""
    strict = {**tool("weather"), "function": {**tool("weather")["function"], "strict": True}}


    def ask(seed: int) -> Any:
        return served.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[strict], tool_choice="auto",
            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
        ).choices[0]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        choices = list(pool.map(ask, range(8)))
    called = 0
    for choice in choices:
        if choice.finish_reason == "length":
            continue  # cut off, possibly inside a call
        for call in choice.message.tool_calls or ():
            called += 1
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["weather"])
        assert "<|tool_call>" not in (choice.message.content or ""), choice.message.content
    assert called, "no seed made the model call the tool"
