"""The model forward on torch_xla's CPU device equals eager CPU (fp32, random weights, dense attention)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from gemma4.engine.llm import random_weights_model
from gemma4.tiny import tiny_config


# Dense with K-as-V globals, MoE beside the MLP, and per-layer inputs with KV sharing.
@pytest.mark.parametrize("variant", ["31b", "26b-a4b", "e2b"])
def test_model_forward_equals_eager(variant: str, xla: torch.device, fallbacks: Callable[[], list[str]]) -> None:
    config = tiny_config(variant)
    model = random_weights_model(config, dtype=torch.float32, device="cpu", seed=0)
    ids = torch.randint(0, config.text.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids)
        on_xla = copy.deepcopy(model).to(xla)(ids.to(xla)).cpu()
    assert eager.abs().max() > 0.1  # random weights give logits of order 1: a real comparison
    # XLA fuses and reorders fp32 reductions: 12 layers drift by up to ~2e-5 on logits of order 1.
    torch.testing.assert_close(on_xla, eager, atol=5e-5, rtol=1e-5)
    assert fallbacks() == []  # every op lowers: nothing runs on the host through an aten fallback
