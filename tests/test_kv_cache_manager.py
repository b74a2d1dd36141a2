"""KV block manager unit tests: pools per group, sliding release, prefix hits, LRU eviction, the null block."""

from __future__ import annotations

import math

import pytest
import torch

from gemma4.config import variant_config
from gemma4.engine.kv_cache_manager import NULL_BLOCK, KVCacheManager, block_hashes
from gemma4.engine.paged_attention import PagedKVCache, SequenceSlice, check_block_tables, debug_checks_enabled
from gemma4.kv_layout import CacheGroup, cache_groups, pool_rows, split_kv_budget

BS = 4
WINDOW = 8
SLIDING = CacheGroup("sliding", (0, 1), num_kv_heads=2, head_dim=8, sliding_window=WINDOW, tensors_per_layer=2)
FULL = CacheGroup("full", (2,), num_kv_heads=1, head_dim=16, sliding_window=None, tensors_per_layer=1)


def manager(blocks: int = 64, prefix: bool = True) -> KVCacheManager:
    return KVCacheManager((SLIDING, FULL), {"sliding": blocks, "full": blocks}, BS, enable_prefix_caching=prefix)


def run(kv: KVCacheManager, seq: str, tokens: list[int], chunk: int = 64, cache_salt: str | None = None) -> None:
    """Prefill `tokens` in chunks as the scheduler would, committing after each step."""
    done = kv.find_cached_prefix(tokens, cache_salt)
    while done < len(tokens):
        n = min(chunk, len(tokens) - done)
        assert kv.allocate(seq, tokens, done, n, cache_salt)
        done += n
        kv.commit(seq, tokens, done)


def test_cache_groups_of_the_released_variants() -> None:
    e2b = {g.name: g for g in cache_groups(variant_config("e2b").text)}
    assert len(e2b["sliding"].layers) == 12 and len(e2b["full"].layers) == 3  # 20 KV-sharing layers store nothing
    # bf16 bytes per token: E2B 12 x 1 KB + 3 x 2 KB (architecture reference, section 15.7)
    assert e2b["sliding"].bytes_per_token(2) == 12 * 1024 and e2b["full"].bytes_per_token(2) == 3 * 2048
    big = {g.name: g for g in cache_groups(variant_config("31b").text)}
    assert big["sliding"].bytes_per_token(2) == 50 * 16 * 1024
    assert big["full"].bytes_per_token(2) == 10 * 4 * 1024  # K-as-V: one tensor of 4 x 512 per layer
    moe = {g.name: g for g in cache_groups(variant_config("26b-a4b").text)}
    assert (moe["sliding"].bytes_per_token(2), moe["full"].bytes_per_token(2)) == (25 * 8 * 1024, 5 * 2 * 1024)


def test_budget_split_gives_sliding_groups_only_their_window() -> None:
    blocks = split_kv_budget(
        (SLIDING, FULL), 10**6, block_size=BS, kv_dtype_bytes=2, max_num_seqs=4, max_model_len=1000,
        max_num_batched_tokens=16,
    )
    assert blocks["sliding"] == 4 * (math.ceil((WINDOW - 1 + 16) / BS) + 1)
    used = SLIDING.pool_bytes(blocks["sliding"], BS, 2) + FULL.pool_bytes(0, BS, 2)  # null blocks included
    assert blocks["full"] == (10**6 - used) // FULL.bytes_per_block(BS, 2)


