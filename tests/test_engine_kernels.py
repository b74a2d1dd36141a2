"""The engine with the Triton kernels on (through the interpreter, fp32) gives transformers' greedy outputs
for every variant shape, and step logits equal to the torch reference ops'."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

from engine_fixtures import BLOCK_SIZE, greedy_references, mixed_prompts  # noqa: E402
from gemma4 import LLM, SamplingParams  # noqa: E402
from reference_models import SLIDING_WINDOW, TEXT_CONFIGS  # noqa: E402

NEW_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """Per variant: checkpoint dir and transformers' greedy continuation of each prompt."""
    prompts = mixed_prompts(count=4)  # one long prompt (past 3 windows), one sharing its prefix
    return prompts, greedy_references(prompts, NEW_TOKENS, tmp_path_factory)


def _llm(path, kernels: str) -> LLM:
    return LLM(path, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=32, num_kv_blocks=128,
               kernels=kernels)


@pytest.mark.parametrize("variant", list(TEXT_CONFIGS))
def test_greedy_with_kernels_matches_transformers(checkpoints, variant: str) -> None:
    prompts, refs = checkpoints
    path, expected = refs[variant]
    assert any(len(p) > SLIDING_WINDOW * 3 for p in prompts)
    llm = _llm(path, "triton")
    assert llm.engine.runner.ops.kernels == "triton"
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert all(g.used_blocks == 0 for g in llm.engine.stats().kv_cache)


@pytest.mark.parametrize("variant", ["26b-a4b"])  # MoE, K-as-V global layers
def test_step_logits_and_seeded_samples_equal_the_reference_ops(checkpoints, variant: str) -> None:
    prompts, refs = checkpoints
    path, _ = refs[variant]
    runs = {}
    for kernels in ("triton", "torch"):
        llm = _llm(path, kernels)
        logits: list[torch.Tensor] = []
        execute = llm.engine.runner.execute

        def recording(batch, kv, execute=execute, logits=logits, **kwargs):
            out, sampling = execute(batch, kv, **kwargs)
            logits.append(out[: len(sampling)].clone())
            return out, sampling

        llm.engine.runner.execute = recording
        outputs = llm.generate(prompts[:3], SEEDED)
        runs[kernels] = ([o.token_ids for o in outputs], logits)
    assert runs["triton"][0] == runs["torch"][0]
    assert len(runs["triton"][1]) == len(runs["torch"][1])
    for got, want in zip(runs["triton"][1], runs["torch"][1]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
