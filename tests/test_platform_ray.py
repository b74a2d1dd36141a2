"""The whole platform on real Ray Serve (CPU, tiny MoE-shaped model): gRPC, OpenAI HTTP, lifecycle,
autoscaling, metrics and traces. One Ray instance and one application serve the whole module."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import ray
import torch
from PIL import Image
from ray import serve

from gemma4 import LLM, SamplingParams
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc
from gemma4_platform.graph import resolve_checkpoint
from gemma4_platform.settings import PlatformSettings
from platform_fixtures import APP, kv_used_and_aborted, served_platform, wait_until

REPO = Path(__file__).resolve().parents[1]
MAX_PENDING = 40


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    spans = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch_module.setenv("GEMMA4_TRACING", f"jsonl:{spans}")
    settings = PlatformSettings.model_validate(
        {
            "model": {"name": "tiny-moe", "tiny_variant": "26b-a4b", "dtype": "float32", "device": "cpu"},
            # n-gram speculation: greedy outputs must still equal the offline engine's (same settings), and
            # every documented metric (the per-position acceptance counters too) is exported.
            "engine": {"num_kv_blocks": 512, "max_num_batched_tokens": 256, "max_model_len": 1024, "max_num_seqs": 64,
                       "speculative": {"model": "ngram"}},
            "replica": {
                "num_cpus": 0,
                "max_ongoing_requests": 64,
                "autoscaling": {
                    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                    "upscale_delay_s": 1, "downscale_delay_s": 3,
                },
            },
            "gateway": {"max_pending_requests": MAX_PENDING},
            "telemetry": {"tracing": f"jsonl:{spans}", "metrics_interval_s": 0.5},
        }
    )
    with served_platform(settings.model_dump()) as served:
        channel = grpc.insecure_channel(served.grpc_target)
        offline = LLM(resolve_checkpoint(settings), dtype=torch.float32, **settings.engine.engine_args())
        try:
            yield {
                "stub": pb_grpc.Gemma4ServingStub(channel),
                "http": served.http,
                "offline": offline,
                "spans": spans,
                "settings": settings,
            }
        finally:
            channel.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def engine_totals(http: str) -> tuple[float, float]:
    """KV blocks in use and aborted requests, summed over every replica (from the gateway's /metrics)."""
    return kv_used_and_aborted(httpx.get(http + "/metrics", timeout=10).text)


def kv_free_and_aborted(http: str, before: float):
    def check() -> bool:
        used, aborted = engine_totals(http)
        return used == 0 and aborted > before
    return check


def greedy(max_tokens: int, **extra) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


# ---------------------------------------------------------------------------- API surface
def test_grpc_unary_streamed_and_utilities(platform) -> None:
    stub = platform["stub"]
    prompt = [2, 105, 30, 31, 32, 33]
    unary = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(8)), timeout=60)
    streamed = list(stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(8)), timeout=60))
    assert len(unary.token_ids) == 8 and unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert [t for m in streamed for t in m.delta_token_ids] == list(unary.token_ids)
    assert len(streamed) > 1 and streamed[-1].usage.completion_tokens == 8
    expected = platform["offline"].generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert list(unary.token_ids) == expected[0].token_ids

    chat = stub.Chat(pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Hi")])], sampling=greedy(6)), timeout=60)
    assert chat.usage.completion_tokens == 6
    assert stub.Tokenize(pb.TokenizeRequest(text="hello"), timeout=30).token_ids
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert (info.model, info.variant, info.max_model_len) == ("tiny-moe", "26b-a4b", 1024)
    assert stub.Health(pb.HealthRequest(), timeout=30).ready


def test_openai_streamed_chat_completion(platform) -> None:
    client = openai.OpenAI(base_url=platform["http"] + "/v1", api_key="unused", timeout=60)
    stream = client.chat.completions.create(
        model="tiny-moe", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model="tiny-moe", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert text == (full.choices[0].message.content or "")
    assert [m.id for m in client.models.list().data] == ["tiny-moe"]


def test_grpc_chat_with_an_image_through_the_graph(platform) -> None:
    """The image's pixels travel with the request to the replica (one actor call) and its engine encodes them."""
    stub = platform["stub"]
    assert "image" in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).modalities
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(image, format="PNG")
    part = pb.Part(image=pb.ImageInput(data=image.getvalue(), mime_type="image/png", max_soft_tokens=70))
    message = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Describe."), part])
    chunks = list(stub.ChatStream(pb.ChatRequest(messages=[message], sampling=greedy(4)), timeout=60))
    assert chunks[-1].usage.completion_tokens == 4 and 0 < chunks[-1].usage.image_tokens <= 70


def test_32_concurrent_streams_equal_offline_outputs(platform) -> None:
    stub = platform["stub"]
    prompts = [[2] + [10 + (i * 7 + j) % 400 for j in range(5 + i % 13)] for i in range(32)]
    expected = platform["offline"].generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))

    def run(prompt: list[int]) -> list[int]:
        stream = stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(10)), timeout=120)
        return [t for m in stream for t in m.delta_token_ids]

    async def all_of_them() -> list[list[int]]:
        return await asyncio.gather(*(asyncio.to_thread(run, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert results == [o.token_ids for o in expected]


# ---------------------------------------------------------------------------- lifecycle
def test_cancel_mid_stream_frees_the_kv(platform) -> None:
    # Several times: whether the client's cancel reaches Ray's proxy while it waits for the next message or
    # while it writes one is a race, and both paths must abort the engine request.
    for attempt in range(3):
        before = engine_totals(platform["http"])[1]
        call = platform["stub"].GenerateStream(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 40 + attempt, 41]), sampling=greedy(900)), timeout=120
        )
        next(call)
        next(call)
        call.cancel()
        wait_until(kv_free_and_aborted(platform["http"], before), 15, what="the cancelled request's KV to be freed")


