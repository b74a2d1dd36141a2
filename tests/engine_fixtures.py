"""Shared setup for engine tests: tiny reference checkpoints with a tokenizer, and prompt sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gemma4.config import FULL, SLIDING, Gemma4Config
from gemma4.tiny import tiny_config
from gemma4.tiny_tokenizer import write_tiny_tokenizer
import pytest

from reference_models import TEXT_CONFIGS, VOCAB, build_reference, reference_greedy, save_reference

BLOCK_SIZE = 4


def write_checkpoint(variant: str, directory: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A transformers-written tiny checkpoint shaped like `variant`, with a tiny tokenizer beside it."""
    ref = build_reference(variant, multimodal=False, seed=seed)
    save_reference(ref, directory, sharded=False)
    write_tiny_tokenizer(directory, vocab_size=VOCAB)
    return ref, directory


def greedy_references(
    prompts: list[list[int]], new_tokens: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[list[int]]]]:
    """Per variant: a checkpoint dir and transformers' greedy continuation of each prompt."""
    out = {}
    for variant in TEXT_CONFIGS:
        ref, path = write_checkpoint(variant, tmp_path_factory.mktemp(variant))
        with torch.no_grad():
            expected = [reference_greedy(ref, torch.tensor([p]), new_tokens)[0].tolist() for p in prompts]
        out[variant] = (path, expected)
    return out


def mixed_prompts(count: int = 16, seed: int = 0) -> list[list[int]]:
    """Prompts of mixed lengths, many longer than the sliding window; every third shares a 3-block prefix."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 400, (3 * BLOCK_SIZE,), generator=gen).tolist()
    prompts = []
    for i in range(count):
        tail = torch.randint(3, 400, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append(shared + tail if i % 3 == 0 else tail)
    return prompts


def small_config(variant: str) -> Gemma4Config:
    """The tiny variant cut to a few layers, keeping its features (KV sharing on both layer kinds, MoE, ...):
    for tests that compile the model, where every layer costs compile time."""
    config = tiny_config(variant)
    shared = 2 if config.text.num_kv_shared_layers else 0
    layers = (SLIDING, FULL) * (2 if shared else 1)
    text = dataclasses.replace(
        config.text, num_hidden_layers=len(layers), layer_types=layers, num_kv_shared_layers=shared
    )
    return dataclasses.replace(config, text=text)
