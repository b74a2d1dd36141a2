"""Logit parity with transformers' Gemma 4 on tiny random checkpoints shaped like each variant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gemma4
from gemma4.checkpoint import INDEX_FILE, SINGLE_FILE
from reference_models import MM_TOKEN_IDS, SLIDING_WINDOW, TEXT_CONFIGS, VOCAB, build_reference, reference_greedy, save_reference

VARIANTS = list(TEXT_CONFIGS)
SEQ_LEN = 5 * SLIDING_WINDOW  # well past the sliding window
GREEDY_TOKENS = 32

# (variant, multimodal checkpoint?) -> the multimodal ones are written sharded.
CASES = [(v, mm) for v in VARIANTS for mm in (False, True)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[torch.nn.Module, Path]]:
    out = {}
    for variant, multimodal in CASES:
        ref = build_reference(variant, multimodal, seed=VARIANTS.index(variant))
        kind = "conditional-generation" if multimodal else "causal-lm"
        path = save_reference(ref, tmp_path_factory.mktemp(f"{variant}-{kind}"), sharded=multimodal)
        out[(variant, multimodal)] = (ref, path)
    return out


def _prompt(batch: int, seq_len: int, seed: int, with_placeholders: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (batch, seq_len), generator=gen)
    if with_placeholders:  # placeholders without media are embedded as <pad>, as the reference does
        ids[:, 5] = MM_TOKEN_IDS["image_token_id"]
        ids[:, 9] = MM_TOKEN_IDS["audio_token_id"]
    return ids


def _greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation with full forwards (no cache): an independent path from the reference's."""
    ids = input_ids
    for _ in range(new_tokens):
        next_ids = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, input_ids.shape[1]:]


@pytest.mark.parametrize("variant,multimodal", CASES, ids=[f"{v}-{'mm' if m else 'text'}" for v, m in CASES])
def test_fp32_logits_and_greedy_match_transformers(checkpoints, variant: str, multimodal: bool) -> None:
    ref, path = checkpoints[(variant, multimodal)]
    assert (path / (INDEX_FILE if multimodal else SINGLE_FILE)).is_file()
    model = gemma4.load_model(path, dtype=torch.float32)

    ids = _prompt(2, SEQ_LEN, seed=1, with_placeholders=multimodal)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        actual = model(ids)
    assert actual.shape == (2, SEQ_LEN, VOCAB)
    assert expected.std() > 0.1  # the check is meaningful: logits are far from constant
    assert (actual - expected).abs().max().item() <= 1e-4

    prompt = _prompt(2, 12, seed=2, with_placeholders=False)
    with torch.no_grad():
        expected_tokens = reference_greedy(ref, prompt, GREEDY_TOKENS)
        actual_tokens = _greedy(model, prompt, GREEDY_TOKENS)
    assert actual_tokens.tolist() == expected_tokens.tolist()


def test_bf16_is_as_accurate_as_transformers_bf16(checkpoints) -> None:
    """In bf16, tiny random models drift from fp32 for any implementation: ours must drift no more than the reference."""
    ref, path = checkpoints[("e2b", False)]
    model = gemma4.load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _prompt(1, SEQ_LEN, seed=3, with_placeholders=False)
    with torch.no_grad():
        exact = ref(input_ids=ids).logits
        reference_bf16 = ref.to(torch.bfloat16)(input_ids=ids).logits.float()
        ours_bf16 = model(ids).float()
    ref.float()
    reference_error = (reference_bf16 - exact).abs().mean().item()
    our_error = (ours_bf16 - exact).abs().mean().item()
    assert our_error <= 1.25 * reference_error


def test_logits_are_sensitive_to_the_details(checkpoints) -> None:
    """Breaking one detail (the proportional-RoPE fraction) moves the logits far past the tolerance."""
    ref, path = checkpoints[("31b", False)]
    model = gemma4.load_model(path, dtype=torch.float32)
    rotary = model.model.rotary["full_attention"]
    ids = _prompt(1, SEQ_LEN, seed=4, with_placeholders=False)
    with torch.no_grad():
        good = model(ids)
        rotary.inv_freq = 1.0 / (1e6 ** (torch.arange(0, 64, 2).float() / 64))  # "usual" partial RoPE
        bad = model(ids)
    assert (good - bad).abs().max().item() > 1e-2
