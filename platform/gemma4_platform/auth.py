"""API keys and what each key is granted: who may set a priority, how fast and how much it may ask.

A key entry is the key, then optional whitespace-separated attributes:

    sk-batch-7f3a  name=batch priority=0..10 rate=2 burst=4 streams=8
    sk-ops-19c2    name=ops priority=-5..5
    sk-plain-0a1b

* `name`: how the key appears in logs (never the key itself); default `key-<first 8 hex of its sha256>`.
* `priority=LO..HI` (or one integer): the scheduling priorities the key may ask for (lower runs first).
  Without it a key may not set a priority at all. Requests that set none get the value in range
  nearest to 0.
* `rate` (requests per second) and `burst`: a token bucket per key; `streams`: concurrent requests.
* `cache_salt`: the key's own prefix-cache namespace (default: derived from the name when
  `gateway.cache_salt_per_key` is on).

Keys are compared in constant time against every known key, so timing reveals neither a prefix nor
which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4_platform.errors import InvalidArgument, Unauthenticated

_ATTRIBUTES = ("name", "priority", "rate", "burst", "streams", "cache_salt")


@dataclass(frozen=True)
class KeyGrant:
    """What requests made with one API key (or, with auth off, by anyone) may do."""

    name: str
    priority_range: tuple[int, int] = (0, 0)
    rate: float | None = None  # requests per second; None = unlimited
    burst: float | None = None
    max_streams: int | None = None
    cache_salt: str | None = None

    def priority(self, requested: int | None) -> int:
        """The priority a request runs at: the requested one if granted, else INVALID_ARGUMENT."""
        lo, hi = self.priority_range
        if requested is None:
            return min(max(0, lo), hi)
        if not lo <= requested <= hi:
            allowed = "no priority" if lo == hi == 0 else f"priorities {lo}..{hi}"
            raise InvalidArgument(
                f"priority: {requested} is not allowed for this API key (it may set {allowed})", field="priority"
            )
        return requested


ANONYMOUS = KeyGrant(name="anonymous")


def parse_key_entry(entry: str) -> tuple[str, KeyGrant]:
    """One `KEY attr=value ...` entry; ValueError naming the attribute when it is malformed."""
    key, *attributes = entry.split()
    values: dict[str, str] = {}
    for attribute in attributes:
        name, sep, value = attribute.partition("=")
        if not sep or name not in _ATTRIBUTES:
            raise ValueError(f"API key entry {_name_of(key)}: unknown attribute {attribute!r}; known: {', '.join(_ATTRIBUTES)}")
        values[name] = value
    name = values.get("name") or _name_of(key)
    try:
        grant = KeyGrant(
            name=name,
            priority_range=_priority_range(values.get("priority", "0")),
            rate=_positive(values, "rate", float),
            burst=_positive(values, "burst", float),
            max_streams=_positive(values, "streams", int),
            cache_salt=values.get("cache_salt"),
        )
    except ValueError as exc:
        raise ValueError(f"API key entry {name}: {exc}") from None
    return key, grant


def _name_of(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _priority_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("..")
    low, high = int(lo), int(hi if sep else lo)
    if low > high:
        raise ValueError(f"priority range {text!r} is empty")
    return low, high


def _positive(values: Mapping[str, str], name: str, kind: type) -> Any:
    if name not in values:
        return None
    value = kind(values[name])
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {values[name]!r}")
    return value


class ApiKeys:
    """The configured keys; `authenticate` turns what a caller presented into its grant."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._grants: dict[str, KeyGrant] = dict(parse_key_entry(entry) for entry in entries)

    @property
    def enabled(self) -> bool:
        return bool(self._grants)

    def authenticate(self, presented: Iterable[str]) -> KeyGrant:
        """The grant of the first presented key that is known; ANONYMOUS when no keys are configured."""
        if not self._grants:
            return ANONYMOUS
        for candidate in presented:
            grant = self._match(candidate)
            if grant is not None:
                return grant
        raise Unauthenticated("a valid API key is required: send 'authorization: Bearer KEY' or 'x-api-key: KEY'")

    def _match(self, candidate: str) -> KeyGrant | None:
        given = candidate.encode()
        found = None
        for key, grant in self._grants.items():  # no early exit: every comparison runs
            if hmac.compare_digest(given, key.encode()):
                found = grant
        return found


NO_KEYS = ApiKeys(())  # authentication off


def presented_keys(headers: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> Iterator[str]:
    """API keys in gRPC metadata or HTTP headers: `authorization: Bearer KEY` or `x-api-key: KEY`."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        if not isinstance(value, str):
            continue
        name = name.lower()
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                yield token.strip()
        elif name == "x-api-key" and value.strip():
            yield value.strip()