def test_sliding_group_releases_blocks_outside_the_window() -> None:
    kv = manager()
    tokens = list(range(100, 140))
    run(kv, "a", tokens, chunk=8)
    sliding, full = kv.block_tables("a")
    assert len(full) == 10 and NULL_BLOCK not in full
    held = [b for b in sliding if b != NULL_BLOCK]
    assert len(held) <= math.ceil(WINDOW / BS) + 1
    # The held blocks cover every key the next query (position 40) can see: 33..40.
    assert all(b != NULL_BLOCK for b in sliding[33 // BS :])
    kv.free("a")
    assert [u.used_blocks for u in kv.usage()] == [0, 0]


def test_prefix_hit_requires_the_window_blocks_in_sliding_groups() -> None:
    kv = manager()
    tokens = list(range(200, 232))  # 8 blocks
    run(kv, "a", tokens)
    kv.free("a")
    # Everything is cached (free but hashed): a repeat hits all but the last block's worth.
    assert kv.find_cached_prefix(tokens + [1]) == 32
    # Evict the sliding copy of block 7: the next query would need it, so the hit shrinks to where
    # the window's blocks are still cached (a 7-block hit needs blocks 5 and 6, both cached).
    sliding_pool = kv.pools[0]
    hashes = block_hashes(tokens, BS, 8)
    victim = sliding_pool.lookup(hashes[7])
    del sliding_pool.hash_to_block[hashes[7]]
    sliding_pool.block_hash[victim] = None
    assert kv.find_cached_prefix(tokens + [1]) == 28
    # Without the full group's block 2, nothing past it can be used, whatever sliding holds.
    full_pool = kv.pools[1]
    del full_pool.hash_to_block[hashes[2]]
    assert kv.find_cached_prefix(tokens + [1]) == 8


def test_prefix_hits_share_blocks_and_count_references() -> None:
    kv = manager()
    tokens = list(range(300, 320))
    run(kv, "a", tokens)
    run(kv, "b", tokens + [7, 8, 9])
    full_a, full_b = kv.block_tables("a")[1], kv.block_tables("b")[1]
    assert full_a[:5] == full_b[:5]
    kv.free("a")
    assert all(kv.pools[1].ref_count[b] == 1 for b in full_b[:5])
    kv.free("b")
    assert [u.used_blocks for u in kv.usage()] == [0, 0]


def test_prefix_hits_only_under_the_same_cache_salt() -> None:
    kv = manager()
    tokens = list(range(700, 720))  # 5 blocks
    run(kv, "salted", tokens, cache_salt="tenant-a")
    run(kv, "other", tokens, cache_salt="tenant-b")
    run(kv, "shared", tokens)
    tables = {seq: kv.block_tables(seq)[1] for seq in ("salted", "other", "shared")}
    assert len({b for table in tables.values() for b in table}) == 15  # three live copies, nothing shared
    for seq in tables:
        kv.free(seq)
    assert kv.find_cached_prefix(tokens + [1], "tenant-a") == 20
    assert kv.find_cached_prefix(tokens + [1], "tenant-b") == 20
    assert kv.find_cached_prefix(tokens + [1]) == 20
    assert kv.find_cached_prefix(tokens + [1], "tenant-c") == 0
    assert kv.find_cached_prefix(tokens + [1], "") == 0  # the empty salt is a namespace of its own, not the shared one
    run(kv, "again", tokens + [1], cache_salt="tenant-a")
    assert kv.block_tables("again")[1][:5] == tables["salted"]  # the same salt shares the cached blocks
    assert block_hashes(tokens, BS, 5, "tenant-a") != block_hashes(tokens, BS, 5)
    assert block_hashes(tokens, BS, 5, "tenant-a")[1:] != block_hashes(tokens, BS, 5, "tenant-b")[1:]  # the whole chain


def test_lru_eviction_of_cached_free_blocks() -> None:
    kv = manager(blocks=8, prefix=True)
    old = list(range(400, 416))
    run(kv, "old", old)
    kv.free("old")
    assert kv.find_cached_prefix(old + [1]) == 16
    # A new sequence needing all 8 full blocks must evict the cached ones (least recently freed first).
    run(kv, "new", list(range(500, 532)))
    assert kv.pools[1].evictions > 0
    kv.free("new")
    assert kv.find_cached_prefix(old + [1]) == 0


def test_allocation_failure_changes_nothing() -> None:
    kv = manager(blocks=6)
    assert kv.allocate("a", list(range(24)), 0, 24)  # 6 blocks: the whole pool
    before = [u.used_blocks for u in kv.usage()]
    assert not kv.allocate("b", list(range(100, 108)), 0, 8)
    assert [u.used_blocks for u in kv.usage()] == before
    with pytest.raises(KeyError):
        kv.block_tables("b")


def test_no_prefix_caching_means_no_hits() -> None:
    kv = manager(prefix=False)
    tokens = list(range(600, 640))
    run(kv, "a", tokens)
    kv.free("a")
    assert kv.find_cached_prefix(tokens) == 0


def test_null_block_is_reserved_and_not_counted_as_used() -> None:
    kv = manager(blocks=6)
    assert kv.allocate("a", list(range(24)), 0, 24)  # all 6 usable blocks of each pool
    for table in kv.block_tables("a"):
        assert sorted(table) == list(range(1, 7)) and NULL_BLOCK not in table  # row 0 is the null block
    assert [(u.num_blocks, u.used_blocks) for u in kv.usage()] == [(6, 6), (6, 6)]
    assert not kv.allocate("b", [1, 2, 3], 0, 3)
    kv.free("a")
    assert [u.used_blocks for u in kv.usage()] == [0, 0]


def test_budget_split_pays_for_each_pools_null_block() -> None:
    per_block = SLIDING.bytes_per_block(BS, 2) + FULL.bytes_per_block(BS, 2)
    budget = 100 * per_block  # an exact multiple: without the null blocks every byte would go to usable blocks
    blocks = split_kv_budget(
        (SLIDING, FULL), budget, block_size=BS, kv_dtype_bytes=2, max_num_seqs=1000, max_model_len=1000,
        max_num_batched_tokens=16,
    )
    tensor_bytes = sum(pool_rows(blocks[g.name]) * g.bytes_per_block(BS, 2) for g in (SLIDING, FULL))
    assert tensor_bytes <= budget
    assert budget - tensor_bytes < per_block  # and nothing more than a block's worth is left unused


def _attention(tables: dict[str, list[int]], context_len: int, query_len: int) -> None:
    """The check the runner makes before staging a step, on one sequence's block tables."""
    cache = PagedKVCache((SLIDING, FULL), {"sliding": 8, "full": 8}, BS, torch.float32, "cpu")
    check_block_tables(cache, [SequenceSlice(0, query_len, context_len, [tables["sliding"], tables["full"]])])


def test_debug_checks_reject_null_and_out_of_range_blocks_before_a_step() -> None:
    assert debug_checks_enabled()  # tests/conftest.py turns them on for every test
    # Query at position 11, window 8: keys 4..11, i.e. sliding blocks 1 and 2; block 0 was released.
    _attention({"sliding": [NULL_BLOCK, 3, 4], "full": [1, 2, 5]}, context_len=12, query_len=1)
    with pytest.raises(RuntimeError, match="null block"):
        _attention({"sliding": [NULL_BLOCK, NULL_BLOCK, 4], "full": [1, 2, 5]}, context_len=12, query_len=1)
    with pytest.raises(RuntimeError, match="null block"):
        _attention({"sliding": [3, 4, NULL_BLOCK], "full": [1, 2, NULL_BLOCK]}, context_len=12, query_len=1)
    with pytest.raises(RuntimeError, match="outside the pool"):
        _attention({"sliding": [NULL_BLOCK, 3, 4], "full": [1, 2, 9]}, context_len=12, query_len=1)  # 8 blocks: ids 1..8
    with pytest.raises(RuntimeError, match="outside the pool"):
        _attention({"sliding": [-1, 3, 4], "full": [1, 2, 5]}, context_len=12, query_len=1)
    with pytest.raises(RuntimeError, match="covers 2 blocks"):
        _attention({"sliding": [NULL_BLOCK, 3, 4], "full": [1, 2]}, context_len=12, query_len=1)
