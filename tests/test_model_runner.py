"""The runner's step: compiled (fullgraph) equals eager, padded decode buckets are invisible to results."""

from __future__ import annotations

import pytest
import torch

from gemma4.engine import EngineArgs, LLMEngine, SamplingParams, random_weights_model
from gemma4.engine.model_runner import decode_buckets
from engine_fixtures import small_config
from gemma4.tiny import tiny_config

VARIANTS = ["e2b", "e4b", "26b-a4b", "31b"]
PROMPTS = [list(range(5, 15)), list(range(40, 47)), [3, 4, 5]]  # 20 tokens: one mixed prefill step
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _engine(model: torch.nn.Module, **args) -> LLMEngine:
    return LLMEngine(model, None, EngineArgs(block_size=4, max_num_seqs=4, num_kv_blocks=32, max_model_len=64, **args))


def _run(engine: LLMEngine) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of every step (real rows only) and the tokens each step computed."""
    logits: list[torch.Tensor] = []
    computed: list[int] = []
    execute = engine.runner.execute

    def recording(batch, kv, **kwargs):
        out, sampling = execute(batch, kv, **kwargs)
        logits.append(out[: len(sampling)].clone())
        computed.append(batch.total_tokens)
        return out, sampling

    engine.runner.execute = recording
    for prompt in PROMPTS:
        engine.add_request(prompt, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    return logits, computed


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_forward_compiles_fullgraph_for_prefill_and_decode_and_matches_eager(variant: str) -> None:
    torch._dynamo.reset()
    model = random_weights_model(small_config(variant), dtype=torch.float32, device="cpu")
    engine = _engine(model)
    runner = engine.runner
    compiled = torch.compile(runner.eager_forward, fullgraph=True, dynamic=False)
    shapes = []
    execute = runner.execute

    def both(batch, kv, **kwargs):
        step = runner.stage(batch, kv).tensors
        eager = runner.eager_forward(step)
        # The same step again, compiled: it writes the same keys/values to the same slots.
        torch.testing.assert_close(compiled(step), eager, atol=1e-5, rtol=1e-5)
        shapes.append(step.shape)
        return execute(batch, kv, **kwargs)

    runner.execute = both
    for prompt in PROMPTS:
        engine.add_request(prompt, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert shapes[0].prefill_seqs == 4 and shapes[0].decode_seqs == 0  # a prefill step: chunks of 10, 7, 3 (bucket 4)
    assert shapes[1].prefill_seqs == 0 and shapes[1].decode_seqs == 4  # then decode steps, bucket 4 for 3


def test_engine_with_torch_compile_gives_the_eager_tokens() -> None:
    model = random_weights_model(small_config("31b"), dtype=torch.float32, device="cpu")
    eager, _ = _run(_engine(model, torch_compile=False))
    compiled, _ = _run(_engine(model, torch_compile=True))
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_padded_rows_change_no_result_and_count_no_expert_load() -> None:
    model = random_weights_model(tiny_config("26b-a4b"), dtype=torch.float32, device="cpu")
    top_k = model.text_config.top_k_experts
    logits, computed = _run(_engine(model))
    for step_logits in logits[1:]:
        assert step_logits.shape[0] == 3  # three real rows of a bucket-4 decode step
    # Each real token is routed to top_k experts in every MoE layer; padded tokens to none.
    load = model.expert_load()
    assert load and all(sum(counts) == sum(computed) * top_k for counts in load.values())
    # The same requests one at a time (no padding: bucket 1) give the same logits.
    for i, prompt in enumerate(PROMPTS):
        engine = _engine(model)
        engine.add_request(prompt, GREEDY)
        alone = []
        execute = engine.runner.execute

        def recording(batch, kv, execute=execute, alone=alone, **kwargs):
            out, sampling = execute(batch, kv, **kwargs)
            alone.append(out[: len(sampling)].clone())
            return out, sampling

        engine.runner.execute = recording
        while engine.has_unfinished_requests():
            engine.step()
        for step, together in enumerate(logits):
            torch.testing.assert_close(alone[step][0], together[i], atol=1e-5, rtol=1e-5)


def test_decode_buckets_are_powers_of_two_capped_at_max_num_seqs() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(8) == (1, 2, 4, 8)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
