"""Per-key admission: a token bucket for the request rate and a count of concurrent requests.

Limits hold per gateway replica (each gateway process keeps its own buckets): with N gateway
replicas a key may reach N times its rate in total. Refusals are RESOURCE_EXHAUSTED / HTTP 429 with a
retry hint: when the bucket next holds a token, or one second for the stream limit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gemma4_platform.auth import KeyGrant
from gemma4_platform.errors import RateLimited

STREAM_RETRY_S = 1.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Admission:
    """Admits requests per `KeyGrant`: `with admission.admit(grant): ...` holds one concurrent slot."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}

    @contextlib.contextmanager
    def admit(self, grant: KeyGrant) -> Iterator[None]:
        streams = self._streams.get(grant.name, 0)
        if grant.max_streams is not None and streams >= grant.max_streams:
            raise RateLimited(
                f"this API key has {streams} requests in flight (its limit is {grant.max_streams}); retry later",
                retry_after_s=STREAM_RETRY_S,
            )
        self._take_token(grant)
        self._streams[grant.name] = streams + 1
        try:
            yield
        finally:
            self._streams[grant.name] -= 1
            if not self._streams[grant.name]:
                del self._streams[grant.name]

    def _take_token(self, grant: KeyGrant) -> None:
        if grant.rate is None:
            return
        capacity = grant.burst if grant.burst is not None else max(1.0, grant.rate)
        now = self._clock()
        bucket = self._buckets.setdefault(grant.name, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * grant.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / grant.rate
            raise RateLimited(
                f"this API key exceeded its rate of {grant.rate:g} requests/s; retry in {math.ceil(wait)} s",
                retry_after_s=wait,
            )
        bucket.tokens -= 1.0
