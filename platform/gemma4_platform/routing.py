"""Prefix-affinity routing: requests that share leading KV blocks go to the replica that has them cached.

A Ray Serve request router running in the gateway. Each routed request records, for its first 1..N
full blocks, which replica got it; a new request goes to the replica holding its longest recorded
prefix while that replica's queue is within `imbalance` of the least loaded one; otherwise (or with
no match) the least loaded replicas are preferred. Block size and hashes are the engine's (salted by
the request's `cache_salt`), so "same prefix" means "same prefix-cache blocks".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from gemma4.engine.kv_cache_manager import block_hashes
from gemma4.media.inputs import MediaPlaceholder

from gemma4_platform.backend import EngineRequest


def prefix_keys(
    token_ids: list[int],
    block_size: int,
    max_blocks: int,
    cache_salt: str | None = None,
    media: Sequence[MediaPlaceholder] = (),
) -> list[bytes]:
    """The engine's prefix-cache hashes of the first 1..max_blocks full blocks (shortest first) under
    `cache_salt`, with the content of the `media` whose soft tokens they hold mixed in."""
    return block_hashes(token_ids, block_size, min(max_blocks, len(token_ids) // block_size), cache_salt, media=media)


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(
        self, block_size: int = 16, max_blocks: int = 16, imbalance: int = 4, capacity: int = 100_000, **_: Any
    ) -> None:
        self._block_size = block_size
        self._max_blocks = max_blocks
        self._imbalance = imbalance
        self._capacity = capacity
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()

    @staticmethod
    def _engine_request(pending_request: Optional[PendingRequest]) -> EngineRequest | None:
        if pending_request is None:
            return None
        for arg in pending_request.args:
            if isinstance(arg, EngineRequest):
                return arg
        return None

    def _keys(self, pending_request: Optional[PendingRequest]) -> list[bytes]:
        request = self._engine_request(pending_request)
        if request is None:
            return []
        return prefix_keys(
            request.prompt_token_ids, self._block_size, self._max_blocks, request.cache_salt, request.media
        )

    async def _queue_lengths(self, replicas: List[RunningReplica]) -> dict[ReplicaID, int]:
        lengths: dict[ReplicaID, int] = {}
        unknown = []
        for replica in replicas:
            cached = self.replica_queue_len_cache.get(replica.replica_id)
            if cached is None:
                unknown.append(replica)
            else:
                lengths[replica.replica_id] = cached
        if unknown:
            for replica, length in await self._probe_queue_lens(unknown, 0):
                if length is not None:
                    lengths[replica.replica_id] = length
        return lengths

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        lengths = await self._queue_lengths(candidate_replicas)
        available = [
            r for r in candidate_replicas if lengths.get(r.replica_id, r.max_ongoing_requests) < r.max_ongoing_requests
        ] or candidate_replicas
        by_load = sorted(available, key=lambda r: lengths.get(r.replica_id, r.max_ongoing_requests))
        least = lengths.get(by_load[0].replica_id, 0)
        by_id = {r.replica_id: r for r in available}
        for key in reversed(self._keys(pending_request)):
            owner = self._owner.get(key)
            if owner in by_id and lengths.get(owner, 0) - least <= self._imbalance:
                self._owner.move_to_end(key)
                return [[by_id[owner]], [r for r in by_load if r.replica_id != owner]]
        return [[by_load[0]], by_load[1:]] if len(by_load) > 1 else [by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        for key in self._keys(pending_request):
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, owner in self._owner.items() if owner == replica_id]:
            del self._owner[key]
