"""Tiny random-weight Gemma 4 checkpoints in the real format, for local runs, demos and tests.

`write_tiny_checkpoint(dir)` writes what an official checkpoint directory holds: a nested
`config.json`, `model.safetensors` with the real tensor names, `generation_config.json` and a
tokenizer with the real special tokens. Every feature of the chosen variant (PLE, KV sharing, MoE,
K-as-V) is kept; only the sizes shrink, so the platform runs end to end on a laptop CPU. The media
towers the variant has (vision on all, audio on E2B/E4B) come tiny and random too, so images, video
and audio work out of the box.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gemma4.assistant_config import Gemma4AssistantConfig
from gemma4.config import FULL, MEDIA_TOKEN_KEYS, SLIDING, Gemma4Config, variant_config
from gemma4.loader import checkpoint_name
from gemma4.special_tokens import AUDIO, AUDIO_END, AUDIO_START, IMAGE, IMAGE_END, IMAGE_START, VIDEO
from gemma4.tiny_tokenizer import special_token_ids, write_tiny_tokenizer

TINY_VOCAB = 512
GENERATION_EOS = [1, 106, 50]  # <eos>, <turn|>, <|tool_response>, as the official generation_config


def tiny_config(
    variant: str = "e2b", *, vocab_size: int = TINY_VOCAB, max_position_embeddings: int = 4096, towers: bool = False
) -> Gemma4Config:
    """The variant's architecture at hidden size 64-256 (12 layers, window 64); with `towers`, its media towers
    at hidden size 32 (2 layers) and the media token ids of the tiny tokenizer, else no towers."""
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
    if not towers:
        return dataclasses.replace(real, text=text, vision=None, audio=None)
    return dataclasses.replace(real, text=text, **_tiny_towers(real, vocab_size))


def _tiny_towers(real: Gemma4Config, vocab_size: int) -> dict[str, Any]:
    """The tiny vision/audio configs of the towers `real` has, and the tiny tokenizer's media token ids.

    The vision position table keeps the variant's size: it bounds the patch grid's sides, and a smaller
    one would refuse the large or very wide images the preprocessing allows.
    """
    vision = real.vision and dataclasses.replace(
        real.vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
    )
    audio = real.audio and dataclasses.replace(
        real.audio, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=48,
        subsampling_conv_channels=(128, 8),
    )
    ids = special_token_ids(vocab_size)
    return dict(
        vision=vision, audio=audio, image_token_id=ids[IMAGE.text], audio_token_id=ids[AUDIO.text],
        video_token_id=ids[VIDEO.text], boi_token_id=ids[IMAGE_START.text], eoi_token_id=ids[IMAGE_END.text],
        boa_token_id=ids[AUDIO_START.text], eoa_token_id=ids[AUDIO_END.text],
    )


def write_tiny_checkpoint(directory: str | Path, *, variant: str = "e2b", seed: int = 0, towers: bool = True) -> Path:
    """Write a tiny random-weight checkpoint shaped like `variant` into `directory` (created if needed), with
    the variant's media towers unless `towers` is False."""
    from gemma4.engine.llm import random_weights_model  # the engine package imports this module's callers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(variant, towers=towers)
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
        "vision_config": config.vision and config.vision.to_hf_dict(),
        "audio_config": config.audio and config.audio.to_hf_dict(),
        **_media_token_ids(config, towers),
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


def _media_token_ids(config: Gemma4Config, towers: bool) -> dict[str, int | None]:
    """config.json's media token ids (transformers' key names; none for a text-only checkpoint)."""
    return {key: getattr(config, name) for name, key in MEDIA_TOKEN_KEYS} if towers else {}


def tiny_assistant_config(target: Gemma4Config) -> Gemma4AssistantConfig:
    """A 4-layer drafter (hidden 64) for the tiny `target`: its layers' head geometry and RoPE are the
    target's; E2B/E4B-shaped targets get the masked embedder (16 clusters of the vocabulary, top 4),
    as their released drafters have it."""
    t = target.text
    layers = (SLIDING, SLIDING, SLIDING, FULL)
    text = dataclasses.replace(
        t,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layers),
        layer_types=layers,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        use_double_wide_mlp=False,
        enable_moe_block=False,
        num_experts=None,
        top_k_experts=None,
        moe_intermediate_size=None,
        final_logit_softcapping=None,
        use_bidirectional_attention=None,
    )
    ordered = t.hidden_size_per_layer_input > 0
    return Gemma4AssistantConfig(
        text=text,
        backbone_hidden_size=t.hidden_size,
        use_ordered_embeddings=ordered,
        num_centroids=16 if ordered else Gemma4AssistantConfig.num_centroids,
        centroid_intermediate_top_k=4 if ordered else Gemma4AssistantConfig.centroid_intermediate_top_k,
    )


def write_tiny_assistant(directory: str | Path, target: Gemma4Config, seed: int = 0) -> Path:
    """Write a random-weight `gemma4_assistant` checkpoint for the tiny `target` into `directory`:
    config.json as transformers writes it and model.safetensors (bf16 weights, the 1-D ones and layer
    scalars around 1, a random permutation as `token_ordering`)."""
    from gemma4.assistant import Gemma4Assistant  # imports the model, which the config-only callers avoid

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_assistant_config(target)
    model = Gemma4Assistant(config, target.text)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("token_ordering"):
            drawn = torch.randperm(tensor.numel(), generator=generator)
        elif tensor.dim() <= 1:
            drawn = 1.0 + 0.2 * torch.randn(tensor.shape, generator=generator)
        else:
            drawn = 0.05 * torch.randn(tensor.shape, generator=generator)
        tensors[name] = drawn.to(torch.bfloat16 if drawn.is_floating_point() else torch.int64).contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    raw = {**config.to_hf_dict(), "dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory
