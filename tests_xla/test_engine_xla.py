"""The whole engine (scheduler, paged cache, sampler) on torch_xla's CPU device gives the CPU engine's greedy outputs."""

from __future__ import annotations

import pytest
import torch

from gemma4 import LLM, SamplingParams
from gemma4.tiny import tiny_config

PROMPTS = [[2, 17, 99, 3, 45, 8, 230], [2, 5, 6, 7]]


@pytest.mark.parametrize("variant", ["26b-a4b", "e2b"])
def test_engine_greedy_equals_cpu(variant: str, xla: torch.device) -> None:
    config = tiny_config(variant)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outputs = {}
    for device in ("cpu", xla):
        llm = LLM(config, dtype=torch.float32, device=device, num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=4, seed=0)
        outputs[str(device)] = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert outputs["cpu"] == outputs[str(xla)]
    assert all(len(tokens) == 4 for tokens in outputs["cpu"])
