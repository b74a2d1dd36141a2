"""Multi-rank engines over gloo: tensor- and expert-parallel greedy outputs equal the single-process
engine's and transformers', a mid-run expert placement change alters no output, and a killed worker
ends the open streams with a clear error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from engine_fixtures import BLOCK_SIZE, mixed_prompts, write_checkpoint
from gemma4 import LLM, AsyncEngine, SamplingParams
from gemma4.engine import EngineArgs, EngineDeadError, LLMEngine, MultiprocExecutor, random_weights_model
from gemma4.engine.worker import WorkerConfig
from gemma4.tiny import tiny_config
from reference_models import SLIDING_WINDOW, reference_greedy

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
PROMPTS = mixed_prompts(4)  # prompts 0 and 3 share a 3-block prefix
ARGS = dict(dtype=torch.float32, kernels="torch", block_size=BLOCK_SIZE, max_num_batched_tokens=16, num_kv_blocks=96)

# (variant, tensor_parallel, expert_parallel, redundant experts, rebalance interval)
LAYOUTS = {
    "31b-tp2": ("31b", 2, 1, 0, 0),
    "e2b-tp4": ("e2b", 4, 1, 0, 0),
    "26b-tp2-ep2": ("26b-a4b", 2, 2, 0, 0),
    "26b-tp4-ep4": ("26b-a4b", 4, 4, 0, 0),
    "26b-tp4-ep2-rebalanced": ("26b-a4b", 4, 2, 2, 2),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[list[int]]]]:
    """Per variant used here: a transformers-written checkpoint and transformers' greedy continuations."""
    assert any(len(p) > SLIDING_WINDOW for p in PROMPTS) and PROMPTS[0][:12] == PROMPTS[3][:12]
    out = {}
    for variant in sorted({layout[0] for layout in LAYOUTS.values()}):
        ref, path = write_checkpoint(variant, tmp_path_factory.mktemp(variant))
        with torch.no_grad():
            out[variant] = (path, [reference_greedy(ref, torch.tensor([p]), NEW_TOKENS)[0].tolist() for p in PROMPTS])
    return out


@pytest.fixture(scope="module")
def engines(references) -> Iterator[dict[str, LLM]]:
    """Multi-rank engines by layout name, started on first use and stopped with the module."""
    started: dict[str, LLM] = {}

    class Engines(dict):
        def __missing__(self, name: str) -> LLM:
            variant, tp, ep, redundant, interval = LAYOUTS[name]
            started[name] = LLM(
                references[variant][0], tensor_parallel_size=tp, expert_parallel_size=ep, redundant_experts=redundant,
                expert_rebalance_interval=interval, **ARGS,
            )
            return started[name]

    yield Engines()
    for llm in started.values():
        llm.shutdown()


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("name", [n for n, layout in LAYOUTS.items() if not layout[4]])
def test_greedy_outputs_equal_single_process_and_transformers(references, engines, name: str) -> None:
    variant = LAYOUTS[name][0]
    path, expected = references[variant]
    single = _greedy(LLM(path, **ARGS))
    llm = engines[name]
    assert isinstance(llm.engine.executor, MultiprocExecutor) and llm.engine.executor.world_size == LAYOUTS[name][1]
    assert _greedy(llm) == single == expected
    assert all(g.used_blocks == 0 for g in llm.engine.stats().kv_cache)


def test_placement_changes_mid_run_keep_every_greedy_output(references, engines) -> None:
    name = "26b-tp4-ep2-rebalanced"
    path, expected = references[LAYOUTS[name][0]]
    llm = engines[name]
    first = llm.engine.expert_placements()
    assert first and all(p.slots_per_group == 5 for p in first.values())  # 8 experts + 2 redundant over 2 groups
    assert _greedy(llm) == expected
    changes = llm.engine.stats().expert_placement_changes
    assert changes > 0 and llm.engine.expert_placements() != first
    assert llm.engine.expert_load() and all(sum(c) > 0 for c in llm.engine.expert_load().values())
    assert _greedy(llm) == expected  # again, starting on the moved experts


def test_a_killed_worker_ends_open_streams_with_a_clear_error(engines) -> None:
    llm = engines["31b-tp2"]  # the last test to use it: the engine is dead afterwards
    executor = llm.engine.executor
    assert isinstance(executor, MultiprocExecutor)
    front = AsyncEngine(llm.engine)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main() -> float:
        stream = await front.add_request(PROMPTS[0], long)
        first = await anext(stream)
        assert first.delta_token_ids
        executor.processes.kill(1)
        killed = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1 of 2 (died|is gone)"):
            async for _ in stream:
                pass
        return time.monotonic() - killed

    try:
        assert asyncio.run(asyncio.wait_for(main(), timeout=60)) < 10
        assert not front.is_running
        with pytest.raises(EngineDeadError):
            asyncio.run(front.add_request([5, 6], long))
    finally:
        front.shutdown()


def test_a_multi_rank_replica_on_a_backend_without_collectives_is_refused_before_it_starts() -> None:
    with pytest.raises(ValueError, match="a replica on xla runs on one device; tensor_parallel_size must be 1"):
        WorkerConfig.of("/no/checkpoint", torch.float32, "xla", EngineArgs(tensor_parallel_size=2))


def test_parallel_settings_are_validated_before_any_worker_starts(references) -> None:
    with pytest.raises(ValueError, match=r"expert_parallel_size \(3\) must divide tensor_parallel_size \(2\)"):
        EngineArgs(tensor_parallel_size=2, expert_parallel_size=3)
    with pytest.raises(ValueError, match="need expert_parallel_size > 1"):
        EngineArgs(redundant_experts=2)
    with pytest.raises(ValueError, match=r"redundant_experts \(\d+\) must be a multiple of expert_parallel_size"):
        EngineArgs(tensor_parallel_size=4, expert_parallel_size=2, redundant_experts=1)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineArgs(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        LLM(tiny_config("31b"), tensor_parallel_size=2, **ARGS)
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide the attention heads"):
        LLM(references["31b"][0], tensor_parallel_size=3, **ARGS)
    with pytest.raises(ValueError, match="expert_parallel applies to the MoE variant"):
        LLM(references["31b"][0], tensor_parallel_size=2, expert_parallel_size=2, **ARGS)
    with pytest.raises(ValueError, match="needs one worker per rank"):
        LLMEngine(random_weights_model(tiny_config("31b"), dtype=torch.float32, device="cpu"), None,
                  EngineArgs(tensor_parallel_size=2))


def test_ngram_speculation_on_a_tensor_parallel_replica_keeps_the_greedy_outputs(references) -> None:
    path, expected = references["31b"]
    llm = LLM(path, tensor_parallel_size=2, speculative_model="ngram", num_speculative_tokens=3, **ARGS)
    try:
        assert _greedy(llm) == expected
        stats = llm.engine.stats()
        assert stats.spec_num_draft_tokens > 0 and all(g.used_blocks == 0 for g in stats.kv_cache)
    finally:
        llm.shutdown()