def test_http_client_leaving_a_stream_frees_the_kv(platform) -> None:
    before = engine_totals(platform["http"])[1]
    body = {
        "model": "tiny-moe", "prompt": "count", "max_tokens": 900, "temperature": 0, "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", platform["http"] + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
            assert data, "no SSE event before leaving"
    wait_until(kv_free_and_aborted(platform["http"], before), 15, what="the abandoned HTTP request's KV to be freed")


def test_deadline_exceeded_aborts_the_request(platform) -> None:
    """The deadline is a quarter of the time this machine takes for the whole request (measured first)."""
    stub = platform["stub"]
    started = time.monotonic()
    stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 50, 51]), sampling=greedy(32)), timeout=60)
    deadline = (time.monotonic() - started) * 900 / 32 / 4
    before = engine_totals(platform["http"])[1]
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for message in stub.GenerateStream(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 50, 51]), sampling=greedy(900)), timeout=deadline
        ):
            received.append(message)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not any(message.HasField("usage") for message in received)  # cut off before it finished
    wait_until(kv_free_and_aborted(platform["http"], before), 15, what="the expired request's KV to be freed")


def test_invalid_argument_names_the_field(platform) -> None:
    with pytest.raises(grpc.RpcError) as info:
        platform["stub"].Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=-1.0)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        platform["stub"].Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2] * 1020), sampling=greedy(100)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in info.value.details()


def test_full_queue_gives_resource_exhausted(platform) -> None:
    stub = platform["stub"]
    calls = []
    try:
        for i in range(MAX_PENDING):
            call = stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 60 + i]), sampling=greedy(900)), timeout=120)
            next(call)  # started: counted as pending at the gateway
            calls.append(call)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(text="one more", sampling=greedy(4)), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call in calls:
            call.cancel()
    wait_until(lambda: engine_totals(platform["http"])[0] == 0, 20, what="all KV freed")


# ---------------------------------------------------------------------------- telemetry
def test_metrics_cover_the_documented_list(platform) -> None:
    documented = re.findall(r"^\| `([a-z_:0-9]+)` \|", (REPO / "docs" / "metrics.md").read_text(), flags=re.M)
    assert len(documented) >= 20
    client = openai.OpenAI(base_url=platform["http"] + "/v1", api_key="unused", timeout=60)
    client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)

    def scrape() -> str | None:
        text = httpx.get(platform["http"] + "/metrics", timeout=10).text
        exported = set(re.findall(r"^([a-z_:0-9]+?)(?:_bucket|_sum|_count|_created)?[{ ]", text, flags=re.M))
        missing = [m for m in documented if m not in exported and m.removesuffix("_total") + "_total" not in exported]
        return None if missing else text

    wait_until(scrape, 20, interval=0.5, what="every documented metric in /metrics")


def test_trace_spans_gateway_replica_engine_continue_the_callers_trace(platform) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    platform["stub"].Generate(pb.GenerateRequest(text="trace me", sampling=greedy(3)), metadata=metadata, timeout=60)

    def spans_of_trace():
        lines = platform["spans"].read_text().splitlines() if platform["spans"].exists() else []
        names = {json.loads(line)["name"] for line in lines if json.loads(line)["trace_id"] == trace_id}
        return names >= {"gateway.generate", "replica.generate", "engine.request"} and names

    wait_until(spans_of_trace, 15, what="gateway, replica and engine spans of the caller's trace")


# ---------------------------------------------------------------------------- scaling and failure
def running_replicas() -> int:
    status = serve.status().applications[APP].deployments["Replica"]
    return status.replica_states.get("RUNNING", 0)


def test_autoscaling_up_under_load_and_back_down(platform) -> None:
    stub = platform["stub"]
    stop = time.monotonic() + 90

    def load() -> None:
        while time.monotonic() < stop and running_replicas() < 2:
            calls = [
                stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 70 + i]), sampling=greedy(60)), timeout=120)
                for i in range(10)
            ]
            for call in calls:
                for _ in call:
                    pass

    async def drive() -> None:
        await asyncio.gather(*(asyncio.to_thread(load) for _ in range(2)))

    asyncio.run(drive())
    assert running_replicas() == 2
    wait_until(lambda: running_replicas() == 1, 90, interval=1, what="scale back down to one replica")


def test_replica_loss_mid_stream_gives_unavailable_then_recovers(platform) -> None:
    stub = platform["stub"]
    call = stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 80, 81]), sampling=greedy(900)), timeout=120)
    next(call)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "#Replica#" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    with pytest.raises(grpc.RpcError) as info:  # a hang would end in DEADLINE_EXCEEDED (the call's 120 s)
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    def recovered() -> bool:
        try:
            stub.Generate(pb.GenerateRequest(text="again", sampling=greedy(2)), timeout=10)
            return True
        except grpc.RpcError:
            return False

    wait_until(recovered, 90, interval=1, what="a new replica to serve requests")
