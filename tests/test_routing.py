"""Prefix-affinity routing decisions (the router's policy, with stand-in replicas)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gemma4.engine import SamplingParams
from gemma4_platform.backend import EngineRequest
from ray.serve.request_router import RequestRouter

from gemma4_platform.routing import PrefixAffinityRouter, prefix_keys
from gemma4.engine.kv_cache_manager import KVCacheManager, block_hashes
from gemma4.kv_layout import CacheGroup
from gemma4.media.inputs import MediaFeatures, MediaPlaceholder

BLOCK = 4


@dataclass(frozen=True)
class FakeReplica:
    replica_id: str
    max_ongoing_requests: int = 10


@dataclass
class FakePending:
    args: list = field(default_factory=list)


def make_router(queue: dict[str, int]) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # the policy only, without Ray's plumbing
    router.initialize_state(block_size=BLOCK, max_blocks=8, imbalance=2)

    async def lengths(replicas):
        return {r.replica_id: queue[r.replica_id] for r in replicas}

    router._queue_lengths = lengths  # type: ignore[method-assign]
    return router


def request(tokens: list[int], cache_salt: str | None = None, media: tuple = ()) -> FakePending:
    return FakePending([EngineRequest("r", tokens, SamplingParams(), cache_salt=cache_salt, media=media)])


def choose(router: PrefixAffinityRouter, replicas: list[FakeReplica], pending: FakePending) -> str:
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    return ranks[0][0].replica_id


def engine_block_hashes(tokens: list[int], cache_salt: str | None) -> list[bytes]:
    """The hashes the engine's KV cache manager indexes a prefilled sequence's full blocks under."""
    group = CacheGroup("full", (0,), num_kv_heads=1, head_dim=8, sliding_window=None, tensors_per_layer=2)
    kv = KVCacheManager((group,), {"full": 64}, BLOCK)
    assert kv.allocate("s", tokens, 0, len(tokens), cache_salt)
    kv.commit("s", tokens, len(tokens))
    pool = kv.pools[0]
    return [pool.block_hash[b] for b in kv.block_tables("s")[0] if pool.block_hash[b] is not None]


def test_keys_are_the_engines_block_hashes() -> None:
    tokens = list(range(10))
    keys = prefix_keys(tokens, BLOCK, 8)
    assert len(keys) == 2  # only full blocks
    assert keys == block_hashes(tokens, BLOCK, 2) == engine_block_hashes(tokens, None)
    assert prefix_keys(tokens, BLOCK, 1) == keys[:1]
    for salt in ("tenant-a", "tenant-b"):
        assert prefix_keys(tokens, BLOCK, 8, cache_salt=salt) == engine_block_hashes(tokens, salt)
    salted = [prefix_keys(tokens, BLOCK, 8, cache_salt=salt) for salt in (None, "tenant-a", "tenant-b")]
    assert len({key for keys in salted for key in keys}) == 6  # no key shared across salts


def test_media_content_is_part_of_the_keys() -> None:
    """Equal ids (the same soft-token slots) with different images are different prefixes."""
    tokens = [5, 6] + [9] * 8 + [7, 8, 3, 4]
    red, blue = (MediaPlaceholder(2, MediaFeatures("image", 8, digest)) for digest in ("aa" * 32, "bb" * 32))
    keys = prefix_keys(tokens, BLOCK, 8, media=(red,))
    assert keys == block_hashes(tokens, BLOCK, 3, media=(red,))
    assert keys[0] != prefix_keys(tokens, BLOCK, 8, media=(blue,))[0] != prefix_keys(tokens, BLOCK, 8)[0]
    queue = {"a": 0, "b": 1}
    replicas = [FakeReplica(x) for x in queue]
    router = make_router(queue)
    router.on_request_routed(request(tokens, media=(red,)), "b", None)
    assert choose(router, replicas, request(tokens + [1], media=(red,))) == "b"
    assert choose(router, replicas, request(tokens + [1], media=(blue,))) == "a"


def test_affinity_only_between_requests_with_the_same_cache_salt() -> None:
    queue = {"a": 0, "b": 1}
    replicas = [FakeReplica(x) for x in queue]
    router = make_router(queue)
    shared = list(range(300, 312))
    router.on_request_routed(request(shared, cache_salt="tenant-a"), "b", None)
    assert choose(router, replicas, request(shared + [1], cache_salt="tenant-a")) == "b"
    assert choose(router, replicas, request(shared + [1], cache_salt="tenant-b")) == "a"  # no match: least loaded
    assert choose(router, replicas, request(shared + [1])) == "a"


def test_same_prefix_goes_to_the_same_replica_while_load_allows() -> None:
    queue = {"a": 0, "b": 0, "c": 0}
    replicas = [FakeReplica(x) for x in queue]
    router = make_router(queue)
    shared = list(range(100, 112))
    router.on_request_routed(request(shared + [1, 2, 3, 4]), "b", None)
    queue.update(a=0, b=2, c=1)
    assert choose(router, replicas, request(shared + [9, 9, 9, 9])) == "b"  # affinity within imbalance 2
    queue.update(b=3)
    assert choose(router, replicas, request(shared + [9, 9, 9, 9])) == "a"  # too loaded: least loaded instead
    assert choose(router, replicas, request(list(range(500, 520)))) == "a"  # no match: least loaded


def test_longest_matching_prefix_wins_and_dead_replicas_are_forgotten(monkeypatch) -> None:
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", lambda self, replica_id: None)  # Ray's bookkeeping
    queue = {"a": 0, "b": 0}
    replicas = [FakeReplica(x) for x in queue]
    router = make_router(queue)
    base = list(range(200, 216))
    router.on_request_routed(request(base[:4]), "a", None)
    router.on_request_routed(request(base), "b", None)
    assert choose(router, replicas, request(base + [7] * 4)) == "b"
    router.on_replica_actor_died("b")
    assert choose(router, replicas, request(base + [7] * 4)) == "a"
