"""Tiny random-weight Gemma 4 checkpoints in the real format, for local runs, demos and tests.

`write_tiny_checkpoint(dir)` writes what an official checkpoint directory holds: a nested
`config.json`, `model.safetensors` with the real tensor names, `generation_config.json` and a
tokenizer with the real special tokens. Every feature of the chosen variant (PLE, KV sharing, MoE,
K-as-V) is kept; only the sizes shrink, so the platform runs end to end on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemma4.config import FULL, SLIDING, Gemma4Config, variant_config
from gemma4.loader import checkpoint_name
from gemma4.tiny_tokenizer import write_tiny_tokenizer

TINY_VOCAB = 512
GENERATION_EOS = [1, 106, 50]  # <eos>, <turn|>, <|tool_response>, as the official generation_config


def tiny_config(variant: str = "e2b", *, vocab_size: int = TINY_VOCAB, max_position_embeddings: int = 4096) -> Gemma4Config:
    """The variant's architecture at hidden size 64-256 (12 layers, window 64), with no media towers."""
    real = variant_config(variant)
    t = real.text
    layers = ([SLIDING] * (4 if t.use_double_wide_mlp else 5) + [FULL]) * 2
    moe = t.enable_moe_block
    text = dataclasses.replace(
        t,
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(layers),
        layer_types=tuple(layers),
        num_attention_heads=4,
        num_key_value_heads=min(t.num_key_value_heads, 2),
        num_global_key_value_heads=1 if t.num_global_key_value_heads else None,
        head_dim=32,
        global_head_dim=64,
        sliding_window=64,
        num_kv_shared_layers=4 if t.num_kv_shared_layers else 0,
        hidden_size_per_layer_input=16 if t.hidden_size_per_layer_input else 0,
        vocab_size_per_layer_input=vocab_size,
        num_experts=16 if moe else None,
        top_k_experts=4 if moe else None,
        moe_intermediate_size=64 if moe else None,
        max_position_embeddings=max_position_embeddings,
        eos_token_ids=(1, 106),
    )
    return dataclasses.replace(real, text=text, vision=None, audio=None)


def write_tiny_checkpoint(directory: str | Path, *, variant: str = "e2b", seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint shaped like `variant` into `directory` (created if needed)."""
    from gemma4.engine.llm import random_weights_model  # the engine package imports this module's callers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(variant)
    model = random_weights_model(config, dtype=torch.float32, device="cpu", seed=seed)
    tensors = {
        checkpoint_name(config, name): tensor.to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
    }
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    raw = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": config.text.to_hf_dict(),
        "vision_config": None,
        "audio_config": None,
        "eos_token_id": list(config.eos_token_ids),
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    generation = {"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95, "eos_token_id": GENERATION_EOS,
                  "pad_token_id": 0, "bos_token_id": 2}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tiny_tokenizer(directory, vocab_size=config.text.vocab_size)
    return directory
