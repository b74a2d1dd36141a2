"""The engine's batched greedy outputs equal transformers' own greedy generation, for every variant shape."""

from __future__ import annotations

import math

import pytest
import torch

from engine_fixtures import BLOCK_SIZE, greedy_references, mixed_prompts
from gemma4 import LLM, SamplingParams
from reference_models import SLIDING_WINDOW, TEXT_CONFIGS

NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory):
    """Per variant: checkpoint dir and the reference's greedy continuation of each mixed prompt."""
    prompts = mixed_prompts()
    return prompts, greedy_references(prompts, NEW_TOKENS, tmp_path_factory)


@pytest.mark.parametrize("variant", list(TEXT_CONFIGS))
def test_sixteen_concurrent_requests_match_reference(references, variant: str) -> None:
    prompts, refs = references
    path, expected = refs[variant]
    assert any(len(p) > SLIDING_WINDOW * 3 for p in prompts)
    llm = LLM(path, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=48, num_kv_blocks=256)
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    stats = llm.engine.stats()
    assert stats.prefix_hit_tokens >= 5 * 3 * BLOCK_SIZE - 3 * BLOCK_SIZE  # the shared 3-block prefix was reused
    assert all(g.used_blocks == 0 for g in stats.kv_cache)


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_pool_far_too_small_preempts_and_loses_nothing(references, variant: str) -> None:
    prompts, refs = references
    path, expected = refs[variant]
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    blocks = math.ceil(longest / BLOCK_SIZE) + 2  # about one long request at a time
    llm = LLM(path, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=16, num_kv_blocks=blocks)
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason.value == "length" for o in outputs)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert all(g.used_blocks == 0 for g in stats.kv_cache)


def test_repeated_prefix_is_served_from_the_cache(references) -> None:
    prompts, refs = references
    path, expected = refs["e4b"]
    llm = LLM(path, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=64, num_kv_blocks=256)
    prompt = prompts[0]
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert first.token_ids == second.token_ids == expected[0]
    assert first.usage.cached_prompt_tokens == 0
    cached = second.usage.cached_prompt_tokens
    assert cached == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    stats = llm.engine.stats()
    assert stats.prefix_hit_tokens == cached and stats.prefix_hit_rate > 0
