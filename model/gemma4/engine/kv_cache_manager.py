"""Paged KV-cache bookkeeping for Gemma 4's hybrid cache: one block pool per cache group.

Pure bookkeeping (no tensors): which physical blocks each sequence holds in each group. Sliding
groups release the blocks that fell out of every future query's window, so a decoding sequence
holds at most ceil(window / block_size) + 1 of them. Full blocks are indexed by a hash of their
content chain for prefix caching; free blocks keep their hash until reused (LRU eviction), and a
prefix hit is valid only if every group still holds what the next query needs: all earlier blocks
for full-attention groups, the window's blocks for sliding ones. A request's `cache_salt` seeds its
hash chain (`block_hashes`), so prefix hits happen only between requests with the same salt
(`None`: the shared namespace), and every block that holds part of a media item also mixes in that
item's content hash, so two different images of the same size never share KV. Block ids run from 1
to the pool's size; table entries a sequence does not hold (released, or before a prefix hit's
window) are `NULL_BLOCK`, the reserved zero row of every pool tensor.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from gemma4.kv_layout import NULL_BLOCK, CacheGroup, pool_rows
from gemma4.media.inputs import MediaPlaceholder


class BlockPool:
    """Block ids 1..num_blocks with reference counts, an LRU free queue and a content-hash index.

    Id 0 is `NULL_BLOCK`: never handed out, so it counts neither as free nor as used.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * pool_rows(num_blocks)
        self.block_hash: list[bytes | None] = [None] * pool_rows(num_blocks)
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, pool_rows(num_blocks)))
        self.hash_to_block: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        """Take the least recently freed block, dropping its cached content."""
        block, _ = self.free_queue.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            del self.hash_to_block[old]
            self.block_hash[block] = None
            self.evictions += 1
        self.ref_count[block] = 1
        return block

    def lookup(self, block_hash: bytes) -> int | None:
        return self.hash_to_block.get(block_hash)

    def acquire(self, block: int) -> None:
        """Share a cached block with one more sequence."""
        if self.ref_count[block] == 0:
            del self.free_queue[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free_queue[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        """Index a full block by its content hash (the first block with a given content wins)."""
        if self.block_hash[block] is None and block_hash not in self.hash_to_block:
            self.block_hash[block] = block_hash
            self.hash_to_block[block_hash] = block


@dataclass
class _Sequence:
    tables: list[list[int]]
    cache_salt: str | None
    media: Sequence[MediaPlaceholder] = ()
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0
    released: list[int] = field(default_factory=list)  # per group: leading entries already released (NULL)


@dataclass(frozen=True)
class GroupUsage:
    name: str
    num_blocks: int
    used_blocks: int

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


def _chain_hash(parent: bytes | None, tokens: Sequence[int], media: Sequence[MediaPlaceholder]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(b",".join(str(t).encode() for t in tokens))
    for item in media:  # in prompt order: which content sits where is fixed by the (equal) tokens
        h.update(b"|" + item.features.content_hash.encode())
    return h.digest()


def _salt_hash(cache_salt: str) -> bytes:
    # Personalised, so salt digests and block hashes are separate hash domains.
    return hashlib.blake2b(cache_salt.encode(), digest_size=16, person=b"gemma4-salt").digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    num_blocks: int,
    cache_salt: str | None = None,
    *,
    known: Sequence[bytes] = (),
    media: Sequence[MediaPlaceholder] = (),
) -> list[bytes]:
    """Prefix-cache hashes of the first `num_blocks` full blocks of `token_ids`.

    Each block's hash covers its tokens, the content hashes of the `media` items (in prompt order)
    that overlap it, and its parent's hash, so equal hashes mean equal prefixes;
    the first block's parent is the salt's digest (none for `cache_salt=None`, the shared
    namespace), so different salts never share a block. `known` holds hashes already computed for
    leading blocks of the same tokens and salt; they are extended, not recomputed. The prefix-affinity
    router keys requests with this same function.
    """
    if num_blocks * block_size > len(token_ids):
        raise ValueError(f"{len(token_ids)} tokens hold fewer than {num_blocks} full blocks of {block_size}")
    hashes = list(known[:num_blocks])
    if hashes:
        parent: bytes | None = hashes[-1]
    else:
        parent = None if cache_salt is None else _salt_hash(cache_salt)
    for i in range(len(hashes), num_blocks):
        start, end = i * block_size, (i + 1) * block_size
        inside = [item for item in media if item.offset < end and item.end > start]
        parent = _chain_hash(parent, token_ids[start:end], inside)
        hashes.append(parent)
    return hashes


class KVCacheManager:
    """Allocates and frees blocks of every cache group for each sequence, with prefix caching."""

    def __init__(
        self,
        groups: tuple[CacheGroup, ...],
        num_blocks: dict[str, int],
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        sliding_lookback: int = 0,
    ) -> None:
        """`sliding_lookback`: keys before a query's window that a reader still needs on sliding groups
        (the assistant drafter reads `ASSISTANT_SLIDING_LOOKBACK` more than the target)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.groups = groups
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_lookback = sliding_lookback
        self.pools = [BlockPool(num_blocks[g.name]) for g in groups]
        self._seqs: dict[str, _Sequence] = {}

    # ------------------------------------------------------------------ queries
    def block_tables(self, seq_id: str) -> list[list[int]]:
        return self._seqs[seq_id].tables

    def usage(self) -> list[GroupUsage]:
        return [GroupUsage(g.name, p.num_blocks, p.num_used) for g, p in zip(self.groups, self.pools)]

    def held_blocks(self, seq_id: str) -> dict[str, int]:
        """Blocks a sequence holds per group (NULL entries of released sliding blocks excluded)."""
        tables = self._seqs[seq_id].tables if seq_id in self._seqs else [[] for _ in self.groups]
        return {g.name: sum(b != NULL_BLOCK for b in t) for g, t in zip(self.groups, tables)}

    def _first_needed_block(self, group: CacheGroup, first_query_pos: int) -> int:
        """The first block a query at `first_query_pos` (or later) can still attend to."""
        if group.sliding_window is None:
            return 0
        return max(0, first_query_pos - group.sliding_window + 1 - self.sliding_lookback) // self.block_size

    def find_cached_prefix(
        self, token_ids: list[int], cache_salt: str | None = None, media: Sequence[MediaPlaceholder] = ()
    ) -> int:
        """Tokens of `token_ids` (with `media` placed in them) whose KV every group still holds under
        `cache_salt` (whole blocks).

        At least one token is always left to compute, so the request produces logits.
        """
        if not self.enable_prefix_caching:
            return 0
        num_blocks = (len(token_ids) - 1) // self.block_size
        hashes = block_hashes(token_ids, self.block_size, num_blocks, cache_salt, media=media)
        hit = len(hashes)
        for group, pool in zip(self.groups, self.pools):
            if group.sliding_window is None:
                n = 0
                while n < hit and pool.lookup(hashes[n]) is not None:
                    n += 1
                hit = n
        for group, pool in zip(self.groups, self.pools):
            if group.sliding_window is not None:
                while hit > 0:
                    start = self._first_needed_block(group, hit * self.block_size)
                    if all(pool.lookup(hashes[b]) is not None for b in range(start, hit)):
                        break
                    hit -= 1
        return hit * self.block_size

    # ------------------------------------------------------------------ allocation
    def allocate(
        self,
        seq_id: str,
        token_ids: list[int],
        num_computed: int,
        num_new: int,
        cache_salt: str | None = None,
        media: Sequence[MediaPlaceholder] = (),
    ) -> bool:
        """Make room for computing tokens [num_computed, num_computed + num_new).

        For a sequence not seen before, `num_computed` tokens are a prefix-cache hit (from
        `find_cached_prefix` with the same `cache_salt` and `media`) and their blocks are shared; the
        salt and media stay with the sequence (they are ignored for a known one). Returns False,
        changing nothing except releasing sliding blocks no query needs any more, when a pool has too
        few free blocks.
        """
        bs = self.block_size
        seq = self._seqs.get(seq_id)
        new_seq = seq is None
        if new_seq:
            hashes = block_hashes(token_ids, bs, num_computed // bs, cache_salt, media=media)
            seq = _Sequence(
                tables=[[] for _ in self.groups],
                cache_salt=cache_salt,
                media=media,
                block_hashes=hashes,
                num_committed_blocks=len(hashes),
                released=[0] * len(self.groups),
            )
        else:
            self._release_out_of_window(seq, num_computed)
        end_block = -(-(num_computed + num_new) // bs)
        if not new_seq and all(len(table) >= end_block for table in seq.tables):
            return True  # a decode inside its last block: nothing to allocate
        plans = []
        for group, pool, table in zip(self.groups, self.pools, seq.tables):
            shared: list[int] = []
            if new_seq and num_computed:
                start = self._first_needed_block(group, num_computed)
                blocks = [pool.lookup(h) for h in seq.block_hashes[start : num_computed // bs]]
                if any(b is None for b in blocks):
                    raise ValueError(f"{seq_id}: prefix of {num_computed} tokens is no longer cached in {group.name}")
                shared = [b for b in blocks if b is not None]
                prefix = [NULL_BLOCK] * start + shared
            else:
                prefix = table
            reclaimed = sum(1 for b in shared if pool.ref_count[b] == 0)
            needed = max(0, end_block - len(prefix))
            if needed + reclaimed > pool.num_free:
                return False
            plans.append((pool, table, prefix, shared, needed))
        for pool, table, prefix, shared, needed in plans:
            for b in shared:
                pool.acquire(b)
            if new_seq:
                table.extend(prefix)
            table.extend(pool.allocate() for _ in range(needed))
        self._seqs[seq_id] = seq
        return True

    def _release_out_of_window(self, seq: _Sequence, first_query_pos: int) -> None:
        for g, (group, pool, table) in enumerate(zip(self.groups, self.pools, seq.tables)):
            if group.sliding_window is None:
                continue
            end = min(self._first_needed_block(group, first_query_pos), len(table))
            for i in range(seq.released[g], end):
                if table[i] != NULL_BLOCK:
                    pool.release(table[i])
                    table[i] = NULL_BLOCK
            seq.released[g] = max(seq.released[g], end)

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """After a step: index the blocks that became full, then release sliding blocks no later query needs."""
        seq = self._seqs[seq_id]
        if self.enable_prefix_caching and num_computed // self.block_size > seq.num_committed_blocks:
            hashes = block_hashes(
                token_ids,
                self.block_size,
                num_computed // self.block_size,
                seq.cache_salt,
                known=seq.block_hashes,
                media=seq.media,
            )
            seq.block_hashes = hashes
            for pool, table in zip(self.pools, seq.tables):
                for i in range(seq.num_committed_blocks, min(len(hashes), len(table))):
                    if table[i] != NULL_BLOCK:
                        pool.register(table[i], hashes[i])
            seq.num_committed_blocks = len(hashes)
        self._release_out_of_window(seq, num_computed)

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Release the blocks past the first `num_tokens` tokens (those only rejected draft tokens wrote;
        never committed, so they hold no cached content)."""
        seq = self._seqs[seq_id]
        keep = -(-num_tokens // self.block_size)
        for g, (pool, table) in enumerate(zip(self.pools, seq.tables)):
            if len(table) > keep:
                for block in reversed(table[keep:]):
                    if block != NULL_BLOCK:
                        pool.release(block)
                # A new list: tables otherwise only grow, and their readers (the workers' mirrors,
                # staged rows) copy a replaced table afresh.
                seq.tables[g] = table[:keep]

    def free(self, seq_id: str) -> None:
        """Release every block of a sequence (tail first, so shared prefixes are evicted last)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for pool, table in zip(self.pools, seq.tables):
            for block in reversed(table):
                if block != NULL_BLOCK:
                    pool.release(block)
