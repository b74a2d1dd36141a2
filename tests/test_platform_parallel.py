"""A multi-device replica on real Ray Serve (CPU ranks, tiny MoE-shaped model): its placement group and
rank actors, gRPC and OpenAI requests end to end with the single-device engine's greedy output, and a
rank's death ending streams with UNAVAILABLE before a new replica takes over. One Ray instance and
one application serve the whole module."""

from __future__ import annotations

import grpc
import openai
import pytest
import ray
import torch

from gemma4 import LLM, SamplingParams
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc
from gemma4_platform.graph import resolve_checkpoint
from gemma4_platform.settings import PlatformSettings
from platform_fixtures import TINY_MOE_SETTINGS, served_platform, wait_until

RANKS = 2
SETTINGS = PlatformSettings.model_validate(
    {**TINY_MOE_SETTINGS, "engine": {**TINY_MOE_SETTINGS["engine"], "tensor_parallel_size": RANKS}}
)
PROMPT = [2, 105, 30, 31, 32, 33]


@pytest.fixture(scope="module")
def platform():
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    try:
        # Bundles: the replica's sliver of a CPU and one CPU per rank; the rest for Serve and a replacement.
        with served_platform(SETTINGS.model_dump(), num_cpus=6) as served:
            with grpc.insecure_channel(served.grpc_target) as channel:
                yield {"stub": pb_grpc.Gemma4ServingStub(channel), "http": served.http}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def single_device() -> LLM:
    """The same checkpoint and engine settings on one device, in this process: the reference."""
    args = SETTINGS.engine.engine_args() | {"tensor_parallel_size": 1}
    return LLM(resolve_checkpoint(SETTINGS), dtype=torch.float32, **args)


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def rank_actors() -> dict[str, tuple[str, str]]:
    """Live rank actors by name: (name, namespace)."""
    return {
        a["name"]: (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "-rank" in a["name"] and a["name"].startswith("gemma4-")
    }


def test_replica_is_a_packed_placement_group_with_one_actor_per_rank(platform) -> None:
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    bundles = [list(g["bundles"].values()) for g in groups if g["strategy"] == "STRICT_PACK"]
    assert bundles == [[{"CPU": 0.01}] + [{"CPU": 1.0}] * RANKS]
    assert sorted(name.rsplit("-", 1)[1] for name in rank_actors()) == [f"rank{r}" for r in range(RANKS)]


def test_grpc_generate_and_stream_equal_the_single_device_engine(platform, single_device) -> None:
    stub = platform["stub"]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=greedy(8))
    unary = stub.Generate(request, timeout=120)
    streamed = list(stub.GenerateStream(request, timeout=120))
    expected = single_device.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert list(unary.token_ids) == expected[0].token_ids
    assert [t for m in streamed for t in m.delta_token_ids] == expected[0].token_ids
    assert len(streamed) > 1 and streamed[-1].usage.completion_tokens == 8


def test_openai_chat_completion_equals_the_single_device_engine(platform, single_device) -> None:
    client = openai.OpenAI(base_url=platform["http"] + "/v1", api_key="unused", timeout=120)
    messages = [{"role": "user", "content": "Hello"}]
    full = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-moe", messages=messages, max_tokens=6, temperature=0, stream=True
    ))
    expected = single_device.generate([messages], SamplingParams(temperature=0, max_tokens=6))[0]
    assert full.usage.completion_tokens == len(expected.token_ids)
    assert (full.choices[0].message.content or "") == expected.text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text


def test_a_dead_rank_ends_streams_with_unavailable_then_a_new_replica_serves(platform) -> None:
    stub = platform["stub"]
    call = stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 80, 81]), sampling=greedy(900)), timeout=120)
    next(call)
    dead = rank_actors()
    name, namespace = max(dead.values())  # the last rank: rank 0 is left blocked in a collective
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    with pytest.raises(grpc.RpcError) as info:  # a hang would end in DEADLINE_EXCEEDED (the call's 120 s)
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as info:  # the engine is stopped: a new request is refused at once
        stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 82]), sampling=greedy(2)), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    def recovered() -> bool:
        try:
            stub.Generate(pb.GenerateRequest(text="again", sampling=greedy(2)), timeout=10)
        except grpc.RpcError:
            return False
        return not set(rank_actors()) & set(dead) and len(rank_actors()) == RANKS

    wait_until(recovered, 120, interval=1, what="a new replica with fresh rank actors to serve requests")


def test_a_rank_dying_while_idle_fails_the_health_check_and_the_replica_is_replaced(platform) -> None:
    """No step notices an idle replica's dead rank: the health check pings every rank."""
    stub = platform["stub"]
    dead = rank_actors()
    name, namespace = min(dead.values())
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)

    def replaced() -> bool:
        live = rank_actors()
        return len(live) == RANKS and not set(live) & set(dead)

    wait_until(replaced, 120, interval=1, what="the health check to replace the replica whose rank died")
    reply = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=greedy(3)), timeout=120)
    assert len(reply.token_ids) == 3
